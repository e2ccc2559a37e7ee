"""The recipe JSON Schema: loading it, filling its defaults, and turning its errors into Problems."""

from __future__ import annotations

import copy
import difflib
import functools
import json
import math
from typing import Any

from loraforge.recipe.kohya import kohya_hint
from loraforge.recipe.problems import Problem, format_path
from loraforge.resources import data_path

_PATTERN_MEANINGS = {
    "^\\.[^/\\\\\\u0000]+$": "a file extension like .txt (no /, \\ or NUL character)",
    "^[^/\\\\\\u0000]+$": "a file name (no /, \\ or NUL character)",
}

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


def _is_integer(_checker: Any, value: Any) -> bool:
    # JSON Schema counts 1e308 and 3.0 as integers; a recipe's integer fields take integers only
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(_checker: Any, value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return isinstance(value, int) or math.isfinite(value)


@functools.cache
def _validator() -> Any:
    from jsonschema import Draft202012Validator, validators

    checker = Draft202012Validator.TYPE_CHECKER.redefine_many(
        {"integer": _is_integer, "number": _is_number}
    )
    strict = validators.extend(Draft202012Validator, type_checker=checker)
    return strict(load_schema())


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
    return _filled(data, load_schema() if schema is None else schema)


_NO_SCHEMA: dict[str, Any] = {}


def _filled(value: Any, schema: dict[str, Any]) -> Any:
    """A copy of ``value`` (one pass, no deepcopy) with the defaults of ``schema`` added."""
    if isinstance(value, dict):
        properties = schema.get("properties", _NO_SCHEMA)
        result = {
            key: _filled(item, properties.get(key, _NO_SCHEMA)) for key, item in value.items()
        }
        for name, prop in properties.items():
            if name not in result and "default" in prop:
                default = prop["default"]
                result[name] = (
                    _filled(copy.deepcopy(default), prop)
                    if isinstance(default, dict | list)
                    else default
                )
        return result
    if isinstance(value, list):
        items = schema.get("items")
        return [_filled(item, items if isinstance(items, dict) else _NO_SCHEMA) for item in value]
    return value


def schema_problems(
    data: Any, known: set[tuple[Any, ...]] | frozenset[tuple[Any, ...]] = frozenset()
) -> list[tuple[tuple[Any, ...], str, str | None, bool]]:
    """Validate ``data``; return ``(path, message, hint, on_key)`` for every error, in document order.

    Args:
        known: paths whose values are already reported (e.g. a number YAML cannot hold): no
            second finding there, nor for an either-or field (``oneOf``) that holds one.
    """
    errors = list(_validator().iter_errors(data))
    # a value of the wrong type gets one finding, not also one for its bounds
    wrong_type = {tuple(e.absolute_path) for e in errors if e.validator == "type"}
    found = []
    for error in errors:
        path = tuple(error.absolute_path)
        if path in known or (error.validator == "oneOf" and _holds(path, known)):
            continue
        if error.validator == "type" or path not in wrong_type:
            found.extend(_describe(error))
    found.sort(key=lambda item: [str(p) for p in item[0]])
    return found


def _holds(path: tuple[Any, ...], paths: set[tuple[Any, ...]] | frozenset[tuple[Any, ...]]) -> bool:
    return any(other[: len(path)] == path for other in paths)


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
        expected = _expected_type(error.validator_value)
        if isinstance(value, float) and not math.isfinite(value):
            expected = f"{expected} (finite)"
        return [(path, f"expected {expected}, got {_show(value)}", None, False)]
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
    if kind == "maxLength":
        return [(path, f"is longer than {error.validator_value} characters", None, False)]
    if kind == "pattern" and error.validator_value in _PATTERN_MEANINGS:
        meaning = _PATTERN_MEANINGS[error.validator_value]
        return [(path, f"expected {meaning}, got {_show(value)}", None, False)]
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
