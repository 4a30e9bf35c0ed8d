"""OpenAI's Chat Completions and legacy Completions: the base dialect as it is, on their routes.

Their streams go through `normalize/stream.py`'s `StreamRelay` (OpenRouter's usage chunk
shapes and in-stream errors made OpenAI's)."""

from __future__ import annotations

from app.dialects.base import Dialect


class Chat(Dialect):
    pass


class Completions(Dialect):
    name = "completions"
    upstream_path = "/completions"
    routes = ("/completions",)
    required = (("prompt", (str, list)),)
    summary = "Create a completion (legacy)"


CHAT = Chat()
COMPLETIONS = Completions()
