"""The APIs the gateway serves, one module each, and the routes they answer on."""

from __future__ import annotations

from app.dialects.base import Dialect, Relay
from app.dialects.chat import CHAT, COMPLETIONS
from app.dialects.embeddings import EMBEDDINGS
from app.dialects.messages import MESSAGES
from app.dialects.responses import RESPONSES

DIALECTS: tuple[Dialect, ...] = (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES, MESSAGES)
PREFIXES = ("/v1", "/api/v1")
# Every inference route (path → its API), under both prefixes; `?beta=true` and other query
# strings are not part of the path.
ROUTES: dict[str, Dialect] = {f"{prefix}{path}": d for prefix in PREFIXES for d in DIALECTS for path in d.routes}

__all__ = [
    "CHAT",
    "COMPLETIONS",
    "DIALECTS",
    "EMBEDDINGS",
    "MESSAGES",
    "PREFIXES",
    "RESPONSES",
    "ROUTES",
    "Dialect",
    "Relay",
]
