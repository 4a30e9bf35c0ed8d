"""The README and the pages under docs/ stay a map that holds: every setting in `Settings` has a
row in docs/configuration.md's table (the error table is kept by test_error_table.py), every
docs page is reachable from the README, and every relative link leads to a file that exists."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from pydantic import BaseModel

from app import settings
from app.config_file import SECRETS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TICKED = re.compile(r"`([^`]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
# the variables that set a setting under another name than GATEWAY_<PATH, nested with __>
OTHER_NAMES = {
    "GATEWAY_CONFIG": "config_file",
    "OPENROUTER_API_KEY": "upstream.api_key",
    "OPENROUTER_BASE_URL": "upstream.base_url",
}


def setting_paths(model: type[BaseModel] = settings.Settings, prefix: str = "") -> dict[str, object]:
    """Every setting, as the table writes it: dotted YAML keys (`limits.global`, by alias), a
    `<id>` for a key of `models.per_model`; sections (`_Section`) walked into, everything else a leaf
    (its annotation as the value)."""
    found: dict[str, object] = {}
    hints = typing.get_type_hints(model)
    for name, field in model.model_fields.items():
        path = prefix + (field.alias or name)
        annotation = hints[name]
        if isinstance(annotation, type) and issubclass(annotation, settings._Section):
            found |= setting_paths(annotation, path + ".")
        elif typing.get_origin(annotation) is dict and _is_section(typing.get_args(annotation)[1]):
            found |= setting_paths(typing.get_args(annotation)[1], path + ".<id>.")
        else:
            found[path] = annotation
    return found


def _is_section(annotation: object) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, settings._Section)


def table() -> list[dict[str, str]]:
    """The settings table of docs/configuration.md, one dict per row, keyed by its header cells."""
    lines = [line for line in (DOCS / "configuration.md").read_text().splitlines() if line.startswith("| setting ")]
    assert len(lines) == 1, "docs/configuration.md: want one table headed `| setting |`"
    text = (DOCS / "configuration.md").read_text()
    rows = text[text.index(lines[0]) :].split("\n\n")[0].splitlines()
    names = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert names == ["setting", "env", "default", "meaning"], names
    return [dict(zip(names, (cell.strip() for cell in row.strip("|").split("|")), strict=True)) for row in rows[2:]]


def documented(cell: str) -> list[str]:
    """The settings a row's first cell names (`models.per_model.<id or glob>.fallbacks` as `<id>`)."""
    return [re.sub(r"<[^>]+>", "<id>", name) for name in TICKED.findall(cell)]


def env_name(path: str) -> str:
    return "GATEWAY_" + "__".join(path.split(".")).upper()


def test_every_setting_has_a_row_in_the_configuration_table() -> None:
    paths = setting_paths()
    assert {"upstream.retries.max_attempts", "limits.global", "models.per_model.<id>.fallbacks", "keys"} <= set(paths)
    named = {name for row in table() for name in documented(row["setting"])}
    missing = sorted(set(paths) - named)
    assert not missing, f"docs/configuration.md's table lacks {missing}"


def test_every_row_names_a_setting_that_exists() -> None:
    """A row is a setting, a `section.*` summary of settings, or (`—`) a variable of no one setting."""
    paths = setting_paths()
    for row in table():
        names = documented(row["setting"])
        assert names or row["setting"] == "—", row
        for name in names:
            if name.endswith(".*"):
                assert any(path.startswith(name[:-1]) for path in paths), name
            else:
                assert name in paths, f"docs/configuration.md names {name!r}, which Settings does not have"


def test_limit_rows_name_every_limit() -> None:
    """`limits.global` and its siblings are LimitValues: their row names each of its fields."""
    from app.auth.records import LimitValues

    rows = [row for row in table() if any(settings_typed(name) is LimitValues for name in documented(row["setting"]))]
    assert rows
    for row in rows:
        assert set(LimitValues.model_fields) <= set(TICKED.findall(row["meaning"])), row


def settings_typed(name: str) -> object:
    annotation = setting_paths().get(name)
    return typing.get_args(annotation)[0] if typing.get_origin(annotation) is typing.Union else annotation


def test_environment_names_are_the_ones_settings_reads() -> None:
    """The env column names what sets the row's setting: `GATEWAY_<PATH>` (nested with `__`) or
    one of the names read besides; every secret's variable has its row."""
    envs: set[str] = set()
    for row in table():
        names = documented(row["setting"])
        for env in TICKED.findall(row["env"]):
            if not re.fullmatch(r"[A-Z][A-Z0-9_]*", env):
                continue  # `--config FILE`, `<NAME>_FILE`
            envs.add(env)
            assert env in {env_name(name) for name in names} or OTHER_NAMES.get(env) in names, (env, row)
    assert {secret.env for secret in SECRETS} <= envs
    assert any(TICKED.findall(row["env"]) == ["<NAME>_FILE"] for row in table())


def test_every_docs_page_is_linked_from_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    linked = {(ROOT / target.split("#")[0]).resolve() for target in LINK.findall(readme)}
    pages = sorted(DOCS.glob("*.md"))
    assert len(pages) >= 11, pages
    unlinked = [page.name for page in pages if page.resolve() not in linked]
    assert not unlinked, f"README links no {unlinked}"


def test_every_relative_link_resolves() -> None:
    """In the README and every docs page (outside code blocks): a link that is not a URL names a
    file or directory that exists, and a `#fragment` into a markdown file names one of its headings."""
    broken = []
    for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        for target in LINK.findall(FENCE.sub("", page.read_text())):
            if re.match(r"^[a-z]+:", target):
                continue  # https:, mailto:
            path, _, fragment = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target}")
            elif fragment and file.suffix == ".md" and fragment not in anchors(file):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lowercase, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text()), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}
