"""Table-driven tests of the pure normalisation modules (no servers)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from app.errors import InvalidRequestError, UpstreamError, UpstreamStatusError, UpstreamUnavailableError
from app.normalize import request as normalize
from app.normalize.response import body_error, openrouter_error
from app.normalize.stream import DONE, StreamRelay


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"reasoning_effort": "high"}, {"reasoning": {"effort": "high"}}),
        ({"reasoning_effort": None}, {}),
        (
            {"reasoning_effort": "low", "reasoning": {"exclude": True}},
            {"reasoning": {"exclude": True, "effort": "low"}},
        ),
        ({"reasoning_effort": "low", "reasoning": {"effort": "low"}}, {"reasoning": {"effort": "low"}}),
        ({"reasoning": {"effort": "low"}}, {"reasoning": {"effort": "low"}}),
    ],
)
def test_fold_reasoning_effort(payload: dict[str, Any], expected: dict[str, Any]) -> None:
    normalize.fold_reasoning_effort(payload)
    assert payload == expected


@pytest.mark.parametrize(
    "payload",
    [
        {"reasoning_effort": "low", "reasoning": {"effort": "high"}},
        {"reasoning_effort": "low", "reasoning": {"max_tokens": 1024}},
        {"reasoning_effort": "low", "reasoning": "high"},
    ],
)
def test_fold_reasoning_effort_conflicts(payload: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequestError):
        normalize.fold_reasoning_effort(payload)


@pytest.mark.parametrize(
    ("payload", "defaults", "expected"),
    [
        ({}, {"reasoning": {"enabled": True}}, {"reasoning": {"enabled": True}}),
        (
            {"reasoning": {"effort": "low"}},
            {"reasoning": {"enabled": True, "summary": "auto"}},
            {"reasoning": {"summary": "auto", "effort": "low"}},
        ),
        ({"reasoning": {"max_tokens": 2000}}, {"reasoning": {"effort": "high"}}, {"reasoning": {"max_tokens": 2000}}),
        ({"include_reasoning": False}, {"reasoning": {"enabled": True}}, {"include_reasoning": False}),
        ({"temperature": 0.2}, {"temperature": 1, "top_p": 0.9}, {"temperature": 0.2, "top_p": 0.9}),
        (
            {"provider": {"order": ["a"]}},
            {"provider": {"order": ["b"], "allow_fallbacks": False}},
            {"provider": {"order": ["a"], "allow_fallbacks": False}},
        ),
    ],
)
def test_merge_defaults_client_wins(
    payload: dict[str, Any], defaults: dict[str, Any], expected: dict[str, Any]
) -> None:
    normalize.merge_defaults(payload, defaults)
    assert payload == expected


def test_merge_defaults_does_not_share_state() -> None:
    defaults = {"reasoning": {"enabled": True}}
    first: dict[str, Any] = {}
    normalize.merge_defaults(first, defaults)
    first["reasoning"]["enabled"] = False
    assert defaults == {"reasoning": {"enabled": True}}


def test_impose_policy_wins() -> None:
    payload = {"provider": {"data_collection": "allow", "order": ["x"]}}
    assert normalize.impose_policy(payload, {"provider": {"data_collection": "deny", "zdr": True}})
    assert payload == {"provider": {"data_collection": "deny", "order": ["x"], "zdr": True}}


@pytest.mark.parametrize(
    ("status", "error", "kind", "out_status", "code"),
    [
        (400, {"code": 400, "message": "bad"}, UpstreamStatusError, 400, "invalid_request"),
        (401, {"code": 401, "message": "User not found."}, UpstreamUnavailableError, 503, "upstream_auth_failed"),
        (402, {"code": 402, "message": "no credits"}, UpstreamUnavailableError, 503, "upstream_insufficient_credits"),
        (
            404,
            {"code": 404, "message": "x", "availability": {"code": "no_endpoints"}},
            UpstreamStatusError,
            404,
            "no_endpoints",
        ),
        (
            429,
            {"code": 429, "message": "slow down", "metadata": {"retry_after_seconds": 25}},
            UpstreamStatusError,
            429,
            "rate_limit_exceeded",
        ),
        (503, {"code": 503, "message": "overloaded"}, UpstreamError, 502, "upstream_error"),
        (529, "text only", UpstreamError, 502, "upstream_error"),
    ],
)
def test_openrouter_error_mapping(status: int, error: Any, kind: type, out_status: int, code: str) -> None:
    mapped = openrouter_error(status, error, {})
    assert isinstance(mapped, kind)
    assert (mapped.status, mapped.code) == (out_status, code)
    rendered = orjson.loads(mapped.render())["error"]
    assert isinstance(rendered["code"], str) and rendered["message"]
    if status == 429:
        assert mapped.headers["retry-after"] == "25"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"error": {"code": 429, "message": "x"}, "user_id": "u"}, 429),
        ({"error": {"code": "server_error", "message": "x"}}, 502),
        ({"choices": [{"finish_reason": "error", "error": {"code": 502, "message": "cut"}, "message": {}}]}, 502),
        ({"choices": [{"finish_reason": "stop", "native_finish_reason": "network_error", "message": {}}]}, 502),
        ({"id": "gen-1"}, 502),
        ([1, 2], 502),
    ],
)
def test_body_errors(body: Any, status: int) -> None:
    error = body_error(body, "choices")
    assert error is not None and error.status == status


def test_clean_body_has_no_error() -> None:
    assert body_error({"choices": [{"finish_reason": "stop", "message": {"content": "hi"}}]}, "choices") is None


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return (
        b"data: "
        + orjson.dumps({"id": "gen-1", "object": "chat.completion.chunk", "choices": choices, **extra})
        + b"\n\n"
    )


USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "cost": 0.001}


def relay_all(relay: StreamRelay, *parts: bytes) -> bytes:
    return b"".join(relay.feed(p) for p in parts) + relay.end()


def events(data: bytes) -> list[Any]:
    out = []
    for event in data.split(b"\n\n"):
        if event.startswith(b"data: ") and event != b"data: [DONE]":
            out.append(orjson.loads(event[6:]))
    return out


def test_plain_stream_passes_byte_for_byte_even_when_split_anywhere() -> None:
    stream = b": OPENROUTER PROCESSING\n\n" + chunk({"content": "Hi"}) + chunk({"content": ""}, "stop") + DONE
    for cut in range(1, len(stream)):
        relay = StreamRelay(include_usage=False)
        assert relay_all(relay, stream[:cut], stream[cut:]) == stream
        assert relay.finished and relay.done and relay.error is None


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("shape", ["empty_choices", "choice", "finish"])
def test_usage_chunk_shapes(include_usage: bool, shape: str) -> None:
    finish = chunk({"content": ""}, "stop")
    if shape == "empty_choices":
        tail = finish + chunk(None, usage=USAGE)
    elif shape == "choice":
        tail = finish + chunk({"role": "assistant", "content": ""}, usage=USAGE)
    else:
        tail = chunk({"content": ""}, "stop", usage=USAGE)
    relay = StreamRelay(include_usage)
    out = events(relay_all(relay, chunk({"content": "Hi"}), tail, DONE))
    assert relay.usage == USAGE
    finishes = [e for e in out if e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(finishes) == 1 and "usage" not in finishes[0]
    usage_events = [e for e in out if "usage" in e]
    if include_usage:
        assert usage_events == [usage_events[-1]] and out[-1] is usage_events[0] and out[-1]["choices"] == []
    else:
        assert usage_events == [] and all(e["choices"] for e in out)


@pytest.mark.parametrize(
    "bad",
    [
        chunk({"content": ""}, "error", error={"code": 502, "message": "Provider returned error"}),
        chunk(None, error={"code": "server_error", "message": "boom"}),
        b'data: {"error":{"message":"Rate limit exceeded","code":429},"user_id":"u"}\n\n',
        chunk({"content": ""}, "error"),
        b'data: {"choices":[{"delta":{"content":""},"finish_reason":"stop",'
        b'"native_finish_reason":"network_error"}]}\n\n',
        b'data: {"choices": [{"delta": \n\n',
    ],
)
def test_in_stream_errors_become_one_error_event(bad: bytes) -> None:
    relay = StreamRelay(include_usage=False)
    out = relay_all(relay, chunk({"content": "Hi"}), bad, chunk({"content": "more"}), DONE)
    parsed = events(out)
    assert parsed[0]["choices"][0]["delta"]["content"] == "Hi"
    assert len(parsed) == 2 and set(parsed[1]) == {"error"}
    assert {"message", "type", "param", "code"} <= set(parsed[1]["error"])
    assert relay.error is not None and relay.done
    assert b"[DONE]" not in out


def test_content_mentioning_error_is_not_an_error() -> None:
    stream = chunk({"content": "an error occurred in your code"}) + chunk({"content": ""}, "stop") + DONE
    relay = StreamRelay(include_usage=False)
    assert relay_all(relay, stream) == stream and relay.error is None


def test_cut_stream_ends_with_error_and_finished_stream_gets_done() -> None:
    relay = StreamRelay(include_usage=False)
    out = relay_all(relay, chunk({"content": "Hi"}))
    assert relay.error is not None and events(out)[-1]["error"]["code"] == "upstream_reset"
    relay = StreamRelay(include_usage=False)
    assert relay_all(relay, chunk({"content": "Hi"}), chunk({}, "stop")).endswith(DONE)


def test_crlf_and_multiline_data() -> None:
    relay = StreamRelay(include_usage=True)
    body = (
        b'data: {"choices":[],\r\ndata: "usage":{"prompt_tokens":1,"completion_tokens":1}}\r\n\r\ndata: [DONE]\r\n\r\n'
    )
    relay_all(relay, body)
    assert relay.usage == {"prompt_tokens": 1, "completion_tokens": 1}
