"""Managing teams and keys: what the admin API and the config file do to the store.

Every change is announced on the store's change feed, so every replica's authenticator
drops its cached copy within moments. Entries declared in the config file are read-only here.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, TypeVar

from app.auth.keys import hash_key, new_key, new_key_id
from app.auth.records import KeyFields, KeyRecord, PreviousSecret, TeamFields, TeamRecord, now
from app.config_file import ConfigError
from app.errors import ConflictError, InvalidRequestError, NotFoundError
from app.store.base import Store


class Registry:
    def __init__(self, store: Store) -> None:
        self.store = store

    # -- teams -----------------------------------------------------------------------------
    async def create_team(self, name: str, fields: TeamFields) -> TeamRecord:
        team = TeamRecord(name=name, **fields.model_dump(exclude_unset=True))
        if not await self.store.create_team(team):
            raise ConflictError(f"A team named '{name}' exists.", param="name", code="team_exists")
        await self.store.publish(f"team:{name}")
        return team

    async def team(self, name: str) -> TeamRecord:
        team = await self.store.get_team(name)
        if team is None:
            raise NotFoundError(f"No team named '{name}'.", param="name", code="team_not_found")
        return team

    async def update_team(self, name: str, changes: dict[str, Any]) -> TeamRecord:
        team = _writable(await self.team(name))
        updated = TeamRecord.model_validate({**team.model_dump(), **changes, "updated_at": now()})
        if not await self.store.update_team(updated):
            raise NotFoundError(f"No team named '{name}'.", param="name", code="team_not_found")
        await self.store.publish(f"team:{name}")
        return updated

    async def delete_team(self, name: str) -> None:
        _writable(await self.team(name))
        active = [k for k in await self.store.list_keys(team=name) if not k.revoked]
        if active:
            raise ConflictError(
                f"Team '{name}' still has {len(active)} active keys; revoke them first.",
                param="name",
                code="team_not_empty",
            )
        await self.store.delete_team(name)
        await self.store.publish(f"team:{name}")

    # -- keys ------------------------------------------------------------------------------
    async def create_key(self, name: str, team: str, fields: KeyFields) -> tuple[KeyRecord, str]:
        if await self.store.get_team(team) is None:
            raise InvalidRequestError(f"No team named '{team}'; create it first.", param="team", code="team_not_found")
        _future(fields)
        key_id = new_key_id()
        plaintext = new_key(key_id)
        key = KeyRecord(
            id=key_id, name=name, team=team, hash=hash_key(plaintext), **fields.model_dump(exclude_unset=True)
        )
        holder = await self.store.create_key(key)
        if holder is not None:
            held = await self.store.get_key(holder)
            why = (
                "; a revoked key keeps its name (for the usage history): pick another name, or rotate a "
                "key instead of revoking it to give its holder a new secret"
                if held is not None and held.revoked
                else ""
            )
            raise ConflictError(
                f"Team '{team}' already has a key named '{name}' (id {holder}){why}.",
                param="name",
                code="key_exists",
                metadata={"id": holder},
            )
        await self.store.publish(f"key:{key_id}")
        return key, plaintext

    async def key(self, key_id: str) -> KeyRecord:
        key = await self.store.get_key(key_id)
        if key is None:
            raise NotFoundError(f"No key with id '{key_id}'.", param="id", code="key_not_found")
        return key

    async def update_key(self, key_id: str, changes: dict[str, Any]) -> KeyRecord:
        key = _writable(await self.key(key_id))
        if "expires_at" in changes:
            _future(KeyFields(expires_at=changes["expires_at"]))
        updated = KeyRecord.model_validate({**key.model_dump(), **changes, "updated_at": now()})
        holder = await self.store.update_key(updated, old_name=key.name)
        if holder is not None:
            raise ConflictError(
                f"Team '{key.team}' already has a key named '{updated.name}' (id {holder}).",
                param="name",
                code="key_exists",
                metadata={"id": holder},
            )
        await self.store.publish(f"key:{key_id}")
        return updated

    async def revoke_key(self, key_id: str) -> KeyRecord:
        key = _writable(await self.key(key_id))
        if key.revoked:  # announced again: a revocation whose announcement was lost is healed by a retry
            await self.store.publish(f"key:{key_id}")
            return key
        return await self.update_key(key_id, {"revoked": True, "revoked_at": now()})

    async def rotate_key(self, key_id: str, grace_period_s: float) -> tuple[KeyRecord, str]:
        key = _writable(await self.key(key_id))
        if key.revoked:
            raise ConflictError("A revoked key cannot be rotated.", param="id", code="key_revoked")
        moment = now()
        previous = [p for p in key.previous if p.valid_until > moment]
        if grace_period_s > 0:
            previous.append(PreviousSecret(hash=key.hash, valid_until=moment + timedelta(seconds=grace_period_s)))
        plaintext = new_key(key_id)
        updated = await self.update_key(
            key_id, {"hash": hash_key(plaintext), "previous": previous, "rotated_at": moment}
        )
        return updated, plaintext

    # -- the config file ---------------------------------------------------------------------
    async def load_declared(self, teams: list[TeamRecord], keys: list[KeyRecord]) -> None:
        """Make the store hold exactly the declared entries: add, update, drop the withdrawn.
        Refuses (`ConfigError`, nothing written) a declared key whose team exists nowhere."""
        problems = await self.undeclared_teams(teams, keys)
        if problems:
            raise ConfigError(problems)
        declared_teams = {t.name for t in teams}
        for team in teams:
            if not await self.store.create_team(team):
                held = await self.store.get_team(team.name)
                stamp = held.created_at if held else team.created_at
                await self.store.update_team(team.model_copy(update={"created_at": stamp}))
        declared_keys = {k.id for k in keys}
        for stale in await self.store.list_keys():  # first: a key declared anew may reuse its name
            if stale.declared and stale.id not in declared_keys:
                await self.store.delete_key(stale.id)
        for key in keys:
            existing = await self.store.get_key(key.id)
            if existing is None:
                holder = await self.store.create_key(key)
                if holder is not None and holder != key.id:  # itself: another worker loaded it just now
                    raise ConflictError(f"keys: '{key.name}' of team '{key.team}' is taken by key {holder}")
            else:
                await self.store.update_key(key.model_copy(update={"created_at": existing.created_at}), existing.name)
        for stale_team in await self.store.list_teams():
            if stale_team.declared and stale_team.name not in declared_teams:
                await self.store.delete_team(stale_team.name)
        await self.store.publish("*")

    async def undeclared_teams(self, teams: list[TeamRecord], keys: list[KeyRecord]) -> list[str]:
        """A problem for each declared key whose team is neither declared nor in the store (a team
        declared before and withdrawn from the file now is about to go, so it does not count)."""
        declared = {t.name for t in teams}
        if all(key.team in declared for key in keys):
            return []
        stored = {t.name for t in await self.store.list_teams() if not t.declared}
        hint = "under teams: in the file, nor in the store; declare it, or create it (gateway teams create) first"
        return undeclared_teams(keys, declared | stored, hint)


def undeclared_teams(keys: list[KeyRecord], known: set[str], hint: str) -> list[str]:
    """`keys.<n>.team: no team '…' <hint>` for each key whose team is not in `known`."""
    return [f"keys.{n}.team: no team '{key.team}' {hint}" for n, key in enumerate(keys) if key.team not in known]


Record = TypeVar("Record", TeamRecord, KeyRecord)


def _writable(record: Record) -> Record:
    if record.declared:
        raise ConflictError("Declared in the config file; change it there.", code="read_only")
    return record


def _future(fields: KeyFields) -> None:
    if fields.expires_at is not None and fields.expires_at <= now():
        raise InvalidRequestError("'expires_at' must be in the future.", param="expires_at", code="invalid_value")
