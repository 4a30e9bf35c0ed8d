"""What a team changes on its requests: allowlist, attribution, upstream key, provider policy
and defaults, precomputed once per team record."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.auth.records import TeamRecord
from app.settings import AttributionSettings
from app.upstream.client import attribution_headers


def allowed(model: str, globs: tuple[str, ...] | list[str]) -> bool:
    return not globs or any(fnmatch.fnmatchcase(model, glob) for glob in globs)


@dataclass(frozen=True, slots=True)
class TeamPolicy:
    name: str
    models: tuple[str, ...]
    headers: dict[str, str]  # the upstream headers this team's requests carry
    provider: dict[str, Any] | None
    defaults: dict[str, Any]
    record: TeamRecord
    missing_key_env: str | None = None  # its upstream key's variable is not set here


class TeamPolicyFactory:
    """Builds TeamPolicy objects from records, on top of the global attribution and key."""

    def __init__(self, attribution: AttributionSettings, upstream_auth: str, read_secret: Callable[[str], str | None]):
        self._attribution = attribution
        self._auth = upstream_auth
        self._read_secret = read_secret

    def build(self, team: TeamRecord) -> TeamPolicy:
        attribution = self._attribution.model_copy(
            update={
                k: v
                for k, v in (("app_url", team.app_url), ("app_title", team.app_title), ("categories", team.categories))
                if v is not None
            }
        )
        headers = {**attribution_headers(attribution), "Authorization": self._auth, "Content-Type": "application/json"}
        missing = None
        if team.upstream_key_env:
            secret = self._read_secret(team.upstream_key_env)
            if secret:
                headers["Authorization"] = f"Bearer {secret}"
            else:
                missing = team.upstream_key_env
        return TeamPolicy(team.name, tuple(team.models), headers, team.provider, team.defaults, team, missing)
