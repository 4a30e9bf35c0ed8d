"""Server-sent events as bytes: the complete events among what has arrived. Pure, no I/O."""

from __future__ import annotations


def complete_events(held: bytes, data: bytes) -> tuple[bytes, bytes]:
    """(the complete events, each ending in a blank line; what is left to hold) once `data`
    arrives after the `held` bytes. Line ends become `\\n`, after joining: a `\\r\\n` may be
    split between two reads."""
    buffer = held + data if held else data
    if b"\r" in buffer:
        buffer = buffer.replace(b"\r\n", b"\n")
    end = buffer.rfind(b"\n\n")
    if end < 0:
        return b"", buffer
    return buffer[: end + 2], buffer[end + 2 :]
