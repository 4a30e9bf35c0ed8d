"""What the simulated models say: deterministic text, reasoning, tool calls, token counts
and cost. Pure functions; the server decides how to send them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import string
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from app.simulator.catalogue import price

_TOKEN = re.compile(r"\w+|[^\w\s]")
_PIECE = re.compile(r"\s*\S+|\s+$")
_SIGNING_KEY = b"openrouter-simulator-thinking-signature"
_WORDS = [
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
    "sed",
    "do",
    "eiusmod",
    "tempor",
    "incididunt",
    "ut",
    "labore",
    "et",
    "dolore",
    "magna",
    "aliqua",
]
_ALNUM = string.ascii_letters + string.digits


def count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


def pieces(text: str) -> list[str]:
    """Stream pieces whose concatenation is exactly `text` (one word each, spaces leading)."""
    return _PIECE.findall(text) or ([text] if text else [])


def random_id(length: int = 20) -> str:
    return "".join(secrets.choice(_ALNUM) for _ in range(length))


def text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part.get("text", "") for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def prompt_tokens(payload: dict[str, Any]) -> int:
    if "messages" in payload:
        total = 3
        for message in payload["messages"] if isinstance(payload["messages"], list) else ():
            if not isinstance(message, dict):
                continue
            total += 3 + count_tokens(text_of(message.get("content")))
            for call in message.get("tool_calls") or ():
                if isinstance(call, dict):
                    fn = call.get("function") or {}
                    total += count_tokens(str(fn.get("name", ""))) + count_tokens(str(fn.get("arguments", "")))
        return total
    source = payload.get("prompt", payload.get("input", ""))
    if isinstance(source, list):
        return sum(count_tokens(s) if isinstance(s, str) else len(s) if isinstance(s, list) else 1 for s in source)
    return count_tokens(source) if isinstance(source, str) else 0


def last_user_text(payload: dict[str, Any]) -> str:
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return prompt
    for message in reversed(payload.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return text_of(message.get("content"))
    return ""


def _typed_last(messages: list[Any]) -> str:
    """What the user typed last: the last user message's last text part (Claude Code puts its
    system reminders, which name its tools, in the parts before)."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            parts = (
                [p for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
                if isinstance(content, list)
                else []
            )
            return str(parts[-1]["text"]) if parts else text_of(content)
    return ""


def reply_text(payload: dict[str, Any], knobs: dict[str, Any], model_id: str) -> str:
    reply = knobs.get("reply")
    if isinstance(reply, str):
        return reply
    if isinstance(knobs.get("words"), int):
        return " ".join(_WORDS[i % len(_WORDS)] for i in range(max(0, knobs["words"])))
    messages = payload.get("messages") or []
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "tool":
        return f"The tool answered: {text_of(messages[-1].get('content'))[:200]}"
    said = " ".join(last_user_text(payload).split()[:24])
    return f"Hello from {model_id}! You said: {said}" if said else f"Hello from {model_id}!"


def reasoning_wanted(model: dict[str, Any], payload: dict[str, Any]) -> tuple[bool, bool]:
    """(reasons, excluded): whether the model thinks, and whether the text is held back."""
    mode = model["_reasoning"]
    if mode == "none":
        return False, False
    reasoning = payload.get("reasoning")
    exclude = isinstance(reasoning, dict) and reasoning.get("exclude") is True
    if payload.get("include_reasoning") is False:
        exclude = True
    if mode == "always":
        return True, exclude
    if isinstance(reasoning, dict):
        if reasoning.get("enabled") is False or reasoning.get("effort") == "none":
            return False, False
        return True, exclude
    return payload.get("include_reasoning") is True, exclude


def reasoning_text(payload: dict[str, Any]) -> str:
    reasoning = payload.get("reasoning")
    effort = reasoning.get("effort", "medium") if isinstance(reasoning, dict) else "medium"
    words = len(last_user_text(payload).split())
    thought = f"The user wrote {words} words. I should answer briefly and clearly."
    repeat = {"high": 3, "xhigh": 4, "max": 4}.get(effort, 1) if isinstance(effort, str) else 1
    return " ".join([thought] * repeat)


