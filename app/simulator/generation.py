"""The chat `Generation`: one completion being served, as a whole body or as chunks, what was sent
so far, and the usage and `/generation` stats that follow from it. The Responses and Messages
generations (`responses_api.py`, `messages_api.py`) build on it; `record.py` logs it."""

from __future__ import annotations

import time
from typing import Any

from app.simulator import generate


class Generation:
    """One completion being served: its chunks, what was sent so far, and its final stats."""

    def __init__(
        self,
        payload: dict[str, Any],
        knobs: dict[str, Any],
        model: dict[str, Any],
        out: generate.Output,
        kind: str,
        keepalives: int,
    ) -> None:
        self.id = f"gen-{int(time.time())}-{generate.random_id()}"
        self.created = int(time.time())
        self.payload, self.knobs, self.model, self.out, self.kind = payload, knobs, model, out, kind
        self.keepalives = keepalives
        self.model_name = str(knobs.get("model_served") or model["id"])
        self.provider = str(knobs.get("provider") or model["_provider"])
        self.emitted = ""
        self.reasoning_sent = False
        self.tool_sent = False
        self.finished = self.failed = self.cancelled = False
        self.billable = True

    # the tokens actually produced so far
    def usage(self) -> dict[str, Any]:
        out = self.out
        reasoning = out.reasoning_tokens if (self.finished or self.reasoning_sent) else 0
        tool = 0
        if out.tool and (self.finished or self.tool_sent):
            tool = generate.count_tokens(out.tool["function"]["name"]) + generate.count_tokens(
                out.tool["function"]["arguments"]
            )
        completion = generate.count_tokens(self.emitted) + reasoning + tool
        return generate.usage(self.model, out.prompt_tokens, completion, reasoning, out.cached_tokens)

    def stats(self) -> dict[str, Any]:
        usage = self.usage()
        return {
            "id": self.id,
            "model": self.model_name,
            "provider_name": self.provider,
            "streamed": self.kind != "embedding" and self.payload.get("stream") is True,
            "cancelled": self.cancelled,
            "finish_reason": self.out.finish_reason,
            "tokens_prompt": usage["prompt_tokens"],
            "tokens_completion": usage["completion_tokens"],
            "native_tokens_prompt": usage["prompt_tokens"],
            "native_tokens_completion": usage["completion_tokens"],
            "native_tokens_reasoning": usage["completion_tokens_details"]["reasoning_tokens"],
            "native_tokens_cached": usage["prompt_tokens_details"]["cached_tokens"],
            "total_cost": usage["cost"] if self.billable else 0,
            "usage": usage["cost"] if self.billable else 0,
            "is_byok": False,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)),
        }

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model_name,
            "provider": self.provider,
            "choices": choices,
        }

    def _choice(self, delta: dict[str, Any], finish: str | None = None, native: str | None = None) -> dict[str, Any]:
        if self.kind == "text":
            return {
                "index": 0,
                "text": delta.get("content") or "",
                "finish_reason": finish,
                "native_finish_reason": native,
                "logprobs": None,
            }
        return {"index": 0, "delta": delta, "finish_reason": finish, "native_finish_reason": native, "logprobs": None}

    def completion_body(self) -> dict[str, Any]:
        out = self.out
        usage = self.usage()
        if self.kind == "text":
            choice = {
                "index": 0,
                "text": out.content,
                "finish_reason": out.finish_reason,
                "native_finish_reason": out.finish_reason,
                "logprobs": None,
            }
            return {**self._envelope([choice]), "object": "text_completion", "usage": usage}
        message: dict[str, Any] = {
            "role": "assistant",
            "content": out.content,
            "refusal": None,
            "reasoning": None if out.reasoning_excluded else out.reasoning,
        }
        if out.details:
            message["reasoning_details"] = out.details
        if out.tool:
            message["tool_calls"] = [out.tool]
        choice = {
            "index": 0,
            "logprobs": None,
            "finish_reason": out.finish_reason,
            "native_finish_reason": out.finish_reason,
            "message": message,
        }
        return {**self._envelope([choice]), "object": "chat.completion", "usage": usage}

    def chunks(self) -> list[dict[str, Any]]:
        out = self.out
        chunks: list[dict[str, Any]] = []
        role = {"role": "assistant"} if self.kind == "chat" else {}
        if self.kind == "chat":
            chunks.append(self._envelope([self._choice({**role, "content": ""})]))
            if out.reasoning and not out.reasoning_excluded:
                chunks.extend(self._envelope([self._choice(d)]) for d in self._reasoning_deltas())
        for piece in generate.pieces(out.content):
            chunks.append(self._envelope([self._choice({**role, "content": piece})]))
        if out.tool:
            chunks.extend(self._envelope([self._choice(d)]) for d in self._tool_deltas())
        chunks.append(self._envelope([self._choice({**role, "content": ""}, out.finish_reason, out.finish_reason)]))
        return chunks

    def _reasoning_deltas(self) -> list[dict[str, Any]]:
        out = self.out
        assert out.reasoning is not None
        fmt = self.model["_reasoning_format"]
        detail_type = "reasoning.summary" if fmt == "openai-responses-v1" else "reasoning.text"
        text_key = "summary" if detail_type == "reasoning.summary" else "text"
        deltas = []
        for piece in split(out.reasoning, 3):
            detail = {"type": detail_type, text_key: piece, "format": fmt, "index": 0}
            deltas.append({"role": "assistant", "content": "", "reasoning": piece, "reasoning_details": [detail]})
        extra = [d for d in out.details if d["type"] == "reasoning.encrypted" and d["format"] == "openai-responses-v1"]
        if fmt == "anthropic-claude-v1":
            extra = [
                {
                    "type": "reasoning.text",
                    "text": "",
                    "signature": generate.sign(out.reasoning),
                    "format": fmt,
                    "index": 0,
                }
            ]
        if extra:
            deltas.append({"role": "assistant", "content": "", "reasoning": "", "reasoning_details": extra})
        return deltas

    def _tool_deltas(self) -> list[dict[str, Any]]:
        tool = self.out.tool
        assert tool is not None
        first: dict[str, Any] = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "index": 0,
                    "id": tool["id"],
                    "type": "function",
                    "function": {"name": tool["function"]["name"], "arguments": ""},
                }
            ],
        }
        gemini = [d for d in self.out.details if d["type"] == "reasoning.encrypted" and d["id"] == tool["id"]]
        if gemini:
            first["reasoning_details"] = gemini
        deltas = [first]
        parts = split(tool["function"]["arguments"], 3) or [""]
        for part in parts:
            deltas.append(
                {"role": "assistant", "content": None, "tool_calls": [{"index": 0, "function": {"arguments": part}}]}
            )
        return deltas

    def note_sent(self, chunk: dict[str, Any]) -> None:
        for choice in chunk["choices"]:
            delta = choice.get("delta") or {}
            self.emitted += delta.get("content") or choice.get("text") or ""
            if delta.get("reasoning"):
                self.reasoning_sent = True
            if delta.get("tool_calls"):
                self.tool_sent = True

    def usage_chunk(self, variant: str) -> dict[str, Any] | None:
        """The final usage chunk: `choices: []` now, one empty choice earlier ("choice"),
        or none when it rode on the finish chunk ("finish")."""
        usage = self.usage()
        if variant in ("none", "finish"):
            return None
        if variant == "choice":
            return {**self._envelope([self._choice({"role": "assistant", "content": ""})]), "usage": usage}
        return {**self._envelope([]), "usage": usage}

    def stream_error(self, shape: int) -> dict[str, Any]:
        """The five in-stream error shapes of openrouter-api.md §4.5."""
        provider_error = {
            "code": 502,
            "message": "Provider returned error",
            "metadata": {"error_type": "provider_unavailable", "provider_code": "upstream_502"},
        }
        if shape == 1:
            choice = {"index": 0, "delta": {"content": ""}, "finish_reason": "error", "native_finish_reason": "error"}
            return {**self._envelope([choice]), "error": provider_error}
        if shape == 2:
            return {**self._envelope([]), "error": provider_error}
        if shape == 3:
            return {
                "error": {
                    "message": "Rate limit exceeded: free-models-per-day",
                    "code": 429,
                    "metadata": {
                        "headers": {
                            "X-RateLimit-Limit": "200",
                            "X-RateLimit-Remaining": "0",
                            "X-RateLimit-Reset": "1743292800000",
                        },
                        "provider_name": "Google AI Studio",
                    },
                },
                "user_id": "user_sim",
            }
        if shape == 4:
            return self._envelope(
                [self._choice({"role": "assistant", "content": ""}, "error", "MALFORMED_FUNCTION_CALL")]
            )
        return self._envelope([self._choice({"role": "assistant", "content": ""}, "stop", "network_error")])


def split(text: str, parts: int) -> list[str]:
    """`text` in at most `parts` pieces of equal length (the last shorter); none when empty."""
    if not text:
        return []
    size = max(1, -(-len(text) // parts))
    return [text[i : i + size] for i in range(0, len(text), size)]
