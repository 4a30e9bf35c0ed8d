"""The API documentation pages (/docs, /redoc) work on an air-gapped host: they reference nothing
outside the gateway, and every file they load is served by it with the right content type."""

from __future__ import annotations

import re
from urllib.parse import urljoin

import httpx
import pytest

from tests.support import GatewayServer

# what a page can load: src/href attributes, Swagger UI's `url: '...'` and ReDoc's spec-url
REFERENCE = re.compile(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']|\burl\s*:\s*["']([^"']+)["']""")
ANY_URL = re.compile(r"""https?://[^\s"'<>)]+""")
CONTENT_TYPES = {
    ".js": ("text/javascript", "application/javascript"),
    ".css": ("text/css",),
    ".png": ("image/png",),
    ".json": ("application/json",),
}


def references(html: str) -> list[str]:
    return [first or second for first, second in REFERENCE.findall(html)]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_page_references_nothing_outside_the_gateway(gateway: GatewayServer, page: str) -> None:
    answer = httpx.get(gateway.url + page, timeout=20)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
    outside = [url for url in ANY_URL.findall(answer.text) if not url.startswith(gateway.url + "/")]
    assert not outside, outside
    found = references(answer.text)
    assert any(path.endswith(".js") for path in found) and any(path.endswith(".json") for path in found), found
    for path in found:
        assert not path.startswith("//"), path  # protocol-relative: another host


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_every_file_the_page_loads_is_served(gateway: GatewayServer, page: str) -> None:
    html = httpx.get(gateway.url + page, timeout=20).text
    with httpx.Client(timeout=20) as http:
        for path in references(html):
            url = urljoin(gateway.url + page, path)
            answer = http.get(url)
            assert answer.status_code == 200, (path, answer.status_code)
            suffix = "." + path.rsplit(".", 1)[-1]
            kind = answer.headers["content-type"].split(";")[0]
            assert kind in CONTENT_TYPES[suffix], (path, kind)
            assert answer.content, path


def test_swagger_ui_renders_the_openapi_3_1_schema(gateway: GatewayServer) -> None:
    """FastAPI writes OpenAPI 3.1, which Swagger UI renders from version 5 on (4.x, as some
    bundles ship it, shows 'Unable to render this definition')."""
    schema = httpx.get(gateway.url + "/openapi.json", timeout=20).json()
    assert schema["openapi"].startswith("3.1")
    html = httpx.get(gateway.url + "/docs", timeout=20).text
    bundle = next(path for path in references(html) if path.endswith("swagger-ui-bundle.js"))
    assert b"oas31" in httpx.get(urljoin(gateway.url, bundle), timeout=20).content
    assert "validatorUrl" in html and '"validatorUrl": null' in html.replace("'", '"')  # no call to swagger.io