def sign(text: str) -> str:
    return base64.b64encode(hmac.new(_SIGNING_KEY, text.encode(), hashlib.sha256).digest()).decode()


def reasoning_details(fmt: str, text: str, tool_call_id: str | None) -> list[dict[str, Any]]:
    if fmt == "openai-responses-v1":
        return [
            {"type": "reasoning.summary", "summary": text, "format": fmt, "index": 0},
            {
                "type": "reasoning.encrypted",
                "data": "gAAAAB" + base64.b64encode(text.encode()).decode(),
                "id": "rs_" + secrets.token_hex(12),
                "format": fmt,
                "index": 1,
            },
        ]
    detail: dict[str, Any] = {"type": "reasoning.text", "text": text, "format": fmt, "index": 0}
    if fmt == "anthropic-claude-v1":
        detail["signature"] = sign(text)
    details = [detail]
    if fmt == "google-gemini-v1" and tool_call_id:
        details.append(
            {
                "type": "reasoning.encrypted",
                "data": base64.b64encode(b"thought:" + text.encode()).decode(),
                "id": tool_call_id,
                "format": fmt,
                "index": 1,
            }
        )
    return details


def bad_signature(payload: dict[str, Any]) -> bool:
    """Whether an assistant message replays a thinking block whose signature does not match."""
    for message in payload.get("messages") or ():
        if not isinstance(message, dict) or message.get("role") != "assistant":
            continue
        blocks: dict[int, list[dict[str, Any]]] = {}
        for detail in message.get("reasoning_details") or ():
            if isinstance(detail, dict) and detail.get("type") == "reasoning.text":
                blocks.setdefault(detail.get("index", 0), []).append(detail)
        for parts in blocks.values():
            signature = next((p["signature"] for p in parts if p.get("signature")), None)
            text = "".join(str(p.get("text") or "") for p in parts)
            if signature is not None and not hmac.compare_digest(signature, sign(text)):
                return True
    return False


def named_tools(tools: list[dict[str, Any]], choice: Any, messages: list[Any]) -> list[dict[str, Any]]:
    """The tools an agent's model may call this turn. Agents (Codex, Claude Code) send every tool
    they have on every turn, so the Responses and Messages models call one only when
    `tool_choice` forces it or the last user text names it; otherwise they answer in words."""
    if choice == "required" or isinstance(choice, dict):
        return tools
    text = _typed_last(messages)
    return [t for t in tools if (name := (t.get("function") or {}).get("name")) and name in text]


def tool_call(payload: dict[str, Any], knobs: dict[str, Any], model: dict[str, Any]) -> dict[str, Any] | None:
    tools = payload.get("tools")
    choice = payload.get("tool_choice", "auto")
    messages = payload.get("messages") or []
    if not isinstance(tools, list) or not tools or choice == "none":
        return None
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "tool":
        return None
    tool = tools[0]
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        tool = next((t for t in tools if (t.get("function") or {}).get("name") == wanted), tool)
    function = tool.get("function") or {} if isinstance(tool, dict) else {}
    arguments = knobs.get("tool_arguments")
    if not isinstance(arguments, str):
        arguments = _arguments_for(function.get("parameters") or {})
    prefix = {"Anthropic": "toolu_", "Google AI Studio": "tool_"}.get(model["_provider"], "call_")
    return {
        "id": prefix + random_id(24),
        "type": "function",
        "function": {"name": str(function.get("name", "tool")), "arguments": arguments},
    }


