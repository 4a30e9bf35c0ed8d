"""OpenRouterClient: the one shared aiohttp session to OpenRouter, and the only place that
translates aiohttp's exceptions into the gateway's error tree.

    asyncio.TimeoutError         -> UpstreamTimeoutError
    aiohttp.ClientConnectorError -> UpstreamConnectionError(code="upstream_unreachable")
    other aiohttp / OS errors    -> UpstreamConnectionError(code="upstream_reset")
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import orjson
from yarl import URL

from app import __version__
from app.errors import UpstreamConnectionError, UpstreamTimeoutError
from app.settings import AttributionSettings, UpstreamSettings

USER_AGENT = f"openrouter-gateway/{__version__}"


def open_session(settings: UpstreamSettings) -> aiohttp.ClientSession:
    """The shared upstream session; call inside a running event loop (the app's lifespan)."""
    connector = aiohttp.TCPConnector(
        limit=settings.max_connections, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=30
    )
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=settings.connect_timeout_s, sock_read=settings.read_timeout_s
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        read_bufsize=2**16,
        headers={"User-Agent": USER_AGENT},
        cookie_jar=aiohttp.DummyCookieJar(),  # an API client keeps no cookies (and skips their per-request work)
    )


def attribution_headers(attribution: AttributionSettings) -> dict[str, str]:
    """OpenRouter's app-attribution headers, the legacy `X-Title` included."""
    headers = {
        "HTTP-Referer": attribution.app_url,
        "X-OpenRouter-Title": attribution.app_title,
        "X-Title": attribution.app_title,
    }
    if attribution.categories:
        headers["X-OpenRouter-Categories"] = ",".join(attribution.categories)
    return headers


class UpstreamResponse:
    """A response from OpenRouter whose body has not been read yet."""

    __slots__ = ("_response", "body", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers = response.headers
        self.body: bytes | None = None  # read already, when asked to

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except BaseException as exc:
            raise self.broken(exc) from exc

    def reader(self) -> Callable[[], Awaitable[bytes]]:
        """Reads the next piece of the body as the network delivers it (b"" at the end). The
        relay loop calls it directly, one frame less per chunk, and `broken` on an error."""
        return self._response.content.readany

    def broken(self, exc: BaseException) -> BaseException:
        """Reading the body failed: drop the connection; the error to raise instead."""
        self._response.close()
        return _translate(exc)

    def release(self) -> None:
        """Hand the connection back to the pool (the body was read to the end)."""
        self._response.release()

    def close(self) -> None:
        """Drop the connection: OpenRouter sees the request cancelled."""
        self._response.close()

    async def settle(self, wait_s: float = 0.05) -> None:
        """Keep the connection for reuse if the body ends (it usually does right after the
        last event), else drop it."""
        content = self._response.content
        try:
            async with asyncio.timeout(wait_s):
                while not content.at_eof() and await content.readany():
                    pass
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass
        if content.at_eof():
            self._response.release()
        else:
            self._response.close()


class OpenRouterClient:
    def __init__(self, session: aiohttp.ClientSession, settings: UpstreamSettings) -> None:
        self._session = session
        self._base_url = settings.base_url
        self._urls: dict[str, URL] = {}  # path -> parsed URL, so no request parses its URL again
        key = settings.api_key.get_secret_value() if settings.api_key else ""
        self._auth = f"Bearer {key}" if key else ""

    def auth_header(self, key_override: str | None = None) -> str:
        return f"Bearer {key_override}" if key_override else self._auth

    async def post(
        self,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        first_byte_timeout: float,
        read_within: float | None = None,
    ) -> UpstreamResponse:
        """POST and wait for the response headers, at most `first_byte_timeout` seconds; with
        `read_within`, also read the whole body by then (one timer for both)."""
        response: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout(first_byte_timeout) as timer:
                url = self._urls.get(path)
                if url is None:
                    url = self._urls[path] = URL(self._base_url + path)
                response = await self._session.post(url, data=body, headers=headers)
                upstream = UpstreamResponse(response)
                if read_within is not None and response.status < 300:
                    timer.reschedule(asyncio.get_running_loop().time() + read_within)
                    upstream.body = await response.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            if response is not None:
                response.close()
            raise _translate(exc) from exc
        return upstream

    async def get_json(
        self, path: str, timeout: float, params: Mapping[str, str] | None = None, auth: str | None = None
    ) -> tuple[int, Any]:
        """GET a JSON document; returns its status and parsed body (None if not JSON)."""
        auth = auth or self._auth
        headers = {"Authorization": auth} if auth else {}
        try:
            async with asyncio.timeout(timeout):
                async with self._session.get(self._base_url + path, headers=headers, params=params) as response:
                    raw = await response.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise _translate(exc) from exc
        try:
            return response.status, orjson.loads(raw)
        except orjson.JSONDecodeError:
            return response.status, None


def _translate(exc: BaseException) -> BaseException:
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamTimeoutError("OpenRouter did not answer in time.")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamConnectionError("Could not connect to OpenRouter.", code="upstream_unreachable")
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return UpstreamConnectionError("The connection to OpenRouter broke before the response was complete.")
    return exc
