"""`loraforge check`: validate recipes (schema, cross-field rules, files) and inspect LoRA files."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from loraforge.console import out, print_json
from loraforge.recipe import Problem, Recipe, validate_recipe_file

LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt")


class CheckFormat(str, Enum):
    table = "table"
    json = "json"
    github = "github"


class VramMethod(str, Enum):
    analytic = "analytic"
    traced = "traced"


@dataclass(frozen=True)
class VramRequest:
    """What `--vram/--budget/--vram-method` ask for. ``budget`` is a size, ``header`` or None."""

    method: str
    budget: str | None


@dataclass(frozen=True)
class FileReport:
    path: str
    problems: tuple[Problem, ...]
    vram: Any = None  # a loraforge.vram.VramEstimate when asked for

    def failed(self, strict: bool) -> bool:
        return any(p.severity == "error" or strict for p in self.problems)


def command(
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="Recipe files (.yaml) or LoRA files (.safetensors).", show_default=False
        ),
    ],
    fmt: Annotated[
        CheckFormat,
        typer.Option("--format", "-f", help="table, json, or github (workflow annotations)."),
    ] = CheckFormat.table,
    strict: Annotated[bool, typer.Option("--strict", help="Fail on warnings too.")] = False,
    vram: Annotated[
        bool, typer.Option("--vram", help="Also estimate the peak GPU memory of a training step.")
    ] = False,
    budget: Annotated[
        str | None,
        typer.Option(
            "--budget",
            help="Card memory, e.g. 12GB, or `header` for each recipe's `# vram:` line; "
            "fail when the estimate exceeds it (implies --vram).",
        ),
    ] = None,
    vram_method: Annotated[
        VramMethod,
        typer.Option(
            "--vram-method",
            help="analytic (instant) or traced (a fake-tensor training step: seconds, imports torch).",
        ),
    ] = VramMethod.analytic,
) -> None:
    """Validate recipes: schema, cross-field rules, dataset folders, optionally the VRAM budget.

    Exit 0 clean, 1 problems found, 2 usage error. LoRA files are inspected instead.

    Example:

        loraforge check recipe.yaml
        loraforge check recipes/*.yaml --format github --strict
        loraforge check recipe.yaml --vram --budget 12GB
        loraforge check output/mychar.safetensors
    """
    loras = [p for p in paths if p.suffix.lower() in LORA_SUFFIXES]
    recipes = [p for p in paths if p not in loras]
    request = VramRequest(vram_method.value, budget) if vram or budget else None
    code = 0
    if recipes:
        reports = [check_recipe(p, request) for p in recipes]
        _render(reports, fmt)
        code = 1 if any(r.failed(strict) for r in reports) else 0
    if loras:
        from loraforge.commands.lora_report import check_lora_files

        code = max(
            code,
            check_lora_files(loras, fmt.value if fmt != CheckFormat.github else "table", strict),
        )
    raise typer.Exit(code)


def check_recipe(path: Path, vram: VramRequest | None = None) -> FileReport:
    """Validate one recipe file, adding backend, dataset-folder and (when asked) VRAM findings
    when the recipe itself is valid."""
    validation = validate_recipe_file(path)
    problems = list(validation.problems)
    estimate = None
    if validation.recipe is not None:
        found = backend_problems(validation.recipe, str(path))
        found += filesystem_problems(validation.recipe, str(path))
        problems += [validation.placed(p) for p in found]
        problems.sort(key=lambda p: (p.line or 0, p.column or 0))
        if vram is not None:
            estimate, found = vram_problems(validation.recipe, path, vram)
            problems += found
    return FileReport(str(path), tuple(problems), estimate)


def vram_problems(recipe: Recipe, path: Path, request: VramRequest) -> tuple[Any, list[Problem]]:
    """The VRAM estimate, and an error when it exceeds the budget (naming the cheapest fix)."""
    from loraforge.errors import LoraforgeError
    from loraforge.vram import estimate_vram, format_bytes, header_budget, parse_size

    try:
        if request.budget == "header":
            budget = header_budget(path)
        else:
            budget = parse_size(request.budget) if request.budget else None
        estimate = estimate_vram(recipe, method=request.method, budget_bytes=budget)
    except LoraforgeError as e:
        return None, [Problem("error", e.message, "model", str(path), hint=e.hint)]
    if estimate.fits is not False:
        return estimate, []
    message = (
        f"VRAM estimate {format_bytes(estimate.total_bytes)} exceeds the budget "
        f"{format_bytes(estimate.budget_bytes)}"
    )
    hint = f"try: {estimate.suggestions[0].change}" if estimate.suggestions else None
    return estimate, [Problem("error", message, "training", str(path), hint=hint)]


def backend_problems(recipe: Recipe, source: str) -> list[Problem]:
    """What the chosen network backend refuses (checked without torch)."""
    from loraforge.backends import check_network_config
    from loraforge.errors import RecipeError

    try:
        check_network_config(recipe.network)
    except RecipeError as e:
        # The backend's messages start with the field ("network.dropout: …"): use it as the path.
        field, sep, message = e.message.partition(": ")
        if not (sep and field.startswith("network.") and " " not in field):
            field, message = "network", e.message
        return [Problem("error", message, field, source, hint=e.hint)]
    return []


def filesystem_problems(recipe: Recipe, source: str) -> list[Problem]:
    """Dataset and model-file findings, tagged with the recipe file. Missing files and missing or
    empty folders are warnings: presets point at folders the user still has to fill, and CI
    checks recipes without their images and models (``--strict`` fails on them)."""
    from dataclasses import replace

    from loraforge.data.checks import check_dataset
    from loraforge.models.pickles import PICKLE_HINT, pickle_message, pickled_weights
    from loraforge.recipe.problems import FIX_PATH_HINT

    found = [replace(p, file=source) for p in check_dataset(recipe.dataset, empty="warning")]
    files = {
        "model.base": recipe.model.base,
        "model.vae": recipe.model.vae,
        "network.weights": recipe.network.weights,
    }
    for field, value in files.items():
        # local paths were made absolute when the recipe was read; hub ids were not
        if value and Path(value).is_absolute() and not Path(value).exists():
            found.append(
                Problem("warning", f"{value} does not exist", field, source, hint=FIX_PATH_HINT)
            )
    for field in ("model.base", "model.vae"):
        value = files[field]
        pickles = pickled_weights(Path(value)) if value and Path(value).is_absolute() else []
        if pickles and not recipe.model.allow_pickle:
            message = pickle_message(pickles, field).removeprefix(f"{field}: ")
            found.append(Problem("error", message, field, source, hint=PICKLE_HINT))
    return found


def _render(reports: list[FileReport], fmt: CheckFormat) -> None:
    if fmt == CheckFormat.json:
        print_json([_report_dict(r) for r in reports])
        return
    if fmt == CheckFormat.github:
        for r in reports:
            for p in r.problems:
                where = (
                    f"file={p.file or r.path}"
                    + (f",line={p.line}" if p.line else "")
                    + (f",col={p.column}" if p.column else "")
                )
                text = f"{p.path}: {p.message}" if p.path else p.message
                if p.hint:
                    text += f" ({p.hint})"
                out.file.write(f"::{p.severity} {where}::{text}\n")
        return
    for r in reports:
        _render_problems(r)
        if r.vram is not None:
            from loraforge.vram import render_vram

            out.print(render_vram(r.vram))


#: more findings than this are printed one per line: a table that long is slow and unreadable
_TABLE_ROWS = 200


def _render_problems(r: FileReport) -> None:
    if not r.problems:
        out.print(f"[green]ok[/]  {r.path}")
        return
    if len(r.problems) > _TABLE_ROWS:
        for p in r.problems:
            out.file.write(f"{p.severity}: {p}\n")
        _render_counts(r)
        return
    table = Table(title=r.path, title_justify="left", show_lines=False)
    for column in ("", "where", "field", "problem"):
        table.add_column(column, overflow="fold")
    for p in r.problems:
        mark = "[red]error[/]" if p.severity == "error" else "[yellow]warning[/]"
        message = p.message + (f"\n[dim]{p.hint}[/]" if p.hint else "")
        where = f"{p.line}:{p.column}" if p.line else ""
        table.add_row(mark, where, p.path, message)
    out.print(table)
    _render_counts(r)


def _render_counts(r: FileReport) -> None:
    errors = sum(p.severity == "error" for p in r.problems)
    warnings = len(r.problems) - errors
    out.print(f"{errors} error(s), {warnings} warning(s)")


def _report_dict(report: FileReport) -> dict[str, Any]:
    data: dict[str, Any] = {
        "file": report.path,
        "ok": not report.failed(False),
        "problems": [p.to_dict() for p in report.problems],
    }
    if report.vram is not None:
        from loraforge.vram import vram_to_dict

        data["vram"] = vram_to_dict(report.vram)
    return data
