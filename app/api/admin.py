"""The admin API: teams and keys. Bearer `GATEWAY_ADMIN_KEY`; without it the API is off."""

from __future__ import annotations

import csv
import hmac
import io
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse, Response

from app.api.deps import GatewayDep
from app.auth.keys import hash_key
from app.auth.records import KEY_ID, NAME, Amount, KeyFields, KeyRecord, Name, TeamFields, TeamRecord
from app.errors import AdminDisabledError, AuthenticationError, InvalidRequestError, NotFoundError
from app.gateway import Gateway
from app.usage.ledger import usage_columns

_bearer = HTTPBearer(auto_error=False, description="GATEWAY_ADMIN_KEY")


def require_admin(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
) -> None:
    gateway: Gateway = request.app.state.gateway
    expected = gateway.admin_key_hash
    if expected is None:
        raise AdminDisabledError("The admin API is off: set GATEWAY_ADMIN_KEY to turn it on.")
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise AuthenticationError("The admin API needs 'Authorization: Bearer <GATEWAY_ADMIN_KEY>'.")
    if not hmac.compare_digest(hash_key(credentials.credentials).encode(), expected):
        raise AuthenticationError("Incorrect admin key provided.")


router = APIRouter(prefix="/admin", tags=["Admin"], dependencies=[Depends(require_admin)])


class TeamCreate(TeamFields):
    name: Name


class KeyCreate(KeyFields):
    name: Name
    team: Name


class KeyUpdate(KeyFields):
    name: Name | None = None


class Rotation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace_period_s: Amount = Field(0, ge=0, le=30 * 86400, description="how long the old secret keeps working")


class KeyOut(KeyFields):
    id: str
    name: str
    team: str
    created_at: datetime
    updated_at: datetime
    rotated_at: datetime | None
    last_used_at: datetime | None
    revoked: bool
    revoked_at: datetime | None
    declared: bool
    previous_secret_valid_until: str | None


class BudgetState(BaseModel):
    period: str = Field(description="d<YYYYMMDD>, m<YYYYMM> or total (UTC)")
    limit_usd: float
    spent_usd: float = Field(description="settled spend of the period (requests still running not included)")


class KeyShown(KeyOut):
    budget: BudgetState | None = None


class TeamShown(TeamRecord):
    budget: BudgetState | None = None


class KeyWithSecret(KeyOut):
    key: str = Field(description="the plaintext key; shown only now")


class TeamList(BaseModel):
    object: str = "list"
    data: list[TeamRecord]


class KeyList(BaseModel):
    object: str = "list"
    data: list[KeyOut]
    has_more: bool = False


def _team_name(name: str) -> str:
    if not NAME.match(name):
        raise NotFoundError(f"No team named '{name[:64]}'.", param="name", code="team_not_found")
    return name


def _key_id(key_id: str) -> str:
    if not KEY_ID.match(key_id):
        raise NotFoundError(f"No key with id '{key_id[:64]}'.", param="id", code="key_not_found")
    return key_id


def _key_out(key: KeyRecord, plaintext: str | None = None) -> dict[str, Any]:
    data = key.public()
    if plaintext is not None:
        data["key"] = plaintext
    return data


@router.post("/teams", status_code=201, response_model=TeamRecord, summary="Create a team")
async def create_team(body: TeamCreate, gateway: GatewayDep) -> Any:
    fields = TeamFields.model_validate(body.model_dump(exclude={"name"}, exclude_unset=True))
    return await gateway.registry.create_team(body.name, fields)


@router.get("/teams", response_model=TeamList, summary="List teams")
async def list_teams(gateway: GatewayDep) -> Any:
    return {"object": "list", "data": await gateway.registry.store.list_teams()}


@router.get("/teams/{name}", response_model=TeamShown, summary="Show a team and its budget's spend")
async def show_team(name: str, gateway: GatewayDep) -> Any:
    team = await gateway.registry.team(_team_name(name))
    return {**team.model_dump(), "budget": await gateway.admission.budget_state("team", team.name, team)}


@router.patch("/teams/{name}", response_model=TeamRecord, summary="Update a team")
async def update_team(name: str, body: TeamFields, gateway: GatewayDep) -> Any:
    return await gateway.registry.update_team(_team_name(name), body.model_dump(exclude_unset=True))


@router.delete("/teams/{name}", status_code=204, summary="Delete a team without active keys")
async def delete_team(name: str, gateway: GatewayDep) -> None:
    await gateway.registry.delete_team(_team_name(name))


@router.post("/keys", status_code=201, response_model=KeyWithSecret, summary="Create a key (shown once)")
async def create_key(body: KeyCreate, gateway: GatewayDep) -> Any:
    fields = KeyFields.model_validate(body.model_dump(exclude={"name", "team"}, exclude_unset=True))
    key, plaintext = await gateway.registry.create_key(body.name, body.team, fields)
    return JSONResponse(_key_out(key, plaintext), status_code=201)


