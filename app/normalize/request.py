"""Client body -> OpenRouter body. Pure functions, no I/O.

The body is parsed once. When nothing needs changing, the client's own bytes go upstream
unchanged; otherwise the dict is re-encoded, every field we do not know kept as it was.
"""

from __future__ import annotations

import copy
from typing import Any

import orjson

from app.errors import InvalidRequestError

_REASONING_CONTROLS = ("effort", "max_tokens", "enabled")


def parse_object(raw: bytes, max_depth: int = 64) -> dict[str, Any]:
    """The body as a JSON object, or a 400 that says what is wrong with it."""
    if not raw.strip():
        raise InvalidRequestError("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise InvalidRequestError(
            f"The request body must be a JSON object, not {type(payload).__name__}.", code="invalid_json"
        )
    if raw.count(b"{") + raw.count(b"[") > max_depth and _deeper_than(payload, max_depth):
        raise InvalidRequestError(f"The JSON body is nested more than {max_depth} levels deep.", code="json_too_deep")
    return payload


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether a parsed JSON value nests beyond `limit` levels (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for child in node.values() if isinstance(child, (dict, list)))
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node if isinstance(child, (dict, list)))
    return False


def require_fields(payload: dict[str, Any], required: tuple[tuple[str, type | tuple[type, ...]], ...]) -> None:
    """Check the fields an endpoint cannot work without, the way OpenAI words it."""
    for name, kind in required:
        value = payload.get(name)
        if value is None:
            raise InvalidRequestError(
                f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter"
            )
        if not isinstance(value, kind) or (isinstance(value, (list, str)) and not value):
            raise InvalidRequestError(f"Invalid value for '{name}'.", param=name, code="invalid_type")


def check_types(payload: dict[str, Any]) -> None:
    """The few fields the gateway itself reads must have the right type."""
    model = payload.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise InvalidRequestError("'model' must be a non-empty string.", param="model", code="invalid_type")
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise InvalidRequestError("'stream' must be a boolean.", param="stream", code="invalid_type")
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequestError("'stream_options' must be an object.", param="stream_options", code="invalid_type")


def wants_usage(payload: dict[str, Any]) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def fold_reasoning_effort(payload: dict[str, Any]) -> bool:
    """OpenAI's `reasoning_effort` becomes OpenRouter's `reasoning.effort`; never both go upstream."""
    if "reasoning_effort" not in payload:
        return False
    effort = payload.pop("reasoning_effort")
    if effort is None:
        return True
    reasoning = payload.get("reasoning")
    if reasoning is None:
        payload["reasoning"] = {"effort": effort}
        return True
    if not isinstance(reasoning, dict):
        raise InvalidRequestError("'reasoning' must be an object.", param="reasoning", code="invalid_type")
    if "max_tokens" in reasoning:
        raise InvalidRequestError(
            "Send either 'reasoning_effort' or 'reasoning.max_tokens', not both.",
            param="reasoning_effort",
            code="conflicting_parameters",
        )
    if "effort" in reasoning and reasoning["effort"] != effort:
        raise InvalidRequestError(
            "'reasoning_effort' and 'reasoning.effort' disagree; send one of them.",
            param="reasoning_effort",
            code="conflicting_parameters",
        )
    payload["reasoning"] = {**reasoning, "effort": effort}
    return True


def merge_defaults(payload: dict[str, Any], defaults: dict[str, Any]) -> bool:
    """Merge configured defaults under the client's fields (the client wins, objects merge deeply).

    `reasoning` is special: if the client chose how to reason (effort, max_tokens or enabled),
    the default's choice is dropped, so effort and max_tokens never both go upstream.
    """
    changed = False
    for name, default in defaults.items():
        if name == "thinking" and name in payload:
            continue  # (Messages) the client's choice of thinking is whole: nothing merged into it
        if name not in payload:
            if name == "reasoning" and "include_reasoning" in payload:
                continue  # the client used the legacy control; leave reasoning to it
            payload[name] = copy.deepcopy(default)
            changed = True
            continue
        mine = payload[name]
        if isinstance(mine, dict) and isinstance(default, dict):
            merged = _merge_reasoning(default, mine) if name == "reasoning" else _deep_merge(default, mine)
            if merged != mine:
                payload[name] = merged
                changed = True
    return changed


def _merge_reasoning(default: dict[str, Any], mine: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(default)
    if any(control in mine for control in _REASONING_CONTROLS):
        for control in _REASONING_CONTROLS:
            merged.pop(control, None)
    merged.update(mine)
    return merged


def _deep_merge(default: dict[str, Any], mine: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(default)
    for name, value in mine.items():
        if isinstance(value, dict) and isinstance(merged.get(name), dict):
            merged[name] = _deep_merge(merged[name], value)
        else:
            merged[name] = value
    return merged


def impose_policy(payload: dict[str, Any], policy: dict[str, Any]) -> bool:
    """Merge a policy over the client's fields: the policy wins (e.g. a team's provider rules)."""
    changed = False
    for name, value in policy.items():
        mine = payload.get(name)
        merged = (
            _deep_merge(mine, value) if isinstance(mine, dict) and isinstance(value, dict) else copy.deepcopy(value)
        )
        if merged != mine:
            payload[name] = merged
            changed = True
    return changed


def encode(payload: dict[str, Any]) -> bytes:
    return orjson.dumps(payload)