def _arguments_for(schema: dict[str, Any]) -> str:
    values: dict[str, Any] = {}
    for name, spec in (schema.get("properties") or {}).items():
        spec = spec if isinstance(spec, dict) else {}
        if spec.get("enum"):
            values[name] = spec["enum"][0]
        else:
            values[name] = {
                "string": "Paris",
                "integer": 1,
                "number": 1.5,
                "boolean": True,
                "array": [],
                "object": {},
            }.get(spec.get("type", "string"), "Paris")
    return json.dumps(values, separators=(",", ":"))


@dataclass
class Output:
    """Everything one completion produces, before it is framed as JSON or SSE."""

    content: str
    reasoning: str | None = None
    reasoning_excluded: bool = False
    details: list[dict[str, Any]] = field(default_factory=list)
    tool: dict[str, Any] | None = None
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    cached_tokens: int = 0

    @property
    def reasoning_tokens(self) -> int:
        return count_tokens(self.reasoning) if self.reasoning else 0

    def completion_tokens(self, content: str | None = None) -> int:
        text = self.content if content is None else content
        tool_tokens = 0
        if self.tool:
            tool_tokens = count_tokens(self.tool["function"]["name"]) + count_tokens(self.tool["function"]["arguments"])
        return count_tokens(text) + self.reasoning_tokens + tool_tokens


def produce(payload: dict[str, Any], knobs: dict[str, Any], model: dict[str, Any]) -> Output:
    tool = tool_call(payload, knobs, model)
    content = "" if tool else reply_text(payload, knobs, model["id"])
    reasons, excluded = reasoning_wanted(model, payload)
    text = reasoning_text(payload) if reasons else None
    out = Output(
        content=content,
        reasoning=text,
        reasoning_excluded=excluded,
        tool=tool,
        finish_reason="tool_calls" if tool else "stop",
        prompt_tokens=prompt_tokens(payload),
    )
    if text and not excluded:
        out.details = reasoning_details(model["_reasoning_format"], text, tool["id"] if tool else None)
    cached = knobs.get("cached_tokens")
    out.cached_tokens = min(cached, out.prompt_tokens) if isinstance(cached, int) and cached > 0 else 0
    limit = payload.get("max_completion_tokens", payload.get("max_tokens"))
    if isinstance(limit, int) and not tool and out.completion_tokens() > limit:
        kept: list[str] = []
        for piece in pieces(content):
            if out.completion_tokens("".join([*kept, piece])) > limit:
                break
            kept.append(piece)
        out.content = "".join(kept)
        out.finish_reason = "length"
    return out


def usage(
    model: dict[str, Any], prompt: int, completion: int, reasoning: int, cached: int, cache_write: int = 0
) -> dict[str, Any]:
    """OpenRouter's chat usage; `prompt` counts every input token, cache reads and writes included."""
    prompt_cost = (
        (prompt - cached - cache_write) * price(model, "prompt")
        + cached * price(model, "input_cache_read")
        + cache_write * price(model, "input_cache_write")
    )
    completion_cost = completion * price(model, "completion")
    cost = prompt_cost + completion_cost + Decimal(model["pricing"].get("request", "0"))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cost": float(cost),
        "is_byok": False,
        "prompt_tokens_details": {
            "cached_tokens": cached,
            "cache_write_tokens": cache_write,
            "audio_tokens": 0,
            "video_tokens": 0,
        },
        "cost_details": {
            "upstream_inference_cost": float(cost),
            "upstream_inference_prompt_cost": float(prompt_cost),
            "upstream_inference_completions_cost": float(completion_cost),
        },
        "completion_tokens_details": {"reasoning_tokens": reasoning, "image_tokens": 0, "audio_tokens": 0},
    }


def embedding(text: str, dimensions: int) -> list[float]:
    """A deterministic unit vector for `text`."""
    values: list[float] = []
    counter = 0
    while len(values) < dimensions:
        digest = hashlib.sha256(f"{counter}:{text}".encode()).digest()
        values.extend((b - 127.5) / 127.5 for b in digest)
        counter += 1
    values = values[:dimensions]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [v / norm for v in values]
