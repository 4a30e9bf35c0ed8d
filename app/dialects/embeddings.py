"""OpenAI's Embeddings: never streams, writes no output tokens, has no reasoning."""

from __future__ import annotations

from typing import Any

from app.dialects.base import Dialect


class Embeddings(Dialect):
    name = "embeddings"
    upstream_path = "/embeddings"
    routes = ("/embeddings",)
    required = (("input", (str, list)),)
    expect = "data"
    streams = False
    writes_tokens = False
    output_limits = ()
    summary = "Create embeddings"

    def fold_reasoning(self, payload: dict[str, Any]) -> bool:
        return False


EMBEDDINGS = Embeddings()