@router.get("/keys", response_model=KeyList, summary="List keys (never their secrets)")
async def list_keys(
    gateway: GatewayDep,
    team: Annotated[str | None, Query(description="only this team's keys")] = None,
    include_revoked: bool = True,
    include_expired: bool = True,
    limit: Annotated[int | None, Query(ge=1, le=10_000, description="at most this many (oldest first)")] = None,
    after: Annotated[str | None, Query(description="the last id of the previous page")] = None,
) -> Any:
    keys = sorted(await gateway.registry.store.list_keys(team=team), key=lambda k: (k.created_at, k.id))
    if after is not None:  # a cursor into the whole list, oldest first: a key filtered out still marks a place
        ids = [k.id for k in keys]
        if after not in ids:
            raise InvalidRequestError(f"after: no key with id '{after}' in this listing", param="after")
        keys = keys[ids.index(after) + 1 :]
    now = datetime.now(UTC)
    shown = [
        k
        for k in keys
        if (include_revoked or not k.revoked) and (include_expired or k.expires_at is None or k.expires_at > now)
    ]
    page = shown if limit is None else shown[:limit]
    return {"object": "list", "data": [_key_out(k) for k in page], "has_more": len(page) < len(shown)}


@router.get("/keys/{key_id}", response_model=KeyShown, summary="Show a key and its budget's spend")
async def show_key(key_id: str, gateway: GatewayDep) -> Any:
    key = await gateway.registry.key(_key_id(key_id))
    return {**_key_out(key), "budget": await gateway.admission.budget_state("key", key.id, key)}


@router.patch("/keys/{key_id}", response_model=KeyOut, summary="Update a key")
async def update_key(key_id: str, body: KeyUpdate, gateway: GatewayDep) -> Any:
    changes = body.model_dump(exclude_unset=True)
    if changes.get("name", "") is None:
        changes.pop("name")
    return _key_out(await gateway.registry.update_key(_key_id(key_id), changes))


@router.post("/keys/{key_id}/revoke", response_model=KeyOut, summary="Revoke a key (every replica, within 1 s)")
async def revoke_key(key_id: str, gateway: GatewayDep) -> Any:
    return _key_out(await gateway.registry.revoke_key(_key_id(key_id)))


@router.post("/keys/{key_id}/rotate", response_model=KeyWithSecret, summary="New secret, same id")
async def rotate_key(key_id: str, gateway: GatewayDep, body: Rotation | None = None) -> Any:
    key, plaintext = await gateway.registry.rotate_key(_key_id(key_id), (body or Rotation()).grace_period_s)
    return _key_out(key, plaintext)


class UsageRow(BaseModel):
    model_config = ConfigDict(extra="allow")

    requests: int = Field(description="requests sent to OpenRouter")
    prompt_tokens: int
    completion_tokens: int = Field(description="reasoning tokens included")
    reasoning_tokens: int
    cached_tokens: int = Field(description="part of prompt_tokens")
    cost_usd: float


class UsageReport(BaseModel):
    data: list[UsageRow]
    total: UsageRow


USAGE_GROUPS = ("team", "key", "model", "day")


@router.get(
    "/usage",
    response_model=UsageReport,
    summary="Usage and spend, grouped (JSON, or CSV with Accept: text/csv)",
    responses={200: {"content": {"text/csv": {}}}},
)
async def usage(
    request: Request,
    gateway: GatewayDep,
    start: Annotated[date | None, Query(alias="from", description="first UTC day (default: 1st of this month)")] = None,
    end: Annotated[date | None, Query(alias="to", description="last UTC day, included (default: today)")] = None,
    group_by: Annotated[str, Query(description="comma-separated: team, key, model, day")] = "team,key,model",
    team: str | None = None,
    key: Annotated[str | None, Query(description="a key's id, or team/name, or a name only one team has")] = None,
) -> Any:
    today = datetime.now(UTC).date()
    team, key = team or None, key or None  # an empty filter (`team=`) is no filter
    end = end or today
    start = start or end.replace(day=1)
    groups = list(dict.fromkeys(g.strip() for g in group_by.split(",") if g.strip()))
    unknown = [g for g in groups if g not in USAGE_GROUPS]
    if unknown:
        raise InvalidRequestError(f"group_by: unknown {unknown}; use {', '.join(USAGE_GROUPS)}", param="group_by")
    if start > end or (end - start).days > 366:
        raise InvalidRequestError("from must be on or before to, at most 366 days apart", param="from")
    data, total = await gateway.ledger.query(start, end, groups, team=team, key=key)
    if "text/csv" in request.headers.get("accept", ""):
        return Response(_csv(usage_columns(groups), data, total), media_type="text/csv; charset=utf-8")
    return {"data": data, "total": total}


def _csv(columns: list[str], data: list[dict[str, Any]], total: dict[str, Any]) -> str:
    buffer = io.StringIO()
    measures = list(total)
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*columns, *measures])
    for row in data:
        writer.writerow([row.get(c) or "" for c in columns] + [_plain(row[m]) for m in measures])
    sums = [_plain(total[m]) for m in measures]
    writer.writerow(["total", *[""] * (len(columns) - 1), *sums] if columns else sums)
    return buffer.getvalue()


def _plain(value: Any) -> Any:
    """A cost as a spreadsheet reads it: 0.0000756, never 7.56e-05."""
    return format(Decimal(repr(value)), "f") if isinstance(value, float) else value
