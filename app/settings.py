"""Settings: environment (`GATEWAY_*`, nested with `__`) over the YAML file over defaults.

Nothing else in the gateway reads the environment (but the CLI's few variables of its own:
tests/test_settings_sources.py). Secrets (`config_file.SECRETS`) come only from the environment or
a file named by `<NAME>_FILE`, the Docker-secrets way (so can `GATEWAY_STORE`, whose URL may hold
a password), never from the YAML file. An empty variable counts as unset.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from app.auth.records import KEY_ID, KeyFields, KeyRecord, LimitValues, Name, TeamFields, TeamRecord
from app.config_file import SECRETS, RepeatedKeysError, Secret, describe, names_at, parse_config, read_yaml
from app.config_file import ConfigError as ConfigError  # known to callers as the settings' error

DEFAULT_CONFIG_FILE = "config/gateway.yaml"
_PLACEHOLDERS = re.compile(
    r"^(|changeme|change-me|change_me|replace-?me|secret|password|xxx+|your[-_ ].*|<.*>|sk-or-v1-x+|.*(\.\.\.|…))$",
    re.IGNORECASE,
)
_CATEGORY = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
# `<NAME>_FILE` names a file holding `<NAME>` (Docker and compose secrets); `<NAME>` wins
FROM_FILES = {secret.env: secret.path for secret in SECRETS} | {"GATEWAY_STORE": ("store",)}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _refuse_placeholder(value: SecretStr | None) -> SecretStr | None:
    if value is not None and _PLACEHOLDERS.match(value.get_secret_value().strip()):
        raise ValueError("looks like a placeholder, not a real secret")
    return value


class RetrySettings(_Section):
    """Retries toward OpenRouter: full-jitter exponential backoff within the request's deadline."""

    max_attempts: int = Field(3, ge=1, le=10, description="tries per model, the first included")
    backoff_base_s: float = Field(0.25, gt=0)
    backoff_cap_s: float = Field(8.0, gt=0)
    budget_ratio: float = Field(0.2, ge=0, le=10, description="retries in progress / requests in flight, at most")
    budget_min: int = Field(3, ge=0, description="retries always allowed in progress, whatever the ratio")


class BreakerSettings(_Section):
    """A circuit breaker per upstream model."""

    failure_threshold: int = Field(5, ge=1, description="consecutive failures that open it")
    open_base_s: float = Field(5.0, gt=0, description="first open time; doubles on each reopening")
    open_cap_s: float = Field(60.0, gt=0)


class UpstreamSettings(_Section):
    """How the gateway reaches OpenRouter."""

    base_url: str = "https://openrouter.ai/api/v1"
    api_key: SecretStr | None = None
    connect_timeout_s: float = Field(5.0, gt=0)
    first_byte_timeout_s: float = Field(120.0, gt=0, description="per try, until response headers")
    read_timeout_s: float = Field(300.0, gt=0, description="longest silence inside a response")
    deadline_s: float = Field(600.0, gt=0, description="whole request, all tries included")
    max_connections: int = Field(1024, ge=1)
    catalog_ttl_s: float = Field(300.0, ge=0)
    retries: RetrySettings = Field(default_factory=lambda: RetrySettings())
    breaker: BreakerSettings = Field(default_factory=lambda: BreakerSettings())

    _check_key = field_validator("api_key")(_refuse_placeholder)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("must be an http(s) URL")
        return value.rstrip("/")


class AttributionSettings(_Section):
    """Headers OpenRouter uses for app rankings; sent on every upstream request."""

    app_url: str = "http://localhost"
    app_title: str = "OpenRouter Gateway"
    categories: list[str] = Field(default_factory=list, max_length=2)

    @field_validator("app_url", "app_title")
    @classmethod
    def _one_line(cls, value: str) -> str:
        if any(ch in value for ch in "\r\n\0") or not value.isprintable():
            raise ValueError("must be one line of printable characters")
        return value

    @field_validator("categories")
    @classmethod
    def _category_format(cls, values: list[str]) -> list[str]:
        for value in values:
            if len(value) > 30 or not _CATEGORY.match(value):
                raise ValueError(f"{value!r}: lowercase words joined by hyphens, at most 30 characters")
        return values


class ModelSettings(_Section):
    """What the gateway does for one model (or a glob of models)."""

    defaults: dict[str, Any] = Field(default_factory=dict, description="body fields merged under what the client sent")
    fallbacks: list[str] = Field(default_factory=list, description="models tried after this one's retries fail")
    first_byte_timeout_s: float | None = Field(None, gt=0, description="per try, overrides the upstream default")


