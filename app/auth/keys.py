"""Client keys: the `sk-gw-<id>-<secret>` format, SHA-256 at rest, constant-time checks, and the
authenticator of the request path (key -> record -> team, cached in-process, dropped from the
cache the moment any replica announces a change).

`GATEWAY_API_KEY`, if set, stays valid as a bootstrap key with no team and no limits.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import string
import time
from dataclasses import dataclass, field
from typing import Any

from app.auth.records import KEY_ID, KeyRecord, now
from app.auth.teams import TeamPolicy, TeamPolicyFactory, allowed
from app.errors import AuthenticationError, StoreUnavailableError
from app.store.base import Store, StoreError

log = logging.getLogger(__name__)

PREFIX = "sk-gw-"
_ID_ALPHABET = string.ascii_lowercase + string.digits
_SECRET_ALPHABET = string.ascii_letters + string.digits
_SECRET_LENGTH = 32  # 32 chars of 62 = 190 bits


def new_key_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(12))


def new_key(key_id: str) -> str:
    return f"{PREFIX}{key_id}-{''.join(secrets.choice(_SECRET_ALPHABET) for _ in range(_SECRET_LENGTH))}"


def key_id_of(token: str) -> str | None:
    """The public id inside a well-formed gateway key, or None."""
    if len(token) < len(PREFIX) + 13 + 16 or not token.startswith(PREFIX) or token[len(PREFIX) + 12] != "-":
        return None
    key_id = token[len(PREFIX) : len(PREFIX) + 12]
    return key_id if KEY_ID.match(key_id) else None


def hash_key(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def bearer_token(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer …` header, or a 401 saying what is missing."""
    if not authorization:
        raise AuthenticationError("You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("The Authorization header must be 'Bearer <key>'.")
    return token


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the key (by id and name, never its secret) and its team."""

    key_id: str
    key_name: str
    team: TeamPolicy | None = None
    models: tuple[str, ...] = ()
    record: KeyRecord | None = None
    _decisions: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)
    cache: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)  # derived per principal

    @property
    def team_name(self) -> str | None:
        return self.team.name if self.team else None

    @property
    def allowlists(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return self.models, self.team.models if self.team else ()

    def allows(self, model: str) -> bool:
        """Both the key's and the team's allowlists must admit the model (empty = any)."""
        decision = self._decisions.get(model)
        if decision is None:
            decision = allowed(model, self.models) and (self.team is None or allowed(model, self.team.models))
            if len(self._decisions) < 4096:
                self._decisions[model] = decision
        return decision


BOOTSTRAP = Principal(key_id="bootstrap", key_name="bootstrap")
UNKNOWN = Principal(key_id="", key_name="")  # a request refused before its key was known (401)


@dataclass(slots=True)
class _Entry:
    fetched: float
    record: KeyRecord | None
    principal: Principal | None
    expires: float | None = None  # the record's expires_at, as unix time


class KeyAuthenticator:
    """Bearer key -> Principal, with an in-process cache the store's change feed keeps honest."""

    def __init__(
        self,
        store: Store,
        teams: TeamPolicyFactory,
        bootstrap_key: str | None = None,
        cache_ttl_s: float = 30.0,
        miss_ttl_s: float = 2.0,
    ) -> None:
        self._store = store
        self._teams = teams
        self._bootstrap = hash_key(bootstrap_key).encode() if bootstrap_key else None
        self._ttl = cache_ttl_s
        self._miss_ttl = miss_ttl_s
        self._cache: dict[str, _Entry] = {}
        self._pending: dict[str, asyncio.Future[_Entry]] = {}
        self._changes = 0  # changes heard: a record read before one may be stale, so is not kept
        self.last_used: dict[str, float] = {}  # key id -> unix time, flushed to the store in batches
        store.on_change(self.invalidate)

    async def authenticate(self, authorization: str | None) -> Principal:
        token = bearer_token(authorization)
        digest = hash_key(token).encode()
        if self._bootstrap is not None and hmac.compare_digest(digest, self._bootstrap):
            return BOOTSTRAP
        key_id = key_id_of(token)
        if key_id is None:
            raise AuthenticationError("Incorrect API key provided.")
        entry = await self._entry(key_id)
        record, principal = entry.record, entry.principal
        if record is None or principal is None:
            raise AuthenticationError("Incorrect API key provided.")
        # From here the key exists: its refusal is logged and counted under its id and name (an old
        # secret still in use after a rotation shows whose it is).
        if not _secret_matches(record, digest):
            raise AuthenticationError("Incorrect API key provided.", refused=principal)
        if record.revoked:
            raise AuthenticationError("This API key has been revoked.", refused=principal)
        moment = time.time()
        if entry.expires is not None and entry.expires <= moment:
            expired = f"This API key expired at {record.expires_at.isoformat()}."  # type: ignore[union-attr]
            raise AuthenticationError(expired, refused=principal)
        self.last_used[key_id] = moment
        return principal

    def invalidate(self, change: str) -> None:
        self._changes += 1
        kind, _, name = change.partition(":")
        if kind == "key":
            self._cache.pop(name, None)
        elif kind == "team":
            for key_id in [k for k, e in self._cache.items() if e.record is None or e.record.team == name]:
                self._cache.pop(key_id, None)
        else:
            self._cache.clear()

    async def _entry(self, key_id: str) -> _Entry:
        entry = self._cache.get(key_id)
        if entry is not None and time.monotonic() - entry.fetched < (self._ttl if entry.record else self._miss_ttl):
            return entry
        pending = self._pending.get(key_id)
        if pending is None:
            pending = self._pending[key_id] = asyncio.ensure_future(self._load(key_id, stale=entry))
            pending.add_done_callback(lambda _: self._pending.pop(key_id, None))
        return await asyncio.shield(pending)

    async def _load(self, key_id: str, stale: _Entry | None) -> _Entry:
        changes = self._changes
        try:
            record = await self._store.get_key(key_id)
            team = await self._store.get_team(record.team) if record else None
        except StoreError as exc:
            if stale is not None:
                return stale  # a store outage must not lock out keys we already know
            log.warning("key store unavailable: %s", exc)
            raise StoreUnavailableError("The key store is unavailable; try again shortly.") from None
        principal = None
        if record is not None:
            policy = self._teams.build(team) if team else None
            principal = Principal(key_id, record.name, policy, tuple(record.models), record)
        expires = record.expires_at.timestamp() if record is not None and record.expires_at is not None else None
        entry = _Entry(time.monotonic(), record, principal, expires)
        if self._changes == changes:  # else a change (a revocation) may have landed between the reads
            self._cache[key_id] = entry
        return entry

    def take_last_used(self) -> dict[str, float]:
        taken, self.last_used = self.last_used, {}
        return taken


def _secret_matches(record: KeyRecord, digest: bytes) -> bool:
    match = hmac.compare_digest(digest, record.hash.encode())
    moment = None
    for previous in record.previous:
        moment = moment or now()
        match |= hmac.compare_digest(digest, previous.hash.encode()) and previous.valid_until > moment
    return match
