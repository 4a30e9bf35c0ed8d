"""`gateway keys generate`: a key made offline and declared by its hash in the config file,
written into the file in place (comments and layout kept) or printed as one `keys:` item."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from app.config_file import ConfigError, describe, parse_config
from app.settings import DeclaredKey, check_config


def add_command(keys: Any) -> None:
    generate = keys.add_parser(
        "generate",
        help="make a key offline, declared by its hash in the config file",
        description="With --config FILE the key is added to FILE's keys: and printed alone on stdout; without "
        "it, the keys: item is printed on stdout and the key on stderr (a redirect never writes the secret "
        "into a file). --json prints the key and the item as one JSON object.",
    )
    generate.add_argument("--name", required=True)
    generate.add_argument("--team", required=True)
    generate.add_argument("--config", metavar="FILE", help="add the key to this YAML config file, in place")
    generate.add_argument("--json", action="store_true", help="print JSON (id, name, team, hash, key)")
    generate.set_defaults(handler=_generate)


def _generate(args: argparse.Namespace) -> int:
    from app.auth.keys import hash_key, new_key, new_key_id

    key_id = new_key_id()
    plaintext = new_key(key_id)
    item = {"id": key_id, "name": args.name, "team": args.team, "hash": f"sha256:{hash_key(plaintext)}"}
    try:
        try:
            DeclaredKey.model_validate(item)  # a bad name is refused before any file is touched
        except ValidationError as exc:
            raise ConfigError([f"--{problem}" for problem in describe(exc, DeclaredKey)]) from None
        teams = declare(Path(args.config), item) if args.config else None
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"problem: {problem}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({**item, "key": plaintext, **({"config": args.config} if args.config else {})}, indent=2))
    elif args.config:
        print(plaintext, flush=True)
        print(
            f"added key {key_id} ({args.team}/{args.name}) to {args.config}; it loads at the next start.",
            file=sys.stderr,
        )
        print(
            f"The key {'above' if sys.stdout.isatty() else 'on standard output'} is shown once and stored nowhere "
            "(the file holds its hash): hand it over now.",
            file=sys.stderr,
        )
    else:
        print("Add this item under keys: in your config file (replace keys: [] with keys:):\n", file=sys.stderr)
        sys.stderr.flush()
        print(_block(item, 2, 4, "\n"), end="", flush=True)
        print(f"\nkey: {plaintext}\n(shown once and stored nowhere: hand it over now)", file=sys.stderr)
    if teams is not None and args.team not in teams:
        print(
            f"note: team '{args.team}' is not declared in {args.config}; the gateway starts only if the store "
            "holds it (gateway teams create) or it is declared under teams:",
            file=sys.stderr,
        )
    return 0


def declare(path: Path, item: dict[str, str]) -> set[str]:
    """Add `item` to the file's `keys:` list: a text edit where the parser says the list is, so
    every other byte of the file (comments, indentation, quoting) stays as it was. Handles a
    block list, a flow list (the shipped `keys: []`), an empty `keys:` and no `keys:` at all.
    The result must load, with the new key in it, before it replaces the file. Returns the
    teams the file declares."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read it ({exc.strerror or exc})"]) from None
    data = parse_config(text, str(path))  # bad YAML, a key given twice: refused before any edit
    edited = _with_item(text, yaml.compose(text, Loader=yaml.SafeLoader), item)
    try:
        check_config(edited, str(path))
        added = parse_config(edited, str(path)).get("keys") or []
        if not any(isinstance(key, dict) and key.get("id") == item["id"] for key in added):
            raise ConfigError([f"{path}: keys: the new key is not where the file is read from"])
    except ConfigError as exc:
        problems = [f"{path} is left as it was: with the key added it would not load:", *exc.problems]
        raise ConfigError(problems) from None
    _replace(path, edited)
    return {str(team.get("name")) for team in data.get("teams") or [] if isinstance(team, dict)}