class StoreErrorPolicy(_Section):
    """What admission does while the store is unreachable: admit (open) or refuse (closed)."""

    rate_limits: Literal["open", "closed"] = "open"
    budgets: Literal["open", "closed"] = "closed"


class LimitsSettings(_Section):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    global_: LimitValues = Field(
        default_factory=lambda: LimitValues(), alias="global", description="all traffic on the shared OpenRouter key"
    )
    team_defaults: LimitValues = Field(default_factory=lambda: LimitValues(), description="for teams that set none")
    key_defaults: LimitValues = Field(default_factory=lambda: LimitValues(), description="for keys that set none")
    on_store_error: StoreErrorPolicy = Field(default_factory=lambda: StoreErrorPolicy())
    lease_s: float = Field(120.0, ge=5, description="concurrency slots and budget holds expire unless renewed")
    admit_ahead: bool = Field(
        True, description="reserve a principal's next request ahead, so it is admitted without a store round trip"
    )
    ahead_spares: int = Field(
        2,
        ge=1,
        le=4,
        description="reservations a principal keeps ahead: with 2, a request arriving before the last one's "
        "settlement is answered still finds one made",
    )
    ahead_idle_s: float = Field(
        2.0, gt=0, description="a key's reservations ahead are given back once it has sent no request for this long"
    )
    ahead_max_share: float = Field(
        0.01,
        gt=0,
        le=0.5,
        description="what one process holds ahead on a limit, over all keys, stays within this share",
    )


class ModelsSettings(_Section):
    default: str | None = Field(None, description="model used for `default` and for requests without one")
    aliases: dict[str, str] = Field(default_factory=dict)
    per_model: dict[str, ModelSettings] = Field(default_factory=dict)

    @field_validator("aliases")
    @classmethod
    def _targets_are_ids(cls, aliases: dict[str, str]) -> dict[str, str]:
        for name, target in aliases.items():
            if "/" not in target:
                raise ValueError(f"{name}: target {target!r} is not an OpenRouter id (author/slug)")
        return aliases


class DeclaredTeam(TeamFields):
    """A team declared in the config file (read-only through the admin API)."""

    name: Name

    def record(self) -> TeamRecord:
        return TeamRecord(**self.model_dump(exclude_unset=True), declared=True)


class DeclaredKey(KeyFields):
    """A key declared by the SHA-256 of its plaintext (`gateway keys generate` makes one)."""

    id: str
    name: Name
    team: Name
    hash: str

    @field_validator("id")
    @classmethod
    def _key_id(cls, value: str) -> str:
        if not KEY_ID.match(value):
            raise ValueError("12 lowercase letters or digits: the part after 'sk-gw-' in the key")
        return value

    @field_validator("hash")
    @classmethod
    def _sha256(cls, value: str) -> str:
        value = value.removeprefix("sha256:").lower()
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("the SHA-256 of the key, as 64 hex digits (optionally prefixed 'sha256:')")
        return value

    def record(self) -> KeyRecord:
        return KeyRecord(**self.model_dump(exclude_unset=True), declared=True)


