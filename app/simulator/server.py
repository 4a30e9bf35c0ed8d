"""The OpenRouter simulator's HTTP server (aiohttp.web), faithful to openrouter-api.md.

Serves `/api/v1/{models,chat/completions,completions,embeddings,generation,key}` (and, from
`responses_api.py` and `messages_api.py`, `/api/v1/{responses,messages}`) and keeps a
log of what it received and what it served at `/_sim/requests`. Per-request behaviour is
chosen by a `simulator` object in the request body (see `knobs.py`), so one server serves
every test: errors, in-stream error shapes, usage-chunk variants, latency, resets, hangs.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import struct
import time
from typing import Any

import orjson
from aiohttp import web

from app.simulator import generate
from app.simulator.catalogue import BY_ID, MODELS, public
from app.simulator.errors import error_body, error_response
from app.simulator.knobs import knobs_of
from app.simulator.record import Record, SimulatorLog

API = "/api/v1"
KEEPALIVE = b": OPENROUTER PROCESSING\n\n"


class Simulator:
    """The simulator's behaviour and memory; one per server."""

    def __init__(self, api_keys: set[str] | None = None, record: bool = True, keepalives: int = 2) -> None:
        self.api_keys = api_keys
        self.keepalives = keepalives
        self.log = SimulatorLog(enabled=record)
        self.attempts: dict[str, int] = {}
        self.generations: dict[str, dict[str, Any]] = {}
        self.generation_misses: dict[str, int] = {}

    def app(self) -> web.Application:
        from app.simulator import messages_api, responses_api  # they build on this module

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get(API + "/models", self.models)
        app.router.add_post(API + "/chat/completions", self.chat)
        app.router.add_post(API + "/completions", self.completions)
        app.router.add_post(API + "/responses", functools.partial(responses_api.serve, self))
        app.router.add_post(API + "/messages", functools.partial(messages_api.serve, self))
        app.router.add_post(API + "/embeddings", self.embeddings)
        app.router.add_get(API + "/generation", self.generation)
        app.router.add_get(API + "/key", self.key)
        app.router.add_get("/_sim/requests", self.requests)
        app.router.add_delete("/_sim/requests", self.clear)
        return app

    # -- control ---------------------------------------------------------------------------
    async def requests(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.log.entries()), content_type="application/json")

    async def clear(self, request: web.Request) -> web.Response:
        self.log.clear()
        return web.Response(status=204)

    # -- catalogue and account -------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        self.log.received(request, b"")
        data = [public(m) for m in MODELS]
        return _json({"data": data, "total_count": len(data), "links": {"next": None}})

    async def key(self, request: web.Request) -> web.Response:
        if (refused := self._refuse(request)) is not None:
            return refused
        return _json(
            {
                "data": {
                    "label": "sk-or-v1-sim...",
                    "limit": None,
                    "limit_remaining": None,
                    "usage": 0,
                    "is_free_tier": False,
                    "is_management_key": False,
                }
            }
        )

    async def generation(self, request: web.Request) -> web.Response:
        if (refused := self._refuse(request)) is not None:
            return refused
        gen_id = request.query.get("id", "")
        stats = self.generations.get(gen_id)
        misses = self.generation_misses.get(gen_id, 0)
        if stats is None or misses > 0:
            if stats is not None:
                self.generation_misses[gen_id] = misses - 1
            return error_response(404, {"message": f"Generation {gen_id} not found"})
        return _json({"data": stats})

    # -- inference -------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._infer(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._infer(request, "text")

    async def _infer(self, request: web.Request, kind: str) -> web.StreamResponse:
        raw = await request.read()
        record = self.log.received(request, raw)
        if (refused := self._refuse(request)) is not None:
            return record.answered(refused)
        payload, problem = _parse(raw)
        if problem is not None:
            return record.answered(problem)
        knobs = knobs_of(payload, self.attempts)
        record.knobs = knobs
        if (early := await self._faults_before_headers(request, knobs)) is not None:
            return record.answered(early)
        model, problem = _model_of(payload, kind)
        if problem is not None:
            return record.answered(problem)
        if (problem := _check_request(payload, model, kind)) is not None:
            return record.answered(problem)
        out = generate.produce(payload, knobs, model)
        gen = Generation(payload, knobs, model, out, kind, self.keepalives)
        self.generation_misses[gen.id] = int(knobs.get("generation_404s", 1))
        try:
            if payload.get("stream") is True:
                return await self._stream(request, gen, record)
            return record.answered(self._complete(gen, record))
        finally:
            self.generations[gen.id] = gen.stats()

    def _complete(self, gen: Generation, record: Record) -> web.Response:
        knobs = gen.knobs
        gen.emitted = gen.out.content
        gen.finished = True
        headers = {"X-Generation-Id": gen.id}
        record.served(gen)
        variant = knobs.get("error_body_200")
        if variant == "envelope":
            gen.billable = False
            record.served(gen)
            return _json(error_body(502, {"message": "Provider returned error"}), headers=headers)
        body = gen.completion_body()
        if variant == "choice":
            body["choices"][0].update(
                finish_reason="error",
                native_finish_reason="error",
                error=error_body(502, {"message": "Provider disconnected mid-generation"})["error"],
            )
        if knobs.get("malformed") == "json":
            return web.Response(
                body=b'{"id": "gen-broken", "choices": [', content_type="application/json", headers=headers
            )
        return _json(body, headers=headers)

    async def _stream(self, request: web.Request, gen: Generation, record: Record) -> web.StreamResponse:
        knobs = gen.knobs
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Generation-Id": gen.id}
        )
        record.stream = True
        await response.prepare(request)
        try:
            for _ in range(int(knobs.get("keepalives", gen.keepalives))):
                await response.write(KEEPALIVE)
            delay = float(knobs.get("chunk_delay_ms", 0)) / 1000
            variant = knobs.get("usage_variant", "empty_choices")
            chunks = gen.chunks()
            for index, chunk in enumerate(chunks):
                if (ended := await self._stream_fault(request, response, gen, index)) is not None:
                    record.served(gen)
                    return ended
                gen.note_sent(chunk)
                if index == len(chunks) - 1:
                    gen.finished = True
                    if variant == "finish":  # usage rides on the finish chunk itself
                        chunk = {**chunk, "usage": gen.usage()}
                await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
                if delay:
                    await asyncio.sleep(delay)
            gen.finished = True
            usage_chunk = gen.usage_chunk(variant)
            if usage_chunk is not None:
                await response.write(b"data: " + orjson.dumps(usage_chunk) + b"\n\n")
            if knobs.get("omit_done") is not True:
                await response.write(b"data: [DONE]\n\n")
            record.served(gen)
            await response.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            gen.cancelled = True
            record.disconnected(gen)
            raise
        return response

    async def _stream_fault(
        self, request: web.Request, response: web.StreamResponse, gen: Generation, index: int
    ) -> web.StreamResponse | None:
        knobs = gen.knobs
        if index == int(knobs.get("error_after", 1)) and knobs.get("stream_error"):
            await response.write(b"data: " + orjson.dumps(gen.stream_error(int(knobs["stream_error"]))) + b"\n\n")
            if knobs.get("done_after_error"):
                await response.write(b"data: [DONE]\n\n")
            gen.failed = True
            await response.write_eof()
            return response
        if index == knobs.get("reset_after"):
            gen.failed = True
            _reset(request)
            return response
        if index == knobs.get("stall_after"):
            await asyncio.sleep(3600)
        if index == knobs.get("malformed_after"):
            await response.write(b'data: {"id": "gen-broken", "choices": [{"delta": \n\n')
        return None

    async def _faults_before_headers(self, request: web.Request, knobs: dict[str, Any]) -> web.StreamResponse | None:
        if knobs.get("ttfb_ms"):
            await asyncio.sleep(float(knobs["ttfb_ms"]) / 1000)
        if knobs.get("hang"):
            await asyncio.sleep(3600)
        if knobs.get("reset") == "before_headers":
            _reset(request)
            return web.Response(status=500)
        if isinstance(knobs.get("status"), int) and knobs["status"] != 200:
            return error_response(knobs["status"], knobs)
        return None

    # -- embeddings ------------------------------------------------------------------------
    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        record = self.log.received(request, raw)
        if (refused := self._refuse(request)) is not None:
            return record.answered(refused)
        payload, problem = _parse(raw)
        if problem is not None:
            return record.answered(problem)
        knobs = knobs_of(payload, self.attempts)
        if (early := await self._faults_before_headers(request, knobs)) is not None:
            return record.answered(early)
        model, problem = _model_of(payload, "embedding")
        if problem is not None:
            return record.answered(problem)
        inputs = payload.get("input")
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            return record.answered(error_response(400, {"message": "input: Required"}))
        dimensions = payload.get("dimensions")
        dimensions = dimensions if isinstance(dimensions, int) and 0 < dimensions <= 8192 else 256
        data = []
        for index, item in enumerate(inputs):
            vector = generate.embedding(str(item), dimensions)
            encoded: Any = vector
            if payload.get("encoding_format") == "base64":
                encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "embedding": encoded, "index": index})
        tokens = generate.prompt_tokens({"input": inputs})
        usage = generate.usage(model, tokens, 0, 0, 0)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens, "cost": usage["cost"], "is_byok": False}
        gen_id = f"gen-emb-{int(time.time())}-{generate.random_id()}"
        record.served_usage(gen_id, model["id"], usage)
        body = {
            "object": "list",
            "data": data,
            "model": model["_upstream_name"],
            "usage": usage,
            "provider": model["_provider"],
            "id": gen_id,
        }
        return record.answered(_json(body, headers={"X-Generation-Id": gen_id}))

    # -- helpers ---------------------------------------------------------------------------
    def _refuse(self, request: web.Request) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            return error_response(401, {"message": "No auth credentials found"})
        if self.api_keys is not None and auth[7:].strip() not in self.api_keys:
            return error_response(401, {"message": "User not found."})
        return None


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
        for piece in _split(out.reasoning, 3):
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
        parts = _split(tool["function"]["arguments"], 3) or [""]
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


