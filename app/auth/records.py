"""Key and team records as stored: validated once on the way in (admin API, config file),
serialised as JSON by every store backend. Secrets are never part of them; keys keep only
the SHA-256 of their secret."""

from __future__ import annotations

import fnmatch
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
KEY_ID = re.compile(r"^[a-z0-9]{12}$")
ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]{0,127}$")
CATEGORY = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_GLOB = re.compile(r"^[A-Za-z0-9/_.:*?~\[\]!-]{1,200}$")
Period = Literal["day", "month", "total"]


def now() -> datetime:
    return datetime.now(UTC)


def _name(value: str) -> str:
    if not NAME.match(value):
        raise ValueError("1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value


def _glob(value: str) -> str:
    if not _GLOB.match(value) or value.count("[") != value.count("]"):
        raise ValueError(f"{value!r} is not a model glob such as 'openai/*' or 'deepseek/deepseek-v3.2'")
    try:
        re.compile(fnmatch.translate(value))
    except re.error as exc:
        raise ValueError(f"{value!r} is not a valid glob: {exc}") from None
    return value


def _one_line(value: str) -> str:
    if not value or len(value) > 200 or not value.isprintable():
        raise ValueError("one line of printable characters, at most 200")
    return value


def _category(value: str) -> str:
    if len(value) > 30 or not CATEGORY.match(value):
        raise ValueError(f"{value!r}: lowercase words joined by hyphens, at most 30 characters")
    return value


def _env_name(value: str) -> str:
    if not ENV_NAME.match(value):
        raise ValueError("an environment variable name such as TEAM_ML_OPENROUTER_KEY")
    return value


def _number(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


MAX_DEPTH = 16


def _shallow(value: Any) -> Any:
    """Free-form JSON (metadata, provider policy, defaults) may nest at most MAX_DEPTH levels."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return value


def _utc(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC) if value is not None else None


Name = Annotated[str, AfterValidator(_name)]
Glob = Annotated[str, AfterValidator(_glob)]
OneLine = Annotated[str, AfterValidator(_one_line)]
Category = Annotated[str, AfterValidator(_category)]
EnvName = Annotated[str, AfterValidator(_env_name)]
Metadata = Annotated[dict[str, Any], Field(max_length=64), AfterValidator(_shallow)]
FreeForm = Annotated[dict[str, Any], AfterValidator(_shallow)]
Count = Annotated[int, BeforeValidator(_number)]
Amount = Annotated[float, BeforeValidator(_number)]


_MINIMUM_1: dict[str, Any] = {"minimum": 1}


class LimitValues(BaseModel):
    """Rate limits and a budget: for a key, a team, or everything (global)."""

    model_config = ConfigDict(extra="forbid")

    rpm: Count | None = Field(None, le=10**9, json_schema_extra=_MINIMUM_1, description="requests per minute")
    tpm: Count | None = Field(None, le=10**12, json_schema_extra=_MINIMUM_1, description="tokens per minute")
    max_concurrency: Count | None = Field(
        None, le=10**6, json_schema_extra=_MINIMUM_1, description="requests in flight"
    )
    budget_usd: Amount | None = Field(None, ge=0, le=10**9, description="spend allowed per budget period")
    budget_period: Period | None = Field(None, description="day | month | total (calendar, UTC)")

    @field_validator("rpm", "tpm", "max_concurrency")
    @classmethod
    def _at_least_one(cls, value: int | None) -> int | None:
        """0 would refuse every request, while many read it as "no limit": refused wherever a limit
        is written. A record as stored or shown (it has a `created_at`) written before this
        refusal still loads, and keeps blocking as it did."""
        if value is not None and value < 1 and not (value == 0 and "created_at" in cls.model_fields):
            raise PydanticCustomError("limit_below_one", "must be at least 1; leave it out for no limit")
        return value

    @model_validator(mode="after")
    def _period_with_budget(self) -> LimitValues:
        if self.budget_usd is not None and self.budget_period is None:
            sent = "budget_period" in self.model_fields_set
            self.budget_period = "month"
            if not sent:  # a default, not a change: a PATCH of the amount keeps the stored period
                self.model_fields_set.discard("budget_period")
        return self


class LimitFields(LimitValues):
    """What keys and teams share: the model allowlist, limits and a budget."""

    models: list[Glob] = Field(default_factory=list, max_length=256, description="allowed model globs; empty = any")


class TeamFields(LimitFields):
    """A team's settings, as an admin writes them."""

    app_url: OneLine | None = Field(None, description="HTTP-Referer for this team's upstream requests")
    app_title: OneLine | None = Field(None, description="X-OpenRouter-Title / X-Title for this team")
    categories: list[Category] | None = Field(None, max_length=2, description="X-OpenRouter-Categories")
    upstream_key_env: EnvName | None = Field(None, description="env var holding this team's OpenRouter key")
    provider: FreeForm | None = Field(None, description="provider policy merged over every request")
    defaults: FreeForm = Field(default_factory=dict, description="body fields merged under every request")
    metadata: Metadata = Field(default_factory=dict)


class TeamRecord(TeamFields):
    name: Name
    created_at: datetime = Field(default_factory=now)
    updated_at: datetime = Field(default_factory=now)
    declared: bool = False


class PreviousSecret(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hash: str
    valid_until: datetime


class KeyFields(LimitFields):
    """A key's settings, as an admin writes them."""

    expires_at: datetime | None = Field(None, description="ISO 8601; the key stops working then")
    metadata: Metadata = Field(default_factory=dict)

    _utc_expiry = field_validator("expires_at")(_utc)


class KeyRecord(KeyFields):
    id: str
    name: Name
    team: Name
    hash: str
    previous: list[PreviousSecret] = Field(default_factory=list)
    created_at: datetime = Field(default_factory=now)
    updated_at: datetime = Field(default_factory=now)
    rotated_at: datetime | None = None
    last_used_at: datetime | None = None
    revoked: bool = False
    revoked_at: datetime | None = None
    declared: bool = False

    def public(self) -> dict[str, Any]:
        """The record as the admin API shows it: never the hash of a secret."""
        data = self.model_dump(mode="json", exclude={"hash", "previous"})
        live = [p.valid_until for p in self.previous if p.valid_until > now()]
        data["previous_secret_valid_until"] = max(live).isoformat() if live else None
        return data
