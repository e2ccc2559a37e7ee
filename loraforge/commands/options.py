"""Options shared by several subcommands, declared once."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


RecipeArg = Annotated[
    Path, typer.Argument(help="The recipe YAML file.", show_default=False, dir_okay=False)
]
FormatOpt = Annotated[
    OutputFormat, typer.Option("--format", "-f", help="table for people, json for machines.")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")]
VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose", "-v", help="Also print the per-module table (--format json always has it)."
    ),
]
