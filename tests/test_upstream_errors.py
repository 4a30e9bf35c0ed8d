"""OpenRouter's errors, in every observed shape, reach OpenAI SDKs as the exception class and
OpenAI error body of DESIGN §5; in-stream errors raise mid-iteration, never hang."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from app.simulator import SimulatorThread
from tests.support import request_id

HELLO = [{"role": "user", "content": "Hello"}]
MODEL = "openai/gpt-4o-mini"


def envelope(error: openai.APIStatusError) -> dict[str, Any]:
    body = error.response.json()
    assert set(body) == {"error"}
    assert {"message", "type", "param", "code"} <= set(body["error"])
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["type"], str) and isinstance(body["error"]["code"], str)
    assert error.response.headers.get("x-request-id")
    result: dict[str, Any] = body["error"]
    return result


@pytest.mark.parametrize(
    ("upstream", "status", "exception", "code"),
    [
        (400, 400, openai.BadRequestError, "invalid_request"),
        (401, 503, openai.InternalServerError, "upstream_auth_failed"),
        (402, 503, openai.InternalServerError, "upstream_insufficient_credits"),
        (403, 403, openai.PermissionDeniedError, "content_policy_violation"),
        (404, 404, openai.NotFoundError, "not_found"),
        (408, 408, openai.APIStatusError, "timeout"),
        (413, 413, openai.APIStatusError, "payload_too_large"),
        (422, 422, openai.UnprocessableEntityError, "unprocessable"),
        (429, 429, openai.RateLimitError, "rate_limit_exceeded"),
        (500, 502, openai.InternalServerError, "upstream_error"),
        (502, 502, openai.InternalServerError, "upstream_error"),
        (503, 502, openai.InternalServerError, "upstream_error"),
        (524, 504, openai.InternalServerError, "upstream_timeout"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_status_errors(
    client: openai.OpenAI, upstream: int, status: int, exception: type[Exception], code: str, stream: bool
) -> None:
    with pytest.raises(exception) as caught:
        client.chat.completions.create(
            model=MODEL, messages=HELLO, stream=stream, extra_body={"simulator": {"status": upstream}}
        )
    error = caught.value
    assert isinstance(error, openai.APIStatusError) and error.status_code == status
    body = envelope(error)
    assert body["code"] == code
    if upstream in (401, 402):
        assert error.response.headers["x-should-retry"] == "false"
        assert body["type"] == "server_error"
    if upstream == 403:
        assert body["metadata"]["reasons"] == ["harassment"]  # OpenRouter's details kept
    if upstream == 429:
        assert body["type"] == "requests"


def test_messages_of_openrouter_kept(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            extra_body={
                "simulator": {
                    "status": 400,
                    "message": "This endpoint's maximum context length is 128000 tokens.",
                    "error_type": "context_length_exceeded",
                }
            },
        )
    body = envelope(caught.value)
    assert body["message"] == "This endpoint's maximum context length is 128000 tokens."
    assert body["code"] == "context_length_exceeded"
    assert body["type"] == "invalid_request_error"


def test_retry_after_passed_on(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=HELLO, extra_body={"simulator": {"status": 429, "retry_after": 7}}
        )
    assert caught.value.response.headers["retry-after"] == "7"


@pytest.mark.parametrize(
    ("sent", "passed"), [("2.2", "3"), ("Wed, 21 Oct 2015 07:28:00 GMT", "0"), ("soon", None), ("-5", None)]
)
def test_retry_after_reaches_the_client_in_seconds_or_not_at_all(
    client: openai.OpenAI, sent: str, passed: str | None
) -> None:
    """SDKs read whole seconds or an HTTP date; a value they cannot read is not passed on."""
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=HELLO, extra_body={"simulator": {"status": 429, "retry_after": sent}}
        )
    assert caught.value.response.headers.get("retry-after") == passed


def test_in_flight_402_is_told_apart(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=HELLO, extra_body={"simulator": {"status": 402, "in_flight": True}}
        )
    assert envelope(caught.value)["code"] == "upstream_in_flight_budget"
    assert caught.value.response.headers["retry-after"] == "1"


@pytest.mark.parametrize("variant", ["envelope", "choice"])
def test_http_200_with_error_body(client: openai.OpenAI, variant: str) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=HELLO, extra_body={"simulator": {"error_body_200": variant}}
        )
    assert caught.value.status_code == 502
    body = envelope(caught.value)
    assert body["code"] == "upstream_error"
    assert "Provider" in body["message"]


def test_malformed_json_from_upstream(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model=MODEL, messages=HELLO, extra_body={"simulator": {"malformed": "json"}})
    assert envelope(caught.value)["code"] == "upstream_invalid_response"


def test_reset_before_headers(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=HELLO, extra_body={"simulator": {"reset": "before_headers"}}
        )
    assert caught.value.status_code == 502
    assert envelope(caught.value)["code"] == "upstream_reset"


@pytest.mark.parametrize("shape", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("done_after_error", [False, True])
def test_in_stream_error_shapes(client: openai.OpenAI, shape: int, done_after_error: bool) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        stream=True,
        extra_body={"simulator": {"stream_error": shape, "error_after": 2, "done_after_error": done_after_error}},
    )
    received = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            received.append(chunk)
    assert not isinstance(caught.value, openai.APIStatusError)  # a mid-stream error, after a 200
    assert len(received) == 2  # the chunks before the error arrived intact
    assert all(c.object == "chat.completion.chunk" and c.choices for c in received)
    body = caught.value.body
    assert isinstance(body, dict) and isinstance(body["message"], str) and body["message"]
    assert body["type"] in ("server_error", "requests")


@pytest.mark.parametrize(
    "knobs",
    [
        {"reset_after": 3},
        {"omit_done": True, "usage_variant": "none", "error_after": 99, "reset_after": 4},
        {"malformed_after": 2},
    ],
    ids=["reset", "cut-without-finish", "malformed-sse"],
)
def test_broken_streams_end_with_an_error_event(client: openai.OpenAI, knobs: dict[str, Any]) -> None:
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, stream=True, extra_body={"simulator": knobs})
    with pytest.raises(openai.APIError) as caught:
        for _ in stream:
            pass
    assert not isinstance(caught.value, openai.APIStatusError)
    assert isinstance(caught.value.body, dict) and caught.value.body["code"] in (
        "upstream_reset",
        "upstream_invalid_response",
    )


def test_stream_without_done_still_ends_cleanly(http: httpx.Client) -> None:
    """OpenRouter may end a finished stream without `[DONE]`; the client still gets one."""
    with http.stream(
        "POST",
        "/v1/chat/completions",
        json={"model": MODEL, "messages": HELLO, "stream": True, "simulator": {"omit_done": True}},
    ) as response:
        text = response.read().decode()
    assert text.endswith("data: [DONE]\n\n")
    assert '"error"' not in text


def test_keepalive_comments_stay_comments(http: httpx.Client) -> None:
    with http.stream(
        "POST",
        "/v1/chat/completions",
        json={"model": MODEL, "messages": HELLO, "stream": True, "simulator": {"keepalives": 6}},
    ) as response:
        events = [e for e in response.read().decode().split("\n\n") if e]
    assert events[:6] == [": OPENROUTER PROCESSING"] * 6
    assert all(e.startswith("data: ") for e in events[6:])
    assert events[-1] == "data: [DONE]"


def test_unknown_model_is_404_before_upstream(client: openai.OpenAI, simulator: SimulatorThread) -> None:
    rid = request_id()
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(
            model="nobody/no-such-model", messages=HELLO, extra_headers={"x-request-id": rid}
        )
    assert envelope(caught.value)["code"] == "model_not_found"
    assert simulator.find(rid) == []


def test_model_variants_and_routers_are_known(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="openai/gpt-4o-mini:nitro", messages=HELLO)
    assert reply.choices[0].message.content