def _with_item(text: str, root: yaml.Node | None, item: dict[str, str]) -> str:
    newline = "\r\n" if "\r\n" in text else "\n"
    entry = next((v for k, v in root.value if k.value == "keys"), None) if isinstance(root, yaml.MappingNode) else None
    if entry is None:  # no keys: at all: a new list at the end
        head = text if not text or text.endswith("\n") else text + newline
        return head + "keys:" + newline + _block(item, 2, 4, newline)
    empty = isinstance(entry, yaml.ScalarNode) and entry.tag == "tag:yaml.org,2002:null"
    if empty or (isinstance(entry, yaml.SequenceNode) and entry.flow_style and not entry.value):
        return _fill(text, entry, _block(item, 2, 4, newline), newline)
    if not isinstance(entry, yaml.SequenceNode):
        raise ConfigError([f"keys: expected a list, not {entry.tag.rsplit(':', 1)[-1]}"])
    if entry.flow_style:  # [a, b] becomes [a, b, {…}]
        close = entry.end_mark.index - 1  # the `]`
        before = text[:close].rstrip()
        flow = ", ".join(f"{name}: {json.dumps(value)}" for name, value in item.items())
        return before + ("" if before.endswith(",") else ",") + " {" + flow + "}" + text[len(before) :]
    first = entry.value[0]  # a block list has an item
    dash = entry.start_mark.column
    inner = first.start_mark.column if isinstance(first, yaml.MappingNode) else dash + 2
    at = _next_line(text, _last_end(entry))
    if at == len(text) and not text.endswith("\n"):  # the file's last line, without its newline
        text, at = text + newline, at + len(newline)
    return text[:at] + _block(item, dash, inner, newline) + text[at:]


def _fill(text: str, entry: yaml.Node, block: str, newline: str) -> str:
    """`keys:`, `keys: ~` or `keys: []` (a comment after it stays), followed by `block`."""
    start, end = entry.start_mark.index, entry.end_mark.index
    line_end = text.find("\n", end)
    rest = text[end:] if line_end < 0 else text[end:line_end]
    head = text[:start] if rest.strip() else text[:start].rstrip(" \t")
    text = head + text[end:]
    if "\n" not in text[len(head) :]:  # the file's last line, without its newline
        text += newline
    at = _next_line(text, len(head))
    return text[:at] + block + text[at:]


def _block(item: dict[str, str], dash: int, inner: int, newline: str) -> str:
    """`item` as a block list entry: `- ` at column `dash`, its fields at column `inner`."""
    lines = [
        " " * (dash if n == 0 else inner) + ("- " + " " * (inner - dash - 2) if n == 0 else "") + f"{name}: "
        f"{value if yaml.safe_load(value) == value else json.dumps(value)}"
        for n, (name, value) in enumerate(item.items())
    ]
    return newline.join(lines) + newline


def _last_end(node: yaml.Node) -> int:
    """Where a block node's last own character is (a block's end mark lies past the comments
    after it, at the next token)."""
    while isinstance(node, yaml.CollectionNode) and not node.flow_style and node.value:
        last = node.value[-1]
        node = last[1] if isinstance(last, tuple) else last
    return int(node.end_mark.index) - 1


def _next_line(text: str, index: int) -> int:
    """The start of the line after the one holding `index`."""
    end = text.find("\n", index)
    return len(text) if end < 0 else end + 1


def _replace(path: Path, text: str) -> None:
    """Write `text` over `path` at once (a crash leaves the old file or the new, never half). A
    symlink (a Kubernetes ConfigMap, stow) stays one: the file it points to is what is replaced,
    keeping its mode, and its owner where we may give it (root may; another user keeps its own)."""
    target = path.resolve()
    status = target.stat()
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        if (status.st_uid, status.st_gid) != (os.geteuid(), os.getegid()):
            with contextlib.suppress(PermissionError):
                os.chown(temporary, status.st_uid, status.st_gid)
        os.chmod(temporary, status.st_mode & 0o7777)  # after chown, which may clear setuid bits
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
