"""The APIs the gateway serves, one module each, and the routes they answer on."""

from __future__ import annotations

from app.dialects.base import Answer, Dialect, Relay
from app.dialects.chat import CHAT, COMPLETIONS
from app.dialects.embeddings import EMBEDDINGS
from app.dialects.messages import MESSAGES
from app.dialects.responses import RESPONSES

DIALECTS: tuple[Dialect, ...] = (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, MESSAGES)
PREFIXES = ("/v1", "/api/v1")
# Every inference route (path → its API), under both prefixes; `?beta=true` and other query
# strings are not part of the path.
ROUTES: dict[str, Dialect] = {f"{prefix}{path}": d for prefix in PREFIXES for d in DIALECTS for path in d.routes}
_ANTHROPIC_PATHS = tuple(f"{prefix}/messages" for prefix in PREFIXES)


def dialect_of(path: str) -> Dialect:
    """Whose error envelope an answer on this path wears: Anthropic's anywhere under the
    Messages routes (count_tokens, a wrong method, a path below them), OpenAI's elsewhere."""
    return MESSAGES if path.startswith(_ANTHROPIC_PATHS) else CHAT


__all__ = [
    "CHAT",
    "COMPLETIONS",
    "DIALECTS",
    "EMBEDDINGS",
    "MESSAGES",
    "PREFIXES",
    "RESPONSES",
    "ROUTES",
    "Answer",
    "Dialect",
    "Relay",
    "dialect_of",
]
