"""Request ids: the client's `x-request-id` when it is sane, else a fresh one."""

from __future__ import annotations

import secrets


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == b"x-request-id":
            if 0 < len(value) <= 128 and all(33 <= byte < 127 for byte in value):
                return value.decode()
            break
    return "req_" + secrets.token_hex(12)
