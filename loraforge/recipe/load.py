"""Recipe file -> YAML with marks -> schema validation -> defaults -> frozen dataclasses."""

from __future__ import annotations

import dataclasses
import errno
import functools
import gc
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from loraforge.errors import RecipeError
from loraforge.recipe import types as recipe_types
from loraforge.recipe.problems import Problem, format_path, parse_path
from loraforge.recipe.rules import cross_field_problems
from loraforge.recipe.schema import as_problems, fill_defaults, schema_problems
from loraforge.recipe.yaml_marks import DocumentRefused, ParsedYaml, parse_yaml

_MAX_BYTES = 5_000_000  # a recipe is a few KB; anything this large is not one


@dataclass(frozen=True)
class Validation:
    """The outcome of validating one recipe: the typed recipe when there is no error, and all findings."""

    recipe: recipe_types.Recipe | None
    problems: tuple[Problem, ...]
    parsed: ParsedYaml | None = None  # for placing later findings (dataset, backend) in the file

    @property
    def errors(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "error")

    @property
    def warnings(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "warning")

    def placed(self, problem: Problem) -> Problem:
        """``problem`` with the line and column of its field (or nearest parent) in the file."""
        if problem.line is not None or self.parsed is None:
            return problem
        mark = self.parsed.mark(parse_path(problem.path))
        if mark is None:
            return problem
        return dataclasses.replace(problem, line=mark[0], column=mark[1])


