"""`loraforge check`: validate recipes (schema, cross-field rules, files) and inspect LoRA files.

The findings come from :func:`loraforge.commands.recipe_findings.recipe_findings`, the same
function every command that loads a recipe uses, so ``check`` and ``train`` agree; this module
adds the VRAM estimate and renders.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from loraforge.commands.recipe_findings import problem_line, recipe_findings
from loraforge.console import out, print_json
from loraforge.recipe import Problem, Recipe

LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt")


class CheckFormat(str, Enum):
    text = "text"
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
        typer.Option(
            "--format",
            "-f",
            help="text (file:line:col: lines editors and terminals link to), table, json, "
            "or github (workflow annotations).",
        ),
    ] = CheckFormat.text,
    strict: Annotated[bool, typer.Option("--strict", help="Fail on warnings too.")] = False,
    no_data: Annotated[
        bool,
        typer.Option(
            "--no-data",
            help="Skip the dataset folders and model files (CI without them); train still "
            "needs them.",
        ),
    ] = False,
    vram: Annotated[
        bool, typer.Option("--vram", help="Also estimate the peak GPU memory of a training step.")
    ] = False,
    budget: Annotated[
        str | None,
        typer.Option(
            "--budget",
            metavar="SIZE|header",
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
    """Validate recipes: schema, cross-field rules, dataset folders and model files, what this
    machine lacks, optionally the VRAM budget.

    Errors are what makes `loraforge train` stop; warnings are worth a look (`train` prints them
    too). Exit 0 clean, 1 problems found, 2 usage error. LoRA files are inspected instead.

    Example:

        loraforge check recipe.yaml
        loraforge check recipes/*.yaml --no-data --format github --strict
        loraforge check recipe.yaml --vram --budget 12GB
        loraforge check output/mychar.safetensors
    """
    loras = [p for p in paths if p.suffix.lower() in LORA_SUFFIXES]
    recipes = [p for p in paths if p not in loras]
    request = VramRequest(vram_method.value, budget) if vram or budget else None
    code = 0
    if recipes:
        reports = [check_recipe(p, request, data=not no_data) for p in recipes]
        _render(reports, fmt)
        code = 1 if any(r.failed(strict) for r in reports) else 0
    if loras:
        from loraforge.commands.lora_report import check_lora_files

        code = max(
            code,
            check_lora_files(loras, "json" if fmt == CheckFormat.json else "table", strict),
        )
    raise typer.Exit(code)


def check_recipe(path: Path, vram: VramRequest | None = None, *, data: bool = True) -> FileReport:
    """Every finding about one recipe file, with the VRAM estimate (and budget finding) when
    asked and the recipe is valid. ``data=False`` skips the dataset folders and model files."""
    findings = recipe_findings(path, dataset=data, models=data)
    problems = list(findings.problems)
    estimate = None
    if findings.recipe is not None and vram is not None:
        estimate, found = vram_problems(findings.recipe, path, vram)
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
        if fmt == CheckFormat.table:
            _render_table(r)
        else:
            _render_lines(r)
        if r.vram is not None:
            from loraforge.vram import render_vram

            out.print(render_vram(r.vram))


def _render_lines(r: FileReport) -> None:
    for p in r.problems:
        out.print(problem_line(p))
    _render_summary(r)


def _render_summary(r: FileReport) -> None:
    if not r.problems:
        out.print(f"[green]ok[/]  {escape(r.path)}")
        return
    errors = sum(p.severity == "error" for p in r.problems)
    warnings = len(r.problems) - errors
    out.print(f"{escape(r.path)}: {errors} error(s), {warnings} warning(s)")


#: more findings than this are printed as lines: a table that long is slow and unreadable
_TABLE_ROWS = 200


def _render_table(r: FileReport) -> None:
    if len(r.problems) > _TABLE_ROWS:
        _render_lines(r)
        return
    if not r.problems:
        _render_summary(r)
        return
    table = Table(title=escape(r.path), title_justify="left", show_lines=False)
    for column in ("", "where", "field", "problem"):
        table.add_column(column, overflow="fold")
    for p in r.problems:
        mark = "[red]error[/]" if p.severity == "error" else "[yellow]warning[/]"
        message = escape(p.message) + (f"\n[dim]{escape(p.hint)}[/]" if p.hint else "")
        where = f"{p.line}:{p.column}" if p.line else ""
        table.add_row(mark, where, escape(p.path), message)
    out.print(table)
    _render_summary(r)


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
