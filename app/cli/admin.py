"""`gateway teams …` and `gateway keys …`: the admin API from the command line.

The gateway's URL comes from `--url` or `GATEWAY_URL`; the admin key from `GATEWAY_ADMIN_KEY`
(never from the command line, where it would land in shell history).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from app.cli import declared
from app.cli.tables import record, table

if TYPE_CHECKING:
    import httpx

TEAM_COLUMNS = (
    "name",
    "models",
    "rpm",
    "tpm",
    "max_concurrency",
    "budget_usd",
    "budget_period",
    "app_title",
    "upstream_key_env",
    "declared",
)
KEY_COLUMNS = ("id", "name", "team", "models", "rpm", "tpm", "budget_usd", "expires_at", "last_used_at", "revoked")
LIMIT_FIELDS = ("rpm", "tpm", "max_concurrency", "budget_usd", "budget_period")


class CommandError(Exception):
    pass


def add_commands(commands: Any) -> None:
    teams = commands.add_parser("teams", help="manage teams through the admin API").add_subparsers(
        dest="action", required=True
    )
    create = teams.add_parser("create", help="create a team")
    create.add_argument("name")
    _team_options(create)
    _common(create, _team_create)
    _common(teams.add_parser("list", help="list teams"), _team_list)
    show = teams.add_parser("show", help="show a team")
    show.add_argument("name")
    _common(show, _team_show)
    update = teams.add_parser("update", help="change a team")
    update.add_argument("name")
    _team_options(update)
    _clear_option(update)
    _common(update, _team_update)
    delete = teams.add_parser("delete", help="delete a team (it must have no active keys)")
    delete.add_argument("name")
    _common(delete, _team_delete)

    keys = commands.add_parser("keys", help="manage keys through the admin API").add_subparsers(
        dest="action", required=True
    )
    create = keys.add_parser("create", help="create a key; its secret is shown once")
    create.add_argument("--name", required=True)
    create.add_argument("--team", required=True)
    _key_options(create)
    _common(create, _key_create)
    listing = keys.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--team")
    listing.add_argument("--active", action="store_true", help="only usable keys: leave out revoked and expired ones")
    _common(listing, _key_list)
    for action, helptext, handler in (("show", "show a key", _key_show), ("revoke", "revoke a key", _key_revoke)):
        sub = keys.add_parser(action, help=helptext)
        sub.add_argument("id")
        _common(sub, handler)
    update = keys.add_parser("update", help="change a key")
    update.add_argument("id")
    update.add_argument("--name")
    _key_options(update)
    _clear_option(update)
    _common(update, _key_update)
    rotate = keys.add_parser("rotate", help="new secret, same id")
    rotate.add_argument("id")
    rotate.add_argument("--grace", type=float, default=0, help="seconds the old secret keeps working (default 0)")
    _common(rotate, _key_rotate)
    usage = commands.add_parser("usage", help="usage and spend from the ledger, with totals")
    usage.add_argument("--from", dest="start", help="first UTC day, YYYY-MM-DD (default: 1st of this month)")
    usage.add_argument("--to", dest="end", help="last UTC day, included (default: today)")
    usage.add_argument("--group-by", default="team,key,model", help="comma-separated: team, key, model, day")
    usage.add_argument("--team")
    usage.add_argument("--key", help="a key's id, or team/name, or a name only one team has")
    usage.add_argument("--csv", action="store_true", help="print CSV")
    _common(usage, _usage)
    declared.add_command(keys)


URL_HELP = "the gateway (default GATEWAY_URL or http://127.0.0.1:8080); before or after the command"


def _common(parser: argparse.ArgumentParser, handler: Any) -> None:
    parser.add_argument("--url", help=URL_HELP)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=lambda args: _run(handler, args))


def _limit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", metavar="GLOB", help="allowed model globs, e.g. 'openai/*'")
    parser.add_argument("--rpm", type=int, help="requests per minute")
    parser.add_argument("--tpm", type=int, help="tokens per minute")
    parser.add_argument("--max-concurrency", type=int, help="requests in flight")
    parser.add_argument("--budget-usd", type=float, help="spend allowed per budget period")
    parser.add_argument("--budget-period", choices=("day", "month", "total"))
    parser.add_argument("--metadata", type=json.loads, help="free-form JSON object")


def _team_options(parser: argparse.ArgumentParser) -> None:
    _limit_options(parser)
    parser.add_argument("--app-url", help="HTTP-Referer for this team")
    parser.add_argument("--app-title", help="X-OpenRouter-Title for this team")
    parser.add_argument("--category", action="append", dest="categories", help="X-OpenRouter-Categories (max 2)")
    parser.add_argument("--upstream-key-env", help="env var holding this team's OpenRouter key")
    parser.add_argument("--provider", type=json.loads, help='provider policy, e.g. \'{"data_collection":"deny"}\'')
    parser.add_argument("--defaults", type=json.loads, help="body fields merged under every request (JSON)")


def _key_options(parser: argparse.ArgumentParser) -> None:
    _limit_options(parser)
    parser.add_argument("--expires-at", help="ISO 8601 time")
    parser.add_argument("--expires-in", help="e.g. 90d, 12h, 30m")


def _clear_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clear", action="append", default=[], metavar="FIELD", help="unset a field (repeatable)")


def _fields(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    body = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    if getattr(args, "expires_in", None):
        body["expires_at"] = (datetime.now(UTC) + _duration(args.expires_in)).isoformat()
    for name in getattr(args, "clear", []):
        body[name.replace("-", "_")] = None
    return body


def _duration(text: str) -> timedelta:
    match = re.fullmatch(r"(\d+)([dhms])", text)
    if not match:
        raise CommandError(f"--expires-in: {text!r} is not like 90d, 12h, 30m or 45s")
    unit = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}[match.group(2)]
    return timedelta(**{unit: int(match.group(1))})


TEAM_FIELDS = (
    "models",
    *LIMIT_FIELDS,
    "metadata",
    "app_url",
    "app_title",
    "categories",
    "upstream_key_env",
    "provider",
    "defaults",
)
KEY_FIELDS = ("name", "models", *LIMIT_FIELDS, "metadata", "expires_at")


# -- handlers ---------------------------------------------------------------------------------
def _team_create(api: Api, args: argparse.Namespace) -> Any:
    return api.call("POST", "/admin/teams", {"name": args.name, **_fields(args, TEAM_FIELDS)})


def _team_list(api: Api, args: argparse.Namespace) -> Any:
    return api.call("GET", "/admin/teams")["data"]


def _team_show(api: Api, args: argparse.Namespace) -> Any:
    return api.call("GET", f"/admin/teams/{args.name}")


def _team_update(api: Api, args: argparse.Namespace) -> Any:
    return api.call("PATCH", f"/admin/teams/{args.name}", _fields(args, TEAM_FIELDS))


def _team_delete(api: Api, args: argparse.Namespace) -> Any:
    api.call("DELETE", f"/admin/teams/{args.name}")
    return {"deleted": args.name}


def _key_create(api: Api, args: argparse.Namespace) -> Any:
    return api.call("POST", "/admin/keys", {"team": args.team, **_fields(args, KEY_FIELDS)})


def _key_list(api: Api, args: argparse.Namespace) -> Any:
    params = {"team": args.team} if args.team else {}
    if args.active:
        params["include_revoked"] = params["include_expired"] = "false"
    return api.call("GET", "/admin/keys", params=params)["data"]


def _key_show(api: Api, args: argparse.Namespace) -> Any:
    return api.call("GET", f"/admin/keys/{args.id}")


def _key_update(api: Api, args: argparse.Namespace) -> Any:
    return api.call("PATCH", f"/admin/keys/{args.id}", _fields(args, KEY_FIELDS))


def _key_revoke(api: Api, args: argparse.Namespace) -> Any:
    return api.call("POST", f"/admin/keys/{args.id}/revoke")


def _key_rotate(api: Api, args: argparse.Namespace) -> Any:
    return api.call("POST", f"/admin/keys/{args.id}/rotate", {"grace_period_s": args.grace})


def _usage(api: Api, args: argparse.Namespace) -> Any:
    params = {"group_by": args.group_by}
    for name in ("start", "end", "team", "key"):
        if getattr(args, name):
            params[{"start": "from", "end": "to"}.get(name, name)] = getattr(args, name)
    if args.csv:
        return Csv(api.call("GET", "/admin/usage", params=params, accept="text/csv"))
    report = api.call("GET", "/admin/usage", params=params)
    from app.usage.ledger import usage_columns

    return Report(report, usage_columns(g.strip() for g in args.group_by.split(",")))


class Csv(str):
    pass


class Report(dict[str, Any]):
    def __init__(self, report: dict[str, Any], groups: list[str]) -> None:
        super().__init__(report)
        self.groups = groups


# -- plumbing ---------------------------------------------------------------------------------
class Api:
    def __init__(self, url: str) -> None:
        import httpx  # here, not at the top: `gateway serve` must not carry it (~20 MB of RSS with rich)

        admin_key = os.environ.get("GATEWAY_ADMIN_KEY")
        if not admin_key:
            raise CommandError("set GATEWAY_ADMIN_KEY to the gateway's admin key")
        self._http_error = httpx.HTTPError
        self.client: httpx.Client = httpx.Client(
            base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {admin_key}"}, timeout=30
        )

    def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        accept: str = "application/json",
    ) -> Any:
        try:
            response = self.client.request(method, path, json=body, params=params, headers={"Accept": accept})
        except self._http_error as exc:
            raise CommandError(f"cannot reach the gateway at {self.client.base_url}: {exc}") from None
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                message = error["message"] + (f" (code {error['code']})" if error.get("code") else "")
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            raise CommandError(f"{response.status_code}: {message}")
        if accept != "application/json":
            return response.text
        return response.json() if response.content else None


def _run(handler: Any, args: argparse.Namespace) -> int:
    try:
        url = args.url or getattr(args, "top_url", None) or os.environ.get("GATEWAY_URL") or "http://127.0.0.1:8080"
        result = handler(Api(url), args)
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if isinstance(result, Csv):
        print(result, end="")
    elif args.json:
        print(json.dumps(result, indent=2))
    elif isinstance(result, Report):
        measures = ["requests", "prompt_tokens", "completion_tokens", "reasoning_tokens", "cached_tokens", "cost_usd"]
        total = {**dict.fromkeys(result.groups, ""), **result["total"]}
        if result.groups:
            total[result.groups[0]] = "TOTAL"
        print(table([*result["data"], total], [*result.groups, *measures]))
    elif isinstance(result, list):
        columns = KEY_COLUMNS if args.command == "keys" else TEAM_COLUMNS
        print(table(result, columns))
    elif isinstance(result, dict) and "key" in result and args.command == "keys":
        # A new secret alone on stdout, so `KEY=$(gateway keys create …)` holds it; the rest is for the eye.
        print(record({k: v for k, v in result.items() if k != "key"}) + "\n", file=sys.stderr)
        print(result["key"], flush=True)
        where = "above" if sys.stdout.isatty() else "on standard output"
        print(f"(the key {where} is shown once: store it now; the gateway keeps only its hash)", file=sys.stderr)
    else:
        print(record(result))
    return 0