class Settings(BaseSettings):
    """Everything the gateway is told; built once and passed to `create_app`."""

    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_",
        env_nested_delimiter="__",
        env_ignore_empty=True,  # `NAME=` is unset: its `NAME_FILE`, or its default, applies
        extra="forbid",
        validate_default=True,
    )

    config_file: str | None = Field(DEFAULT_CONFIG_FILE, description="YAML file (GATEWAY_CONFIG)")
    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)
    api_key: SecretStr | None = Field(None, description="optional bootstrap client key (no team, no limits)")
    admin_key: SecretStr | None = Field(None, description="Bearer key of the admin API; unset = admin API off")
    metrics_key: SecretStr | None = Field(
        None, description="Bearer credential that opens /metrics and nothing else (Prometheus's scrape)"
    )
    store: str = Field(
        "sqlite",
        description="sqlite (gateway.db in data_dir), sqlite:///absolute/path.db, sqlite:relative/path.db, "
        "memory (one process: demo and tests), or a redis:// / rediss:// / unix:// / redis+sentinel:// URL "
        "(shared by replicas)",
    )
    data_dir: str = Field("data", min_length=1, description="the sqlite store's directory (created if missing)")
    store_prefix: str = Field("gw", pattern=r"^[A-Za-z0-9_.-]{1,32}$", description="namespace of our Redis keys")
    store_timeout_s: float = Field(
        0.5, gt=0, le=30, description="longest wait for one store call, queueing and locks included"
    )
    store_max_connections: int = Field(64, ge=1, description="Redis connections per process")
    auth_cache_ttl_s: float = Field(30.0, ge=0, description="re-read a cached key at least this often")
    last_used_flush_s: float = Field(5.0, gt=0, description="how often last-used times reach the store")
    budget_gauges_refresh_s: float = Field(15.0, gt=0, description="how often team budget gauges are read")
    reconcile_delays_s: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [0.5, 0.5, 1, 2, 4, 8, 15],
        max_length=20,
        description="waits between GET /generation lookups for a cut stream's cost",
    )
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_header_bytes: int = Field(32 * 1024, ge=1024, description="all request headers together; more gets 431")
    max_headers: int = Field(100, ge=10, description="request headers; more gets 431")
    max_json_depth: int = Field(64, ge=4, le=1000, description="nesting of a request body; deeper gets 400")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = Field("json", description="json: one JSON object per line")
    log_requests: bool = Field(True, description="one log line per request (ids, key name, team, tokens, cost)")
    log_bodies: bool = Field(False, description="also log prompts and completions (off: never logged)")
    shutdown_delay_s: float = Field(
        0.0, ge=0, le=300, description="on SIGTERM, keep serving this long with /readyz at 503 before closing"
    )
    shutdown_grace_s: float = Field(25.0, ge=0, le=3600, description="on SIGTERM, how long requests may finish")
    admin_host: str | None = Field(None, description="serve /admin on this address instead of the main one")
    admin_port: int | None = Field(None, ge=0, le=65535, description="serve /admin on this port only")
    cors_origins: list[str] = Field(default_factory=list, description="CORS allowed origins; empty: CORS off")
    upstream: UpstreamSettings = Field(default_factory=lambda: UpstreamSettings())
    attribution: AttributionSettings = Field(default_factory=AttributionSettings)
    models: ModelsSettings = Field(default_factory=lambda: ModelsSettings())
    limits: LimitsSettings = Field(default_factory=lambda: LimitsSettings())
    teams: list[DeclaredTeam] = Field(default_factory=list, description="teams declared here (read-only)")
    keys: list[DeclaredKey] = Field(default_factory=list, description="keys declared by hash (read-only)")

    _check_keys = field_validator("api_key", "admin_key")(_refuse_placeholder)
    _check_metrics_key = field_validator("metrics_key")(_refuse_placeholder)

    @property
    def metrics_multiprocess_dir(self) -> str | None:
        """prometheus_client's directory shared by workers, `PROMETHEUS_MULTIPROC_DIR` (None when
        unset), which `gateway serve` sets for its workers. Read when asked, not a setting: the
        variable itself is what prometheus_client obeys (it reads it on import), so a value from
        anywhere else could only disagree with it."""
        return os.environ.get("PROMETHEUS_MULTIPROC_DIR")

    @field_validator("port", mode="before")
    @classmethod
    def _not_a_service_link(cls, value: Any) -> Any:
        # Kubernetes gives every pod GATEWAY_PORT=tcp://<ip>:<port> for a service named `gateway`
        if isinstance(value, str) and re.match(r"^(tcp|udp|sctp)://", value.strip(), re.IGNORECASE):
            raise ValueError(
                f"GATEWAY_PORT={value}: looks like a Kubernetes service variable (a service named gateway); "
                "name the service otherwise or set GATEWAY_PORT=8080"
            )
        return value

    @field_validator("store")
    @classmethod
    def _store_url(cls, value: str) -> str:
        from app.store.location import check_store  # the store reads its setting's forms in one place

        return check_store(value)

    @model_validator(mode="after")
    def _declared_entries_agree(self) -> Settings:
        for what, values in (
            ("teams: team", [t.name for t in self.teams]),
            ("keys: key id", [k.id for k in self.keys]),
            ("keys: key name", [f"{k.team}/{k.name}" for k in self.keys]),  # a name is unique in its team
        ):
            if twice := sorted({value for value in values if values.count(value) > 1}):
                raise ValueError(f"{what} {', '.join(map(repr, twice))} is declared more than once")
        if self.admin_host is not None and self.admin_port is None:
            raise ValueError("admin_host needs admin_port (the admin API's own address)")
        if self.admin_port and self.admin_port == self.port:
            raise ValueError("admin_port must differ from port")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        init_kwargs = getattr(init_settings, "init_kwargs", {})
        from_env = os.environ.get("GATEWAY_CONFIG") or os.environ.get("GATEWAY_CONFIG_FILE") or None
        explicit = "config_file" in init_kwargs or from_env is not None
        path = init_kwargs.get("config_file", from_env or DEFAULT_CONFIG_FILE)
        return (
            init_settings,
            env_settings,
            _OpenRouterEnvSource(settings_cls),
            _FileSource(settings_cls),
            _YamlSource(settings_cls, path, explicit),
        )


