"""The error table of docs/errors.md and the gateway agree: every error code the code can
produce has a row, and a refusal carries the headers its row names (the concurrency 429, which
has no `x-ratelimit-*`)."""

from __future__ import annotations

import ast
import re
import threading
import uuid
from pathlib import Path

import httpx

from app import errors
from app.normalize import response
from app.simulator import SimulatorThread
from tests.support import ADMIN_KEY, GatewayServer, wait_until

ROOT = Path(__file__).resolve().parent.parent
HELLO = [{"role": "user", "content": "Hello there"}]
TICKED = re.compile(r"`([^`]+)`")


def rows() -> list[dict[str, str]]:
    """The table of docs/errors.md (the page "# Errors"), one dict per row, keyed by its header cells."""
    page = (ROOT / "docs" / "errors.md").read_text()
    section = page[page.index("# Errors\n") :]
    section = section[: section.index("\n## ")] if "\n## " in section else section
    lines = [line for line in section.splitlines() if line.startswith("|")]
    names = [cell.strip().strip("`").split(" ")[0] for cell in lines[0].strip("|").split("|")]
    return [dict(zip(names, (cell.strip() for cell in line.strip("|").split("|")), strict=True)) for line in lines[2:]]


def produced_codes() -> set[str]:
    """Every `code` the gateway can put in an error: each class's in app/errors.py, each `code`
    given to an error anywhere in app/ (the simulator plays OpenRouter: not ours), the codes
    OpenRouter's statuses map to, and `http_<status>` for FastAPI's own HTTP errors."""
    codes = {cls.code for cls in _error_classes() if cls.code}
    codes |= set(response._CODE_BY_STATUS.values())
    for path in (ROOT / "app").rglob("*.py"):
        if "simulator" not in path.parts:
            for node in ast.walk(ast.parse(path.read_text())):
                codes |= _codes_in(node)
    return codes


def _codes_in(node: ast.AST) -> set[str]:
    """`Error(..., code="x")`, `code=f"http_{status}"`, `status, code = (499, "x") if ... else ...`."""
    if isinstance(node, ast.Call):
        values = [keyword.value for keyword in node.keywords if keyword.arg == "code"]
        return {text for text in map(_text, values) if text is not None}
    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Tuple):
        names = [getattr(target, "id", None) for target in node.targets[0].elts]
        if "code" in names:
            options = [node.value.body, node.value.orelse] if isinstance(node.value, ast.IfExp) else [node.value]
            tuples = [option for option in options if isinstance(option, ast.Tuple)]
            texts = (_text(option.elts[names.index("code")]) for option in tuples)
            return {text for text in texts if text is not None}
    return set()


def _text(node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    first = node.values[0] if isinstance(node, ast.JoinedStr) and node.values else None
    if isinstance(first, ast.Constant) and isinstance(first.value, str):
        return first.value + "<status>"  # the one f-string code: f"http_{exc.status_code}"
    return None


def _error_classes() -> list[type[errors.GatewayError]]:
    found, todo = [], [errors.GatewayError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


def test_every_error_code_has_a_row() -> None:
    documented = {code for row in rows() for code in TICKED.findall(row["code"])}
    produced = produced_codes()
    assert {"upstream_unreachable", "catalogue_unavailable", "http_<status>", "request_cancelled"} <= produced
    missing = sorted(produced - documented)
    assert not missing, f"docs/errors.md's error table lacks {missing}"


def test_each_row_is_one_case_with_a_status() -> None:
    table = rows()
    assert table and all(set(row) == {"case", "status", "code", "headers"} for row in table)
    for row in table:
        assert row["case"] and re.match(r"^(\d{3}|same status)", row["status"]), row
        assert TICKED.search(row["code"]), row


def documented_headers(case: str) -> list[str]:
    """The header names the row of `case` promises (`x-ratelimit-*` stands for a family)."""
    row = next(row for row in rows() if row["case"] == case)
    return [name.split(":")[0] for name in TICKED.findall(row["headers"])]


def sent(name: str, response: httpx.Response) -> bool:
    if name.endswith("*"):
        return any(header.startswith(name[:-1]) for header in response.headers)
    return name in response.headers


def test_the_concurrency_refusal_sends_the_headers_its_row_names(
    keyed: GatewayServer, simulator: SimulatorThread
) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    team = "conc-" + uuid.uuid4().hex[:8]
    assert httpx.post(keyed.url + "/admin/teams", json={"name": team}, headers=admin).status_code == 201
    created = httpx.post(
        keyed.url + "/admin/keys", json={"name": "k", "team": team, "max_concurrency": 1}, headers=admin
    )
    auth = {"Authorization": f"Bearer {created.json()['key']}"}
    marker = uuid.uuid4().hex
    slow = {"model": "openai/gpt-4o-mini", "messages": HELLO, "user": marker, "simulator": {"ttfb_ms": 1500}}
    first: list[httpx.Response] = []
    holder = threading.Thread(
        target=lambda: first.append(httpx.post(keyed.url + "/v1/chat/completions", json=slow, headers=auth, timeout=30))
    )
    holder.start()
    try:
        wait_until(
            lambda: any(marker in event["body"] for event in simulator.requests()), 15, "the first request upstream"
        )
        refused = httpx.post(
            keyed.url + "/v1/chat/completions", json={"model": "openai/gpt-4o-mini", "messages": HELLO}, headers=auth
        )
    finally:
        holder.join(30)
    assert first and first[0].status_code == 200
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert (error["code"], error["type"], error["metadata"]["limit"]) == (
        "rate_limit_exceeded",
        "requests",
        "concurrency",
    )
    promised = documented_headers("concurrency limit")
    assert [name for name in promised if not sent(name, refused)] == [], refused.headers  # every one is sent
    assert refused.headers["retry-after"].isdigit() and refused.headers["retry-after-ms"].isdigit()
    assert not any(name.startswith("x-ratelimit-") for name in refused.headers)  # none: OpenAI has none
    assert not any(name.startswith("x-ratelimit-") for name in promised)  # and the table promises none
