"""`GATEWAY_*` environment variables that name no setting: a typo (`GATEWAY_UPSTREAM_DEADLINE_S`,
one `_` for `__`) is otherwise ignored without a word. The names come from the Settings model;
other tools' variables under the prefix (the CLI's, Kubernetes' service links) are not warned of."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping
from typing import Any, get_origin

from pydantic import BaseModel

from app.config_file import unwrap_optional
from app.settings import FROM_FILES, Settings

PREFIX = "GATEWAY_"
# Ours but no setting (the CLI's GATEWAY_URL; GATEWAY_CONFIG names the file), and Kubernetes'
# service links for a service named `gateway`: GATEWAY_SERVICE_HOST, GATEWAY_SERVICE_PORT[_<name>],
# GATEWAY_PORT_<n>_TCP[_PROTO|_PORT|_ADDR] (its GATEWAY_PORT=tcp://… is the port setting's problem)
_OTHERS = re.compile(
    r"^GATEWAY_(URL|CONFIG|SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)$"
)


def strays(environ: Mapping[str, str]) -> list[str]:
    """A warning for each `GATEWAY_*` variable in `environ` that names no setting, with the
    nearest that does."""
    names, open_ended = _names(Settings, PREFIX)
    names |= {f"{name}_FILE" for name in FROM_FILES if name.startswith(PREFIX)}
    found = []
    for variable in sorted(environ):
        name = variable.upper()  # as pydantic-settings reads them
        if not name.startswith(PREFIX) or name in names or name.startswith(open_ended) or _OTHERS.match(name):
            continue
        if name.endswith("_FILE") and name.removesuffix("_FILE") in names:
            continue  # another setting's <NAME>_FILE: refused as a problem by the settings
        close = _closest(name, names)
        found.append(f"{variable} is not a setting" + (f"; did you mean {close}?" if close else ""))
    return found


def _names(model: type[BaseModel], prefix: str) -> tuple[set[str], tuple[str, ...]]:
    """Every variable naming a setting of `model` or of its sections, and the prefixes under
    which any name is one (a mapping's entries: `GATEWAY_MODELS__ALIASES__<name>`)."""
    names: set[str] = set()
    open_ended: list[str] = []
    for name, kind in _fields(model):
        variable = prefix + name.upper()
        names.add(variable)
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            inner, deeper = _names(kind, variable + "__")
            names |= inner
            open_ended += deeper
        elif get_origin(kind) is dict:
            open_ended.append(variable + "__")
    return names, tuple(open_ended)


def _fields(model: type[BaseModel]) -> Iterator[tuple[str, Any]]:
    """Each field's name (its alias if any: `limits.global`) and type, an optional setting's as
    the type it holds."""
    for name, field in model.model_fields.items():
        yield field.alias or name, unwrap_optional(field.annotation)


def _closest(name: str, names: set[str]) -> str | None:
    """The setting meant: the same letters with other underscores (`_` for `__`, one left out),
    else the nearest spelling."""
    squashed = {known.replace("_", ""): known for known in names}
    if hit := squashed.get(name.replace("_", "")):
        return hit
    close = difflib.get_close_matches(name, sorted(names), n=1, cutoff=0.8)
    return close[0] if close else None
