"""The yardstick: a bare FastAPI + aiohttp pass-through (no auth, limits, metering or checks).

python bench/bare.py --port 8091 --upstream http://127.0.0.1:8090/api/v1 --key sk-or-…

One relay for every API the bench measures: `/v1/X` goes to `{upstream}/X`, byte for byte.
"""

import argparse
from contextlib import asynccontextmanager

import aiohttp
import uvicorn
from fastapi import FastAPI, Request
from starlette.responses import Response, StreamingResponse

PATHS = ("/chat/completions", "/responses", "/messages")


def create_app(upstream: str, key: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1024))
        yield
        await app.state.session.close()

    app = FastAPI(lifespan=lifespan)

    def relay_to(url: str):  # the URL bound per route: chat pays nothing for the other two
        async def relay(request: Request) -> Response:
            body = await request.body()
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            upstream_response = await request.app.state.session.post(url, data=body, headers=headers)
            if upstream_response.content_type == "text/event-stream":

                async def chunks():
                    async for chunk in upstream_response.content.iter_any():
                        yield chunk
                    upstream_response.release()

                return StreamingResponse(chunks(), media_type="text/event-stream")
            content = await upstream_response.read()
            return Response(content, status_code=upstream_response.status, media_type="application/json")

        return relay

    for path in PATHS:
        app.add_api_route("/v1" + path, relay_to(upstream + path), methods=["POST"])
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.upstream, args.key),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )
