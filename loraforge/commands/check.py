"""`loraforge check`: validate recipes (schema, cross-field rules, files) and inspect LoRA files."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from loraforge.console import out, print_json
from loraforge.recipe import Problem, Recipe, validate_recipe_file

LORA_SUFFIXES = (".safetensors", ".ckpt", ".pt")


class CheckFormat(str, Enum):
    table = "table"
    json = "json"
    github = "github"


@dataclass(frozen=True)
class FileReport:
    path: str
    problems: tuple[Problem, ...]

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
) -> None:
    """Validate recipes: schema, cross-field rules, dataset folders. Exit 0 clean, 1 problems, 2 usage error.

    Example:

        loraforge check recipe.yaml
        loraforge check recipes/*.yaml --format github --strict
        loraforge check output/mychar.safetensors
    """
    loras = [p for p in paths if p.suffix.lower() in LORA_SUFFIXES]
    recipes = [p for p in paths if p not in loras]
    code = 0
    if recipes:
        reports = [check_recipe(p) for p in recipes]
        _render(reports, fmt)
        code = 1 if any(r.failed(strict) for r in reports) else 0
    if loras:
        from loraforge.commands.lora_report import check_lora_files

        code = max(
            code,
            check_lora_files(loras, fmt.value if fmt != CheckFormat.github else "table", strict),
        )
    raise typer.Exit(code)


def check_recipe(path: Path) -> FileReport:
    """Validate one recipe file, adding dataset-folder findings when the recipe itself is valid."""
    validation = validate_recipe_file(path)
    problems = list(validation.problems)
    if validation.recipe is not None:
        problems += backend_problems(validation.recipe, str(path))
        problems += filesystem_problems(validation.recipe, str(path))
    return FileReport(str(path), tuple(problems))


def backend_problems(recipe: Recipe, source: str) -> list[Problem]:
    """What the chosen network backend refuses (checked without torch)."""
    from loraforge.backends import check_network_config
    from loraforge.errors import RecipeError

    try:
        check_network_config(recipe.network)
    except RecipeError as e:
        return [Problem("error", e.message, "network", source, hint=e.hint)]
    return []


def filesystem_problems(recipe: Recipe, source: str) -> list[Problem]:
    """Dataset findings, tagged with the recipe file. Missing or empty folders are warnings:
    presets point at folders the user still has to fill (``--strict`` fails on them)."""
    from dataclasses import replace

    from loraforge.data.checks import check_dataset

    return [replace(p, file=source) for p in check_dataset(recipe.dataset, empty="warning")]


def _render(reports: list[FileReport], fmt: CheckFormat) -> None:
    if fmt == CheckFormat.json:
        print_json(
            [
                {
                    "file": r.path,
                    "ok": not r.failed(False),
                    "problems": [p.to_dict() for p in r.problems],
                }
                for r in reports
            ]
        )
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
        if not r.problems:
            out.print(f"[green]ok[/]  {r.path}")
            continue
        table = Table(title=r.path, title_justify="left", show_lines=False)
        for column in ("", "where", "field", "problem"):
            table.add_column(column, overflow="fold")
        for p in r.problems:
            mark = "[red]error[/]" if p.severity == "error" else "[yellow]warning[/]"
            message = p.message + (f"\n[dim]{p.hint}[/]" if p.hint else "")
            where = f"{p.line}:{p.column}" if p.line else ""
            table.add_row(mark, where, p.path, message)
        out.print(table)
        errors = sum(p.severity == "error" for p in r.problems)
        warnings = len(r.problems) - errors
        out.print(f"{errors} error(s), {warnings} warning(s)")
