"""app/dialects/: what each API module reads and writes, without a server: usage from bodies and
stream events, the relays' pass-through and endings, reasoning defaults, error envelopes."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
import pytest

from app.dialects import CHAT, EMBEDDINGS, MESSAGES, RESPONSES, ROUTES
from app.dialects.messages import thinking_of
from app.errors import (
    BudgetExceededError,
    InvalidRequestError,
    ServerShuttingDownError,
    StoreUnavailableError,
    UpstreamConnectionError,
)
from app.usage.record import Usage
from tests.agent_support import parse_sse


def sse(kind: str | None, data: dict[str, Any]) -> bytes:
    named = f"event: {kind}\n".encode() if kind else b""
    return named + b"data: " + orjson.dumps(data) + b"\n\n"


def events(raw: bytes) -> list[tuple[str | None, Any]]:
    return parse_sse(raw.decode())


def test_every_api_answers_under_both_prefixes() -> None:
    for prefix in ("/v1", "/api/v1"):
        assert ROUTES[prefix + "/responses"] is RESPONSES
        assert ROUTES[prefix + "/messages"] is MESSAGES
        assert ROUTES[prefix + "/chat/completions"] is CHAT
        assert ROUTES[prefix + "/embeddings"] is EMBEDDINGS


def test_usage_of_each_api_in_openrouter_terms() -> None:
    responses = {
        "usage": {
            "input_tokens": 120,
            "input_tokens_details": {"cached_tokens": 100},
            "output_tokens": 30,
            "output_tokens_details": {"reasoning_tokens": 12},
            "total_tokens": 150,
            "cost": 0.000123,
        }
    }
    assert RESPONSES.usage_of(responses) == Usage(120, 30, 12, 100, Decimal("0.000123"))
    messages = {
        "usage": {
            "input_tokens": 20,
            "cache_read_input_tokens": 100,
            "cache_creation_input_tokens": 7,
            "output_tokens": 30,
            "cost": 0.5,
        }
    }
    assert MESSAGES.usage_of(messages) == Usage(127, 30, 0, 100, Decimal("0.5"))
    assert MESSAGES.usage_of({"usage": {"input_tokens": 3, "output_tokens": 4}}) == Usage(3, 4, 0, 0, None)
    assert RESPONSES.usage_of({"usage": None}) is None


def test_responses_relay_passes_events_as_they_came_and_reads_the_terminal_one() -> None:
    relay = RESPONSES.relay(False)
    created = sse("response.created", {"type": "response.created", "response": {"id": "resp_1", "created_at": 5}})
    delta = sse(
        "response.output_text.delta", {"type": "response.output_text.delta", "delta": "Hi", "sequence_number": 2}
    )
    usage = {"input_tokens": 9, "output_tokens": 2, "output_tokens_details": {"reasoning_tokens": 0}, "cost": 0.25}
    done = sse(
        "response.completed",
        {"type": "response.completed", "response": {"id": "resp_1", "model": "m", "usage": usage, "error": None}},
    )
    stream = b": OPENROUTER PROCESSING\n\n" + created + delta + done + b"data: [DONE]\n\n"
    out = b"".join(relay.feed(stream[i : i + 7]) for i in range(0, len(stream), 7)) + relay.end()
    assert out == stream  # byte for byte: names, comments, [DONE]
    assert relay.billed() == Usage(9, 2, 0, 0, Decimal("0.25")) and relay.model == "m"
    assert relay.error is None and relay.done


@pytest.mark.parametrize(
    "failure",
    [
        {"type": "error", "code": "server_error", "message": "Provider returned error", "sequence_number": 3},
        {"type": "error", "error": {"code": 502, "message": "Provider returned error"}, "sequence_number": 3},
    ],
)
def test_responses_relay_makes_an_error_event_a_response_failed(failure: dict[str, Any]) -> None:
    relay = RESPONSES.relay(False)
    created = sse("response.created", {"type": "response.created", "response": {"id": "resp_7", "created_at": 5}})
    out = relay.feed(created + sse("error", failure)) + relay.end()
    (_, first), (name, last) = events(out)
    assert first["type"] == "response.created"
    assert name == "response.failed" and last["type"] == "response.failed" and "error" not in last
    assert last["response"]["status"] == "failed" and last["response"]["id"] == "resp_7"
    assert last["response"]["error"]["message"] == "Provider returned error"
    assert relay.error is not None


def test_responses_relay_ends_a_cut_stream_with_response_failed() -> None:
    relay = RESPONSES.relay(False)
    out = relay.feed(sse(None, {"type": "response.output_text.delta", "delta": "Hi"})) + relay.end()
    name, last = events(out)[-1]
    assert name == "response.failed" and last["response"]["error"]["code"] == "upstream_reset"
    assert isinstance(relay.error, UpstreamConnectionError)


def test_messages_relay_takes_counts_from_start_then_the_last_delta() -> None:
    relay = MESSAGES.relay(False)
    start = sse(
        "message_start",
        {
            "type": "message_start",
            "message": {"model": "anthropic/claude", "usage": {"input_tokens": 0, "output_tokens": 0}},
        },
    )
    delta = sse(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {"input_tokens": 11, "cache_read_input_tokens": 4, "output_tokens": 6},
        },
    )
    stream = start + b'event: ping\ndata: {"type": "ping"}\n\n' + delta + sse("message_stop", {"type": "message_stop"})
    out = relay.feed(stream) + relay.end()
    assert out == stream
    assert relay.billed() == Usage(15, 6, 0, 4, None) and relay.model == "anthropic/claude"


def test_messages_relay_ends_a_cut_stream_with_an_error_event() -> None:
    relay = MESSAGES.relay(False)
    out = relay.feed(sse("message_start", {"type": "message_start", "message": {}})) + relay.end()
    name, last = events(out)[-1]
    assert name == "error" and last["type"] == "error" and last["error"]["type"] == "api_error"


def test_errors_render_in_the_dialect_of_the_route() -> None:
    budget = BudgetExceededError("Budget exhausted.")
    status, body = MESSAGES.render_error(budget)
    assert status == 429 and orjson.loads(body) == {
        "type": "error",
        "error": {"type": "billing_error", "message": "Budget exhausted.", "code": "insufficient_quota"},
    }
    assert budget.headers["x-should-retry"] == "false"
    status, body = MESSAGES.render_error(StoreUnavailableError("down"))
    assert status == 529 and orjson.loads(body)["error"]["type"] == "overloaded_error"
    status, body = MESSAGES.render_error(InvalidRequestError("bad", status=413, code="request_too_large"))
    assert status == 413 and orjson.loads(body)["error"]["type"] == "request_too_large"
    status, body = RESPONSES.render_error(budget)
    assert status == 429 and orjson.loads(body)["error"]["type"] == "insufficient_quota"


def test_reasoning_defaults_become_thinking_for_messages() -> None:
    assert thinking_of({"max_tokens": 3000}) == {"type": "enabled", "budget_tokens": 3000}
    assert thinking_of({"effort": "high"}) == {"type": "enabled", "budget_tokens": 16384}
    assert thinking_of({"enabled": False}) == {"type": "disabled"}
    assert MESSAGES.defaults({"reasoning": {"enabled": True}, "temperature": 0}, {}) == {
        "thinking": {"type": "enabled", "budget_tokens": 8192},
        "temperature": 0,
    }
    # below the request's max_tokens, as Anthropic requires; none if under its least (1,024)
    assert MESSAGES.defaults({"reasoning": {"effort": "high"}}, {"max_tokens": 4000}) == {
        "thinking": {"type": "enabled", "budget_tokens": 3999}
    }
    assert MESSAGES.defaults({"reasoning": {"effort": "high"}}, {"max_tokens": 512}) == {}
    assert RESPONSES.defaults({"reasoning": {"effort": "low"}}, {}) == {"reasoning": {"effort": "low"}}


def test_responses_refuses_what_needs_state() -> None:
    for body in (
        {"input": "hi", "store": True},
        {"input": "hi", "store": None},
        {"input": "hi", "previous_response_id": "r"},
    ):
        with pytest.raises(InvalidRequestError, match="stateless"):
            RESPONSES.check(body)
    RESPONSES.check({"input": "hi", "store": False})


def test_session_headers_become_x_session_id() -> None:
    assert RESPONSES.upstream_headers({"session-id": "abc"}, {}) == {"x-session-id": "abc"}
    assert RESPONSES.upstream_headers({"session_id": "old"}, {}) == {"x-session-id": "old"}
    assert RESPONSES.upstream_headers({}, {"prompt_cache_key": "conv"}) == {"x-session-id": "conv"}
    passed = MESSAGES.upstream_headers(
        {"anthropic-version": "2023-06-01", "anthropic-beta": "a,b", "x-claude-code-session-id": "s"}, {}
    )
    assert passed == {
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "a,b",
        "x-anthropic-beta": "a,b",
        "x-session-id": "s",
    }
    assert MESSAGES.credential({"x-api-key": "k"}) == "Bearer k"
    assert MESSAGES.credential({"x-api-key": "k", "authorization": "Bearer b"}) == "Bearer b"


@pytest.mark.parametrize("dialect", [RESPONSES, MESSAGES])
def test_a_crlf_split_between_reads_is_one_boundary(dialect: Any) -> None:
    """`\\r\\n\\r` in one read and `\\n` in the next: still an event boundary, nothing failed."""
    if dialect is RESPONSES:
        first = {"type": "response.output_text.delta", "delta": "Hi"}
        last = {"type": "response.completed", "response": {"usage": {"input_tokens": 1, "output_tokens": 1}}}
    else:
        first = {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hi"}}
        last = {"type": "message_stop"}
    stream = (sse(first["type"], first) + sse(last["type"], last)).replace(b"\n", b"\r\n")
    relay = dialect.relay(False)
    cut = stream.index(b"\r\n\r\n") + 3
    out = relay.feed(stream[:cut]) + relay.feed(stream[cut:]) + relay.end()
    assert [data for _, data in events(out)] == [first, last]
    assert relay.error is None


@pytest.mark.parametrize("dialect", [RESPONSES, MESSAGES])
def test_nothing_is_added_once_the_last_event_came(dialect: Any) -> None:
    """The connection breaking, or the drain ending it, after `response.completed` or
    `message_stop` (before `[DONE]`): the client's stream is complete, and it is not an error."""
    last = (
        sse("response.completed", {"type": "response.completed", "response": {}})
        if dialect is RESPONSES
        else sse("message_stop", {"type": "message_stop"})
    )
    for failure in (UpstreamConnectionError("reset"), ServerShuttingDownError("bye")):
        relay = dialect.relay(False)
        assert relay.feed(last) == last
        assert relay.fail(failure) == b"" and relay.error is None and relay.done