class _OpenRouterEnvSource(PydanticBaseSettingsSource):
    """`OPENROUTER_API_KEY` and `OPENROUTER_BASE_URL`, the names every OpenRouter user knows."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        upstream = {}
        if os.environ.get("OPENROUTER_API_KEY"):
            upstream["api_key"] = os.environ["OPENROUTER_API_KEY"]
        if os.environ.get("OPENROUTER_BASE_URL"):
            upstream["base_url"] = os.environ["OPENROUTER_BASE_URL"]
        return {"upstream": upstream} if upstream else {}


class _FileSource(PydanticBaseSettingsSource):
    """Each secret, and the store URL, from the file `<NAME>_FILE` names (its content, stripped),
    unless `<NAME>` is set. Any other setting's `GATEWAY_<NAME>_FILE` is refused: ignored, it
    would leave the setting at its default without a word."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        problems = _other_files(self.settings_cls)
        for name, parts in FROM_FILES.items():
            path = os.environ.get(f"{name}_FILE")
            if not path or os.environ.get(name):
                continue
            try:
                value = Path(path).read_text(encoding="utf-8").strip()
            except FileNotFoundError:
                problems.append(f"{name}_FILE: {path}: file not found")
                continue
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
                problems.append(f"{name}_FILE: {path}: cannot be read ({reason})")
                continue
            *outer, last = parts
            section = data
            for part in outer:
                section = section.setdefault(part, {})
            section[last] = value
        if problems:
            raise ConfigError(problems)
        return data


def _other_files(settings_cls: type[BaseModel]) -> list[str]:
    """`GATEWAY_<setting>_FILE` for a real setting (nested with `__`) that is neither a secret nor
    the store. GATEWAY_CONFIG_FILE is `config_file`'s own variable, another name for GATEWAY_CONFIG."""
    readable = {name.lower() for name in FROM_FILES}
    problems = []
    for variable in sorted(os.environ):
        name = variable.lower()  # as pydantic-settings reads the environment
        if not (name.startswith("gateway_") and name.endswith("_file")) or name.removesuffix("_file") in readable:
            continue
        *outer, last = name.removeprefix("gateway_").removesuffix("_file").split("__")
        if last in names_at(settings_cls, tuple(outer)):
            problems.append(f"{variable}: only secrets and the store URL can come from a file")
    return problems


class _YamlSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], path: str | None, explicit: bool) -> None:
        super().__init__(settings_cls)
        try:
            self.data = read_yaml(path, required=explicit) if path else {}
        except RepeatedKeysError as exc:
            raise _as_read(exc) from None
        self.data["config_file"] = path

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return self.data


def read_secret(env_name: str) -> str | None:
    """A secret named by configuration (e.g. a team's `upstream_key_env`)."""
    return os.environ.get(env_name) or None


def check_config(text: str, path: str) -> None:
    """Whether `text` is a config file the gateway loads (the environment aside)."""
    try:
        data = parse_config(text, path)
    except RepeatedKeysError as exc:
        raise _as_read(exc) from None
    if problems := _file_problems(data):
        raise ConfigError(problems)


def _as_read(exc: RepeatedKeysError) -> ConfigError:
    """Keys given twice, and what else is wrong with the file as YAML reads it (the last of each
    kept, the environment aside): every problem in one run, not the repeats alone."""
    return ConfigError(exc.problems + _file_problems(exc.data))


def _file_problems(data: dict[str, Any]) -> list[str]:
    try:
        Settings.model_validate({**data, "config_file": None})
    except ValidationError as exc:
        return describe(exc, Settings)
    return []


def secret_origin(secret: Secret) -> str | None:
    """The variable `secret`'s value came from (`GATEWAY_ADMIN_KEY`, `GATEWAY_ADMIN_KEY_FILE`, ...),
    or None when it came from no variable."""
    own = "GATEWAY_" + "__".join(secret.path).upper()  # upstream.api_key: GATEWAY_UPSTREAM__API_KEY outranks
    for name in dict.fromkeys((own, secret.env)):
        if os.environ.get(name):
            return name
    return f"{secret.env}_FILE" if os.environ.get(f"{secret.env}_FILE") else None


def load_settings(**overrides: Any) -> Settings:
    """Build Settings, turning validation failures into a `ConfigError` naming each path (and,
    for a secret, the variable it came from)."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        origins = {secret.name: origin for secret in SECRETS if (origin := secret_origin(secret))}
        raise ConfigError(describe(exc, Settings, origins)) from None
