"""The OpenRouter simulator's HTTP server (aiohttp.web), faithful to openrouter-api.md.

Serves `/api/v1/{models,chat/completions,completions,embeddings,generation,key}` (and, from
`responses_api.py` and `messages_api.py`, `/api/v1/{responses,messages}`) and keeps a
log of what it received and what it served at `/_sim/requests`. Per-request behaviour is
chosen by a `simulator` object in the request body (see `knobs.py`), so one server serves
every test: errors, in-stream error shapes, usage-chunk variants, latency, resets, hangs.
A chat or text completion's body and chunks are its `Generation` (`generation.py`); what every
endpoint does the same way (the JSON body, the model, faults before the headers) is `http.py`.
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

from app.simulator import generate, messages_api, responses_api
from app.simulator.catalogue import MODELS, public
from app.simulator.errors import error_body, error_response
from app.simulator.generation import Generation
from app.simulator.http import KEEPALIVE, faults_before_headers, json_response, model_of, parse_body, reset
from app.simulator.knobs import knobs_of
from app.simulator.record import Record, SimulatorLog

API = "/api/v1"


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
        return json_response({"data": data, "total_count": len(data), "links": {"next": None}})

    async def key(self, request: web.Request) -> web.Response:
        if (refused := self.refuse(request)) is not None:
            return refused
        return json_response(
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
        if (refused := self.refuse(request)) is not None:
            return refused
        gen_id = request.query.get("id", "")
        stats = self.generations.get(gen_id)
        misses = self.generation_misses.get(gen_id, 0)
        if stats is None or misses > 0:
            if stats is not None:
                self.generation_misses[gen_id] = misses - 1
            return error_response(404, {"message": f"Generation {gen_id} not found"})
        return json_response({"data": stats})

    # -- inference -------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._infer(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._infer(request, "text")

    async def _infer(self, request: web.Request, kind: str) -> web.StreamResponse:
        raw = await request.read()
        record = self.log.received(request, raw)
        if (refused := self.refuse(request)) is not None:
            return record.answered(refused)
        payload, problem = parse_body(raw)
        if problem is not None:
            return record.answered(problem)
        knobs = knobs_of(payload, self.attempts)
        record.knobs = knobs
        if (early := await faults_before_headers(request, knobs)) is not None:
            return record.answered(early)
        model, problem = model_of(payload, kind)
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
            return json_response(error_body(502, {"message": "Provider returned error"}), headers=headers)
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
        return json_response(body, headers=headers)

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
            reset(request)
            return response
        if index == knobs.get("stall_after"):
            await asyncio.sleep(3600)
        if index == knobs.get("malformed_after"):
            await response.write(b'data: {"id": "gen-broken", "choices": [{"delta": \n\n')
        return None

    # -- embeddings ------------------------------------------------------------------------
    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        record = self.log.received(request, raw)
        if (refused := self.refuse(request)) is not None:
            return record.answered(refused)
        payload, problem = parse_body(raw)
        if problem is not None:
            return record.answered(problem)
        knobs = knobs_of(payload, self.attempts)
        if (early := await faults_before_headers(request, knobs)) is not None:
            return record.answered(early)
        model, problem = model_of(payload, "embedding")
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
        return record.answered(json_response(body, headers={"X-Generation-Id": gen_id}))

    # -- helpers ---------------------------------------------------------------------------
    def refuse(self, request: web.Request) -> web.Response | None:
        """OpenRouter's 401 unless the request carries a bearer key (one of `api_keys`, if set)."""
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            return error_response(401, {"message": "No auth credentials found"})
        if self.api_keys is not None and auth[7:].strip() not in self.api_keys:
            return error_response(401, {"message": "User not found."})
        return None


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