@pytest.mark.parametrize("dialect", [RESPONSES, MESSAGES])
def test_done_before_the_last_event_is_a_failure_not_a_silent_end(dialect: Any) -> None:
    relay = dialect.relay(False)
    out = relay.feed(sse(None, {"type": "response.in_progress"}) + b"data: [DONE]\n\n") + relay.end()
    named = [name for name, _ in events(out)]
    assert named[-2] == ("response.failed" if dialect is RESPONSES else "error") and named[-1] is None
    assert relay.error is not None


def test_an_untyped_error_and_its_string_code_reach_the_client_as_response_failed() -> None:
    """OpenRouter's untyped `{"error": ...}` never goes on as a top-level error key, and a code
    Codex acts on (`rate_limit_exceeded`) survives into `response.failed`."""
    for event in (
        {"error": {"code": 502, "message": "Provider returned error"}},
        {"type": "error", "error": {"code": "rate_limit_exceeded", "message": "slow down"}},
    ):
        relay = RESPONSES.relay(False)
        name, failed = events(relay.feed(sse(None, event)))[-1]
        assert name == "response.failed" and "error" not in failed
        code = event["error"]["code"]  # type: ignore[index]
        assert failed["response"]["error"]["code"] == (code if isinstance(code, str) else "upstream_error")


def test_chat_relay_takes_a_crlf_split_between_reads_as_one_boundary() -> None:
    chunk = {"id": "gen-1", "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop"}]}
    stream = (b"data: " + orjson.dumps(chunk) + b"\n\ndata: [DONE]\n\n").replace(b"\n", b"\r\n")
    relay = CHAT.relay(False)
    cut = stream.index(b"\r\n\r\n") + 3
    out = relay.feed(stream[:cut]) + relay.feed(stream[cut:]) + relay.end()
    assert [data for _, data in events(out)] == [chunk, "[DONE]"] and relay.error is None
