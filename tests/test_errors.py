"""The error tree drawn at the top of app/errors.py is the tree of its classes: every subclass of
`GatewayError` drawn once, under its parent, with its status, and with the code it sets."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from app import errors
from app.errors import GatewayError

# "    │   ├── RequestTooLargeError      413 request_too_large": the branch, the name, the status
LINE = re.compile(r"^(?P<branch>(?:[│ ]   )*(?:[├└]── )?)(?P<name>[A-Z]\w*Error)\s+(?P<status>\d{3})\b(?P<rest>.*)$")
CONTINUED = re.compile(r"^[│ ]*\s+\|")  # "        │                                 | catalogue_unavailable"


@dataclass
class Drawn:
    name: str
    depth: int
    status: int
    text: str
    last: bool  # drawn with └── (the last child of its parent)
    parent: str | None = None
    children: list[str] = field(default_factory=list)


def drawing() -> list[str]:
    """The tree's lines: the indented block of the docstring that starts with `GatewayError`."""
    doc = errors.__doc__
    assert doc is not None
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("GatewayError "))
    block = []
    for line in lines[start:]:
        if not line.strip():
            break
        assert line.startswith("    "), line
        block.append(line[4:])
    return block


def drawn() -> dict[str, Drawn]:
    """The classes the drawing names, with the parent their indentation gives them."""
    nodes: dict[str, Drawn] = {}
    ancestors: list[Drawn] = []  # the last class drawn at each depth
    previous: Drawn | None = None
    for line in drawing():
        match = LINE.match(line)
        if match is None:
            assert previous is not None and CONTINUED.match(line), f"not a line of the tree: {line!r}"
            previous.text += " " + line
            continue
        branch = match["branch"]
        depth = len(branch) // 4
        name = match["name"]
        assert name not in nodes, f"{name} drawn twice"
        node = Drawn(name, depth, int(match["status"]), match["rest"], last=branch.endswith("└── "))
        assert depth <= len(ancestors), f"{name} is indented under nothing"
        del ancestors[depth:]
        if depth:
            node.parent = ancestors[-1].name
            ancestors[-1].children.append(name)
        ancestors.append(node)
        nodes[name] = previous = node
    return nodes


def classes() -> dict[str, type[GatewayError]]:
    """`GatewayError` and every class below it, walked through `__subclasses__()`."""
    found: dict[str, type[GatewayError]] = {}

    def walk(cls: type[GatewayError]) -> None:
        found[cls.__name__] = cls
        for sub in cls.__subclasses__():
            walk(sub)

    walk(GatewayError)
    return found


def test_the_drawing_names_every_error_class_and_no_other() -> None:
    assert sorted(drawn()) == sorted(classes())


def test_each_class_is_drawn_under_its_parent() -> None:
    nodes, found = drawn(), classes()
    for name, node in nodes.items():
        bases = [base.__name__ for base in found[name].__bases__ if issubclass(base, GatewayError)]
        assert ([node.parent] if node.parent else []) == bases, name
    assert nodes["GatewayError"].parent is None


def test_the_last_child_of_each_parent_and_only_it_is_drawn_with_a_corner() -> None:
    nodes = drawn()
    for node in nodes.values():
        corners = [nodes[child].last for child in node.children]
        assert corners == [False] * (len(corners) - 1) + [True] * bool(corners), node.name


def test_each_class_is_drawn_with_its_status() -> None:
    nodes = drawn()
    for name, cls in classes().items():
        assert nodes[name].status == cls.status, name


def test_each_code_a_class_sets_is_on_its_line() -> None:
    nodes = drawn()
    for name, cls in classes().items():
        if "code" in vars(cls) and cls.code is not None:
            assert re.search(rf"(?<![\w-]){re.escape(cls.code)}(?![\w-])", nodes[name].text), (name, cls.code)


def test_the_drawing_keeps_the_anthropic_rendering_note() -> None:
    doc = errors.__doc__ or ""
    assert "render_anthropic" in doc
    assert "Anthropic's twin of each row" in doc
    assert "ANTHROPIC_TYPES" in doc
