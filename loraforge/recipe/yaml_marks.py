"""Read YAML safely, with numbers like ``1e-4`` as floats, remembering where every value stands.

Hostile or broken documents end in findings, never in a hang or a traceback: aliases that refer to
themselves or that expand the document past :data:`MAX_EXPANDED_NODES` values ("billion laughs")
are refused before anything is built, and numbers Python cannot hold (a 5,000-digit integer) or
that are not finite (``.nan``, ``.inf``, ``1e400``) are reported at their place.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

#: aliases may expand a document to at most this many values (nodes) beyond what it writes out
MAX_EXPANDED_NODES = 100_000

# YAML 1.1 (PyYAML) needs a dot in a float; users write 1e-4 and expect a number.
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class DocumentRefused(yaml.MarkedYAMLError):
    """A document that is refused before it is built (recursive or exploding aliases)."""


class _Numbers:
    """Constructors that keep numbers which cannot be used as their text and remember them in
    ``bad_values`` (``id(node) -> message``), so that the caller can report them at their path."""

    bad_values: dict[int, str]

    def construct_yaml_int(self, node: yaml.ScalarNode) -> Any:
        try:
            return super().construct_yaml_int(node)  # type: ignore[misc]
        except ValueError:  # Python refuses int() of more than 4,300 digits
            digits = sum(c.isdigit() for c in str(node.value))
            self.bad_values[id(node)] = f"a number with {digits} digits is far too large"
            return str(node.value)

    def construct_yaml_float(self, node: yaml.ScalarNode) -> Any:
        value = super().construct_yaml_float(node)  # type: ignore[misc]
        if not math.isfinite(value):
            self.bad_values[id(node)] = (
                f"{node.value} is not a finite number (NaN and infinity are not allowed)"
            )
        return value


class _PythonLoader(_Numbers, yaml.SafeLoader):
    """SafeLoader with scientific-notation floats; no arbitrary Python objects, ever."""


# libyaml parses about ten times faster than the pure-Python parser and builds the same nodes;
# the pure-Python one words syntax errors better (it is used again to explain one).
_FastLoader: type = (
    type("_FastLoader", (_Numbers, yaml.CSafeLoader), {})
    if hasattr(yaml, "CSafeLoader")
    else _PythonLoader
)


def _configure(loader: Any) -> None:
    loader.add_constructor("tag:yaml.org,2002:int", _Numbers.construct_yaml_int)
    loader.add_constructor("tag:yaml.org,2002:float", _Numbers.construct_yaml_float)
    loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
    # YAML 1.1 also reads yes/no/on/off as booleans, which turns kohya's `mixed_precision: no`
    # into `false`. Like YAML 1.2, only true/false are booleans here.
    loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in loader.yaml_implicit_resolvers.items()
    }
    loader.add_implicit_resolver(
        "tag:yaml.org,2002:bool",
        re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
        list("tTfF"),
    )


for _loader in {_PythonLoader, _FastLoader}:
    _configure(_loader)

Path = tuple[Any, ...]


@dataclass
class ParsedYaml:
    """The document and, for each path, the 1-based (line, column) of its value and of its key.

    ``bad_values`` lists ``(path, message)`` for numbers that cannot be used (too many digits,
    not finite); their value in ``data`` is meaningless.
    """

    data: Any
    value_marks: dict[Path, tuple[int, int]] = field(default_factory=dict)
    key_marks: dict[Path, tuple[int, int]] = field(default_factory=dict)
    duplicate_keys: list[Path] = field(default_factory=list)
    bad_values: list[tuple[Path, str]] = field(default_factory=list)

    def mark(self, path: Path, *, key: bool = False) -> tuple[int, int] | None:
        """The mark of ``path`` or of its nearest existing ancestor."""
        marks = self.key_marks if key else self.value_marks
        for end in range(len(path), -1, -1):
            found = marks.get(tuple(path[:end])) or self.key_marks.get(tuple(path[:end]))
            if found:
                return found
        return None


def parse_yaml(text: str) -> ParsedYaml:
    """Parse one YAML document.

    Raises:
        yaml.YAMLError: (with a mark) on syntax errors; :class:`DocumentRefused` for aliases
            that refer to themselves or expand past :data:`MAX_EXPANDED_NODES`.
    """
    try:
        node, data, bad = _load(text, _FastLoader)
    except DocumentRefused:
        raise
    except yaml.YAMLError:
        if _FastLoader is _PythonLoader:
            raise
        _load(text, _PythonLoader)  # raises the same error, better worded
        raise
    parsed = ParsedYaml(data)
    if node is not None:
        _collect(node, (), parsed, bad)
    return parsed


def _load(text: str, cls: Any) -> tuple[yaml.Node | None, Any, dict[int, str]]:
    loader = cls(text)
    loader.bad_values = {}
    try:
        node = loader.get_single_node()
        if node is not None and "*" in text:  # without a "*" there is no alias
            check_aliases(node)
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return node, data, loader.bad_values


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def check_aliases(root: yaml.Node, limit: int = MAX_EXPANDED_NODES) -> None:
    """Refuse a node graph that is cyclic, or whose aliases expand it by more than ``limit``.

    The expanded size is computed once per distinct node (bottom-up), so a "billion laughs"
    document is measured in microseconds, never expanded.

    Raises:
        DocumentRefused: at the mark of the anchored node that is the problem.
    """
    size: dict[int, int] = {}
    entered: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            size[key] = 1 + sum(size[id(child)] for child in _children(node))
            continue
        if key in size:
            continue
        if key in entered:  # entered, not finished: an ancestor of itself
            raise DocumentRefused(
                None,
                None,
                "an alias refers to the node that contains it (a recursive document)",
                node.start_mark,
            )
        entered.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node))
    extra = size[id(root)] - len(size)
    if extra > limit:
        worst = max(
            (n for n in _distinct(root) if size[id(n)] > 1),
            key=lambda n: size[id(n)],
            default=root,
        )
        raise DocumentRefused(
            None,
            None,
            f"aliases expand the document by {extra:,} values (more than {limit:,}); "
            "write the values out instead",
            worst.start_mark,
        )


def _distinct(root: yaml.Node) -> list[yaml.Node]:
    """Every node of an acyclic graph once, anchored nodes that are reused included."""
    seen: dict[int, yaml.Node] = {}
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        stack.extend(_children(node))
    counts: dict[int, int] = {}
    for node in seen.values():
        for child in _children(node):
            counts[id(child)] = counts.get(id(child), 0) + 1
    return [node for key, node in seen.items() if counts.get(key, 0) > 1]


def _pos(mark: yaml.Mark) -> tuple[int, int]:
    return mark.line + 1, mark.column + 1


def _collect(node: yaml.Node, path: Path, parsed: ParsedYaml, bad: dict[int, str]) -> None:
    # Iterative walk: a hostile document must not blow the Python stack.
    stack = [(node, path)]
    reported: set[int] = set()
    while stack:
        current, where = stack.pop()
        parsed.value_marks.setdefault(where, _pos(current.start_mark))
        if id(current) in bad and id(current) not in reported:
            reported.add(id(current))
            parsed.bad_values.append((where, bad[id(current)]))
        if isinstance(current, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, value_node in current.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else id(key_node)
                child = (*where, key)
                if key in seen:
                    parsed.duplicate_keys.append(child)
                seen.add(key)
                parsed.key_marks[child] = _pos(key_node.start_mark)
                parsed.value_marks[child] = _pos(value_node.start_mark)
                stack.append((value_node, child))
        elif isinstance(current, yaml.SequenceNode):
            for index, item in enumerate(current.value):
                stack.append((item, (*where, index)))
