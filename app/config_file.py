"""The YAML config file, read strictly, and configuration problems told in our words.

A key given twice in one mapping is a problem (YAML keeps only the last, so the first would
vanish without a word); secrets are refused in the file; pydantic's errors become `path: what is
wrong`, with "did you mean" for a misspelt setting.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any, NamedTuple, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails


class Secret(NamedTuple):
    """A secret setting: read from the environment (or the file `<env>_FILE` names) only, never
    from the config file. `name` is its path in the settings, dotted, as problems name it."""

    name: str
    env: str

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(self.name.split("."))

    def value(self, settings: BaseModel) -> str | None:
        """Its value in `settings` (a `SecretStr` opened), or None when unset."""
        value: Any = settings
        for part in self.path:
            value = getattr(value, part)
        return value.get_secret_value() if value is not None else None


# Every secret, the one list: the file sources, the config file's refusal, the error messages
# that never show a value and `gateway check`'s secret policy all read it
SECRETS = (
    Secret("api_key", "GATEWAY_API_KEY"),
    Secret("admin_key", "GATEWAY_ADMIN_KEY"),
    Secret("metrics_key", "GATEWAY_METRICS_KEY"),
    Secret("upstream.api_key", "OPENROUTER_API_KEY"),
)


class ConfigError(Exception):
    """The configuration cannot be used; `problems` lists each one as `path: message`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class RepeatedKeysError(ConfigError):
    """Keys given twice in the file (and any other problem found while reading it); `data` is the
    file as YAML reads it, the last of each repeated key kept, secrets left out, to be checked too."""

    def __init__(self, problems: list[str], data: dict[str, Any]) -> None:
        super().__init__(problems)
        self.data = data


def read_yaml(path: str, required: bool) -> dict[str, Any]:
    """The YAML config as a dict (see `parse_config`)."""
    file = Path(path)
    if not file.exists():
        if required:
            raise ConfigError([f"{path}: file not found"])
        return {}
    return parse_config(file.read_text(encoding="utf-8"), path)


def parse_config(text: str, path: str) -> dict[str, Any]:
    """The config file's text as a dict; refuses secrets in it, anything but a mapping, and a
    key given twice in one mapping, at every level (YAML keeps only the last, so the first
    would vanish without a word): then `RepeatedKeysError`, with the file as YAML reads it."""
    loader = _StrictLoader(text)
    try:
        data = loader.get_single_data() or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from None
    finally:
        loader.dispose()
    problems = [f"{path}:{line}: {what}" for line, what in sorted(loader.repeats)]
    if not isinstance(data, dict):
        raise ConfigError([*problems, f"{path}: the top level must be a mapping"])
    for secret in SECRETS:
        if _dig(data, secret.path) is not None:
            problems.append(f"{secret.name}: secrets are read from the environment only, remove it from the file")
            _drop(data, secret.path)
    if loader.repeats:
        raise RepeatedKeysError(problems, data)
    if problems:
        raise ConfigError(problems)
    return data


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, noting each mapping key given twice (and where)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.repeats: list[tuple[int, str]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # a merge (<<) may be overridden: that is what it is for
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if not isinstance(key, Hashable):
                continue
            if key in seen:
                self.repeats.append(
                    (line, f"{key!r} is given twice (first at line {seen[key]}); YAML keeps only the last")
                )
            else:
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _dig(data: Any, parts: tuple[str, ...]) -> Any:
    for part in parts:
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def _drop(data: dict[str, Any], parts: tuple[str, ...]) -> None:
    *outer, last = parts
    section = _dig(data, tuple(outer))
    if isinstance(section, dict):
        section.pop(last, None)


# What a pydantic error type means, in our words; `{…}` are filled from the error's context.
_MEANINGS = {
    "missing": "required, and not given",
    "int_parsing": "expected a whole number",
    "int_type": "expected a whole number",
    "int_from_float": "expected a whole number",
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "string_type": "expected text",
    "list_type": "expected a list",
    "dict_type": "expected a mapping (name: value)",
    "model_type": "expected a mapping (name: value)",
    "model_attributes_type": "expected a mapping (name: value)",
    "datetime_parsing": "expected a date and time such as 2030-01-31T00:00:00Z",
    "datetime_type": "expected a date and time such as 2030-01-31T00:00:00Z",
    "literal_error": "expected {expected}",
    "greater_than": "must be greater than {gt}",
    "greater_than_equal": "must be at least {ge}",
    "less_than": "must be less than {lt}",
    "less_than_equal": "must be at most {le}",
    "too_long": "at most {max_length} items, not {actual_length}",
    "too_short": "at least {min_length} items, not {actual_length}",
    "string_too_long": "at most {max_length} characters",
    "string_too_short": "at least {min_length} characters",
    "string_pattern_mismatch": "must match {pattern}",
}


def describe(exc: ValidationError, root: type[BaseModel], origins: Mapping[str, str] | None = None) -> list[str]:
    """Each of pydantic's errors as `path: what is wrong`, in our words rather than pydantic's. A
    secret's path also names the variable its value came from (`origins`, by the secret's name):
    `upstream.api_key (OPENROUTER_API_KEY): ...`."""
    return [_describe(err, root, origins or {}) for err in exc.errors()]


def _describe(err: ErrorDetails, root: type[BaseModel], origins: Mapping[str, str]) -> str:
    loc = err["loc"]
    where = ".".join(str(part) for part in loc)
    if where in origins:
        where += f" ({origins[where]})"
    ctx = {k: f"{v:g}" if isinstance(v, float) else v for k, v in (err.get("ctx") or {}).items()}
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), names_at(root, loc[:-1]), n=1)
        return f"{where}: unknown setting" + (f"; did you mean '{close[0]}'?" if close else "")
    if err["type"] in ("value_error", "assertion_error") and "error" in ctx:
        return f"{where}: {ctx['error']}" if where else str(ctx["error"])  # a whole-file check names its paths
    meaning = _MEANINGS.get(err["type"])
    if meaning is None:
        return f"{where}: {err['msg']}"
    meaning = meaning.format_map(ctx)
    shown = err.get("input")
    secret = any(tuple(str(p) for p in loc[-len(s.path) :]) == s.path for s in SECRETS)
    if isinstance(shown, str | int | float) and not secret and ", not " not in meaning:
        meaning += f", not {shown!r}"
    return f"{where}: {meaning}"


def names_at(root: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The setting names a section accepts (its aliases too), for "did you mean"."""
    kind: Any = root
    for part in loc:
        kind = unwrap_optional(kind)
        if kind is not None and isinstance(part, str) and issubclass(kind, BaseModel):
            fields = kind.model_fields
            field = fields.get(part) or next((f for f in fields.values() if f.alias == part), None)
            kind = field.annotation if field else None
        elif kind is not None and get_origin(kind) in (list, dict):
            kind = get_args(kind)[-1]  # a list's item, or a dict's value
        else:
            return []
    kind = unwrap_optional(kind)
    if not (isinstance(kind, type) and issubclass(kind, BaseModel)):
        return []
    return [field.alias or name for name, field in kind.model_fields.items()]


def unwrap_optional(kind: Any) -> Any:
    """`X | None` as `X`: the part of an optional setting's type that has parts."""
    if get_origin(kind) in (Union, types.UnionType):
        kinds = [k for k in get_args(kind) if k is not type(None)]
        return kinds[0] if len(kinds) == 1 else None
    return kind
