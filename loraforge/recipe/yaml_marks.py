"""Read YAML safely, with numbers like ``1e-4`` as floats, remembering where every value stands."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

# YAML 1.1 (PyYAML) needs a dot in a float; users write 1e-4 and expect a number.
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader with scientific-notation floats; no arbitrary Python objects, ever."""


_RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
# YAML 1.1 also reads yes/no/on/off as booleans, which turns kohya's `mixed_precision: no` into
# `false`. Like YAML 1.2, only true/false are booleans here.
_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in _RecipeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)

Path = tuple[Any, ...]


@dataclass
class ParsedYaml:
    """The document and, for each path, the 1-based (line, column) of its value and of its key."""

    data: Any
    value_marks: dict[Path, tuple[int, int]] = field(default_factory=dict)
    key_marks: dict[Path, tuple[int, int]] = field(default_factory=dict)
    duplicate_keys: list[Path] = field(default_factory=list)

    def mark(self, path: Path, *, key: bool = False) -> tuple[int, int] | None:
        """The mark of ``path`` or of its nearest existing ancestor."""
        marks = self.key_marks if key else self.value_marks
        for end in range(len(path), -1, -1):
            found = marks.get(tuple(path[:end])) or self.key_marks.get(tuple(path[:end]))
            if found:
                return found
        return None


def parse_yaml(text: str) -> ParsedYaml:
    """Parse one YAML document. Raises ``yaml.YAMLError`` (with a mark) on syntax errors."""
    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    parsed = ParsedYaml(data)
    if node is not None:
        _collect(node, (), parsed)
    return parsed


def _pos(mark: yaml.Mark) -> tuple[int, int]:
    return mark.line + 1, mark.column + 1


def _collect(node: yaml.Node, path: Path, parsed: ParsedYaml) -> None:
    # Iterative walk: a hostile document must not blow the Python stack.
    stack = [(node, path)]
    while stack:
        current, where = stack.pop()
        parsed.value_marks.setdefault(where, _pos(current.start_mark))
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