def _split(text: str, parts: int) -> list[str]:
    if not text:
        return []
    size = max(1, -(-len(text) // parts))
    return [text[i : i + size] for i in range(0, len(text), size)]


def _reset(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


def _parse(raw: bytes) -> tuple[dict[str, Any], web.Response | None]:
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {}, error_response(400, {"message": "Invalid JSON body"})
    if not isinstance(payload, dict):
        return {}, error_response(400, {"message": "Expected object, received " + type(payload).__name__})
    return payload, None


def _model_of(payload: dict[str, Any], kind: str) -> tuple[dict[str, Any], web.Response | None]:
    model_id = payload.get("model") or "openai/gpt-4o-mini"
    if not isinstance(model_id, str) or "/" not in model_id:
        return {}, error_response(
            400, {"message": f"{model_id} is not a valid model ID", "error_type": "invalid_request"}
        )
    base = model_id if model_id in BY_ID else model_id.rsplit(":", 1)[0]
    model = BY_ID.get(base)
    if model is None:
        return {}, error_response(404, {"message": f"No endpoints found for {model_id}.", "error_type": "not_found"})
    is_embedding = model["architecture"]["output_modalities"] == ["embeddings"]
    if is_embedding != (kind == "embedding"):
        return {}, error_response(
            400, {"message": f"{model_id} does not support this endpoint", "error_type": "invalid_request"}
        )
    return model, None


def _check_request(payload: dict[str, Any], model: dict[str, Any], kind: str) -> web.Response | None:
    if kind == "chat" and not isinstance(payload.get("messages"), list):
        return error_response(
            400,
            {
                "message": '[{"code":"invalid_type","expected":"array","received":"undefined",'
                '"path":["messages"],"message":"Required"}]',
                "error_type": "invalid_request",
            },
        )
    if kind == "text" and not isinstance(payload.get("prompt"), (str, list)):
        return error_response(400, {"message": "prompt: Required", "error_type": "invalid_request"})
    reasoning = payload.get("reasoning")
    if isinstance(reasoning, dict) and "effort" in reasoning and "max_tokens" in reasoning:
        return error_response(
            400,
            {
                "message": "Only one of reasoning.effort and reasoning.max_tokens may be set",
                "error_type": "invalid_request",
            },
        )
    effort = payload.get("reasoning_effort")
    if effort is not None and isinstance(reasoning, dict) and reasoning.get("effort") not in (None, effort):
        return error_response(
            400, {"message": "reasoning_effort contradicts reasoning.effort", "error_type": "invalid_request"}
        )
    if model["_reasoning_format"] == "anthropic-claude-v1" and generate.bad_signature(payload):
        return error_response(
            400,
            {
                "message": "messages.1.content.0: Invalid `signature` in `thinking` block",
                "error_type": "invalid_request",
            },
        )
    return None