def read_recipe_text(path: Path) -> str:
    """Read a recipe file as UTF-8 text.

    Raises:
        RecipeError: the path is missing, a directory, unreadable, too large or not UTF-8.
    """
    if not path.exists():
        raise RecipeError(f"{path}: no such file", hint="create one with `loraforge init`")
    if path.is_dir():
        raise RecipeError(f"{path} is a directory, not a recipe file", hint="pass the .yaml file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise RecipeError(f"{path}: cannot read ({e.strerror})") from e
    if len(raw) > _MAX_BYTES:
        raise RecipeError(f"{path}: {len(raw)} bytes is far too large for a recipe")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise RecipeError(
            f"{path}: not UTF-8 text (byte {e.start})", hint="save the file as UTF-8"
        ) from e


def validate_recipe_file(path: Path | str) -> Validation:
    """Validate a recipe file, collecting every problem.

    Raises:
        RecipeError: only when the file cannot be read at all (see :func:`read_recipe_text`).
    """
    path = Path(path)
    text = read_recipe_text(path)
    return validate_recipe_text(text, source=str(path), base_dir=path.resolve().parent)


def validate_recipe_text(
    text: str, *, source: str = "<recipe>", base_dir: Path | None = None
) -> Validation:
    """Validate recipe text; relative paths resolve against ``base_dir`` (default: the working folder)."""
    # Validation allocates one long-lived object per YAML value and frees nothing: the cyclic
    # collector would only re-scan them again and again (a third of the time of a large recipe).
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _validate(text, source, Path.cwd() if base_dir is None else base_dir)
    finally:
        if was_enabled:
            gc.enable()


def _validate(text: str, source: str, base_dir: Path) -> Validation:
    try:
        parsed = parse_yaml(text)
    except yaml.YAMLError as e:
        return Validation(None, (_yaml_problem(e, source),))
    except RecursionError:
        return Validation(
            None, (Problem("error", "the document is nested too deeply", file=source),)
        )
    if parsed.data is None:
        return Validation(
            None,
            (
                Problem(
                    "error",
                    "the recipe is empty",
                    file=source,
                    hint="start from `loraforge init --preset NAME`",
                ),
            ),
        )
    if not isinstance(parsed.data, dict):
        kind = type(parsed.data).__name__
        return Validation(
            None,
            (
                Problem(
                    "error",
                    f"a recipe is a mapping of sections, got a {kind}",
                    file=source,
                    line=1,
                    column=1,
                ),
            ),
        )
    found = schema_problems(parsed.data, known={path for path, _ in parsed.bad_values})
    found += [(path, message, None, False) for path, message in parsed.bad_values]
    problems = as_problems(found, parsed, source)
    problems += _duplicate_key_problems(parsed, source)
    if any(p.severity == "error" for p in problems):
        problems.sort(key=lambda p: (p.line or 0, p.column or 0))
        return Validation(None, tuple(problems))
    data = fill_defaults(parsed.data)
    unusable = _path_problems(data, base_dir)
    if unusable:
        problems += as_problems(unusable, parsed, source)
        problems.sort(key=lambda p: (p.line or 0, p.column or 0))
        return Validation(None, tuple(problems))
    data = _resolve_paths(data, base_dir)
    recipe = build_recipe(data, source=source, base_dir=base_dir)
    for severity, path, message, hint in cross_field_problems(recipe):
        line, column = parsed.mark(path) or (None, None)
        problems.append(Problem(severity, message, format_path(path), source, line, column, hint))
    problems.sort(key=lambda p: (p.line or 0, p.column or 0))
    has_errors = any(p.severity == "error" for p in problems)
    return Validation(None if has_errors else recipe, tuple(problems), parsed)


def load_recipe(path: Path | str) -> recipe_types.Recipe:
    """Load and validate a recipe; warnings are ignored here (``validate_recipe_file`` returns them).

    Raises:
        RecipeError: listing every error, each with file:line:column.
    """
    return _recipe_or_raise(validate_recipe_file(path))


def parse_recipe_text(
    text: str, source: str = "<string>", base_dir: Path | None = None
) -> recipe_types.Recipe:
    """Like :func:`load_recipe` for text (tests, tools)."""
    return _recipe_or_raise(validate_recipe_text(text, source=source, base_dir=base_dir))


def _recipe_or_raise(validation: Validation) -> recipe_types.Recipe:
    if validation.recipe is None:
        raise errors_found(validation.errors)
    return validation.recipe


def errors_found(errors: Sequence[Problem]) -> RecipeError:
    """One error listing every ``file:line:col: field: message`` of ``errors``."""
    lines = "\n".join(f"  {p}" for p in errors)
    count = len(errors)
    return RecipeError(
        f"the recipe has {count} error{'s' if count != 1 else ''}:\n{lines}",
        hint="`loraforge check RECIPE` shows all findings",
    )


def _yaml_problem(error: yaml.YAMLError, source: str) -> Problem:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    detail = getattr(error, "problem", None) or str(error)
    line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
    if isinstance(error, DocumentRefused):
        return Problem("error", f"refused: {detail}", "", source, line, column)
    hint = None
    if "\t" in detail or "\\t" in detail or "tab" in detail.lower():
        hint = "YAML indentation must use spaces, not tabs"
    return Problem("error", f"YAML syntax error: {detail}", "", source, line, column, hint)


def _duplicate_key_problems(parsed: ParsedYaml, source: str) -> list[Problem]:
    problems = []
    for path in parsed.duplicate_keys:
        line, column = parsed.key_marks.get(path, (None, None))
        problems.append(
            Problem(
                "error",
                "key appears twice (the last one would silently win)",
                format_path(path),
                source,
                line,
                column,
            )
        )
    return problems


_PATH_FIELDS = (
    ("model", "vae"),
    ("model", "clip_l"),
    ("model", "clip_g"),
    ("model", "t5xxl"),
    ("cache", "dir"),
    ("network", "weights"),
    ("output", "dir"),
    ("logging", "dir"),
)


def _path_slots(data: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """Every (mapping, key) of a recipe mapping that may hold a file-system path."""
    slots = [(data[section], key) for section, key in _PATH_FIELDS]
    slots.append((data["model"], "base"))  # a path, or a hub id that _resolve_paths leaves alone
    for subset in data["dataset"]["subsets"]:
        slots += [(subset, "dir"), (subset, "conditioning_data_dir")]
    return slots


def _path_fields(data: dict[str, Any]) -> list[tuple[tuple[Any, ...], Any]]:
    """``(field path, value)`` of every field that may name a file or folder."""
    fields: list[tuple[tuple[Any, ...], Any]] = [
        ((section, key), data[section].get(key)) for section, key in _PATH_FIELDS
    ]
    fields += [(("model", "base"), data["model"].get("base"))]
    fields += [(("tagging", "model"), data["tagging"].get("model"))]
    fields += [
        (("dataset", "subsets", index, key), subset.get(key))
        for index, subset in enumerate(data["dataset"]["subsets"])
        for key in ("dir", "conditioning_data_dir")
    ]
    return fields


def _path_problems(
    data: dict[str, Any], base_dir: Path
) -> list[tuple[tuple[Any, ...], str, str | None, bool]]:
    """Schema-style findings for paths no file system can use (a NUL character, a name or path
    longer than the system allows, a place that cannot be looked at)."""
    found = []
    for where, value in _path_fields(data):
        if not isinstance(value, str) or not value:
            continue
        reason = unusable_path(value, base_dir)
        if reason is not None:
            found.append((where, reason, "fix the path", False))
    return found


def unusable_path(value: str, base_dir: Path) -> str | None:
    """Why ``value`` cannot be used as a path (relative to ``base_dir``), or ``None``.

    A path that merely does not exist is usable (later checks report it).
    """
    if "\0" in value:
        return "the path contains a NUL character"
    try:
        os.stat(os.path.join(base_dir, os.path.expanduser(value)))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            return f"the path is too long for the file system ({len(value):,} characters)"
        return f"the path cannot be used ({e.strerror or e})"
    except ValueError as e:  # e.g. a character the platform refuses in paths
        return f"the path cannot be used ({e})"
    return None


def _resolve(value: str, base_dir: Path) -> str:
    path = os.path.expanduser(value)
    if os.path.isabs(path):
        return str(Path(path))
    return os.path.realpath(os.path.join(base_dir, path))


def _looks_like_path(value: str, base_dir: Path) -> bool:
    """A hub id (``org/name``) stays as written; anything that exists or looks local is a path."""
    if value.startswith((".", "/", "~")) or value.endswith(
        (".safetensors", ".ckpt", ".pt", ".bin")
    ):
        return True
    return (base_dir / Path(value).expanduser()).exists() or value.count("/") != 1


def _resolve_paths(data: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    for mapping, key in _path_slots(data):
        value = mapping.get(key)
        if value and (key != "base" or _looks_like_path(value, base_dir)):
            mapping[key] = _resolve(value, base_dir)
    return data


def shareable_dict(recipe: recipe_types.Recipe) -> dict[str, Any]:
    """:meth:`Recipe.to_dict` without the user's folder layout, for files people share.

    Paths inside the recipe's folder become relative to it (``dataset/10_cat``); other absolute
    paths keep only their last part (``sd15.safetensors``), as sd-scripts' ``ss_*`` keys do.
    Hub ids stay as written.
    """
    data = recipe.to_dict()
    base = Path(recipe.base_dir) if recipe.base_dir else None
    for mapping, key in _path_slots(data):
        value = mapping.get(key)
        if not value or not Path(value).is_absolute():
            continue
        path = Path(value)
        inside = base is not None and path.is_relative_to(base)
        mapping[key] = path.relative_to(base).as_posix() if inside else path.name
    return data


def build_recipe(
    data: dict[str, Any], *, source: str | None, base_dir: Path | None = None
) -> recipe_types.Recipe:
    """Turn a validated, defaulted recipe mapping into the frozen typed view."""
    sections = {name: _build(cls, data[name]) for name, cls in recipe_types.SECTIONS.items()}
    folder = None if base_dir is None else str(base_dir)
    return recipe_types.Recipe(**sections, source=source, base_dir=folder)


def section_defaults(name: str) -> Any:
    """A recipe section with every field at its schema default (e.g. ``section_defaults("network")``).

    Only for sections whose fields all have defaults (not ``model`` or ``dataset``).
    """
    from loraforge.recipe.schema import subschema

    return _build(recipe_types.SECTIONS[name], fill_defaults({}, subschema((name,))))


def _build(cls: type, data: dict[str, Any]) -> Any:
    return cls(**{name: convert(data.get(name)) for name, convert in _converters(cls)})


@functools.cache
def _converters(cls: type) -> tuple[tuple[str, Any], ...]:
    """``(field, converter)`` for each field of a recipe dataclass, worked out once per class
    (``typing.get_type_hints`` is far too slow to run per subset)."""
    hints = typing.get_type_hints(cls)
    return tuple((f.name, _converter(hints[f.name])) for f in dataclasses.fields(cls))


def _converter(hint: Any) -> Any:
    """A function turning a validated, defaulted value into the typed view's ``hint``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        convert = _converter(inner[0]) if len(inner) == 1 else _same
        return lambda value: None if value is None else convert(value)
    if dataclasses.is_dataclass(hint):
        return lambda value: None if value is None else _build(hint, value)
    if origin is tuple:
        item = _converter(args[0])
        pair = args == (int, int)

        def to_tuple(value: Any) -> Any:
            if value is None:
                return None
            if pair and isinstance(value, int):  # resolution: 512 -> (512, 512)
                return (value, value)
            return tuple(item(v) for v in value)

        return to_tuple
    if origin is dict:
        return lambda value: None if value is None else dict(value)
    if hint is float:
        return lambda value: (
            float(value) if isinstance(value, int) and not isinstance(value, bool) else value
        )
    return _same


def _same(value: Any) -> Any:
    return value
