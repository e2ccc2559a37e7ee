"""The recipe JSON Schema: loading it, filling its defaults, and turning its errors into Problems."""

from __future__ import annotations

import copy
import difflib
import functools
import json
from typing import Any

from loraforge.recipe.kohya import kohya_hint
from loraforge.recipe.problems import Problem, format_path
from loraforge.resources import data_path

_TYPE_NAMES = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "boolean": "true or false",
    "object": "a mapping",
    "array": "a list",
    "null": "null",
}


@functools.cache
def load_schema() -> dict[str, Any]:
    """The recipe schema shipped with loraforge (``schema/recipe.schema.json``)."""
    return json.loads(data_path("schema", "recipe.schema.json").read_text(encoding="utf-8"))


@functools.cache
def _validator() -> Any:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(load_schema())


def subschema(path: tuple[Any, ...]) -> dict[str, Any] | None:
    """The schema node that describes the value at ``path`` (list indices walk into ``items``)."""
    node: dict[str, Any] | None = load_schema()
    for part in path:
        if node is None:
            return None
        node = node.get("items") if isinstance(part, int) else node.get("properties", {}).get(part)
    return node


def fill_defaults(data: dict[str, Any], schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return a copy of validated ``data`` with every schema default filled in, recursively."""
    schema = load_schema() if schema is None else schema
    result = copy.deepcopy(data)
    _fill(result, schema)
    return result


def _fill(value: Any, schema: dict[str, Any]) -> None:
    if isinstance(value, dict) and "properties" in schema:
        for name, prop in schema["properties"].items():
            if name not in value and "default" in prop:
                value[name] = copy.deepcopy(prop["default"])
            if name in value:
                _fill(value[name], prop)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _fill(item, schema["items"])


def schema_problems(data: Any) -> list[tuple[tuple[Any, ...], str, str | None, bool]]:
    """Validate ``data``; return ``(path, message, hint, on_key)`` for every error, in document order."""
    found = []
    for error in _validator().iter_errors(data):
        found.extend(_describe(error))
    found.sort(key=lambda item: [str(p) for p in item[0]])
    return found


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _expected_type(schema_type: Any) -> str:
    types = schema_type if isinstance(schema_type, list) else [schema_type]
    return " or ".join(_TYPE_NAMES.get(t, t) for t in types)


def _describe(error: Any) -> list[tuple[tuple[Any, ...], str, str | None, bool]]:
    path = tuple(error.absolute_path)
    kind, value, schema = error.validator, error.instance, error.schema
    if kind == "additionalProperties" and isinstance(value, dict):
        allowed = sorted(schema.get("properties", {}))
        out = []
        for key in value:
            if key in allowed:
                continue
            if not isinstance(key, str):
                out.append(((*path, key), f"keys must be text, got {_show(key)}", None, True))
                continue
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hint = kohya_hint(key) or (
                f'did you mean "{close[0]}"?' if close else f"allowed: {', '.join(allowed)}"
            )
            where = format_path(path) or "the top level"
            out.append(((*path, key), f'unknown key "{key}" in {where}', hint, True))
        return out
    if kind == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        return [(path, f'missing required key "{missing}"', None, False)]
    if kind == "type":
        return [
            (
                path,
                f"expected {_expected_type(error.validator_value)}, got {_show(value)}",
                None,
                False,
            )
        ]
    if kind == "enum":
        options = [str(o) for o in error.validator_value]
        close = difflib.get_close_matches(str(value), options, n=1, cutoff=0.5)
        hint = f'did you mean "{close[0]}"?' if close else None
        return [(path, f"expected one of {', '.join(options)}; got {_show(value)}", hint, False)]
    bounds = {
        "minimum": ">=",
        "maximum": "<=",
        "exclusiveMinimum": ">",
        "exclusiveMaximum": "<",
    }
    if kind in bounds:
        what = _expected_type(schema.get("type", "number")).removesuffix(" or null")
        message = f"expected {what} {bounds[kind]} {error.validator_value}, got {_show(value)}"
        return [(path, message, None, False)]
    if kind == "oneOf" and path and path[-1] == "resolution":
        return [(path, f"expected a size like 512 or [832, 1216], got {_show(value)}", None, False)]
    if kind == "minLength":
        return [(path, "must not be empty", None, False)]
    if kind == "minItems":
        return [(path, f"needs at least {error.validator_value} item(s)", None, False)]
    return [(path, error.message, None, False)]


def as_problems(
    raw: list[tuple[tuple[Any, ...], str, str | None, bool]], marks: Any, source: str | None
) -> list[Problem]:
    """Attach file marks to schema findings."""
    problems = []
    for path, message, hint, on_key in raw:
        mark = marks.mark(path, key=on_key) if marks is not None else None
        line, column = mark if mark else (None, None)
        problems.append(Problem("error", message, format_path(path), source, line, column, hint))
    return problems
