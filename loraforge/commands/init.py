"""`loraforge init`: write a recipe from a preset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from loraforge.commands.options import ForceOpt
from loraforge.console import info, out
from loraforge.errors import RecipeError
from loraforge.fileio import write_text_atomic
from loraforge.presets import PROJECT_PRESETS, get_preset, list_presets

_SCHEMA_LINE = "# yaml-language-server: $schema={}\n"


def command(
    preset: Annotated[
        str | None,
        typer.Option("--preset", "-p", metavar="NAME", help="Preset name (see --list)."),
    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Recipe file to write.")] = Path(
        "recipe.yaml"
    ),
    directory: Annotated[
        Path | None, typer.Option("--dir", help="Project folder for the demo presets.")
    ] = None,
    list_: Annotated[bool, typer.Option("--list", "-l", help="List the presets.")] = False,
    from_kohya: Annotated[
        Path | None,
        typer.Option(
            "--from-kohya",
            help="Convert an sd-scripts config (.toml) or kohya_ss config (.json) instead.",
            show_default=False,
        ),
    ] = None,
    dataset_config: Annotated[
        Path | None,
        typer.Option(
            "--dataset-config",
            help="With --from-kohya: the sd-scripts --dataset_config TOML, when the config "
            "does not name it.",
            show_default=False,
        ),
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Write a recipe from a preset, or convert a kohya config.

    Example:

        loraforge init --list
        loraforge init --preset char-12gb -o recipe.yaml
        loraforge init --from-kohya config.toml --dataset-config dataset.toml -o recipe.yaml
    """
    if list_:
        _print_presets()
        return
    if from_kohya is not None:
        from loraforge.commands.from_kohya import write_recipe_from_kohya

        write_recipe_from_kohya(from_kohya, output, dataset_config=dataset_config, force=force)
        return
    if preset is None:
        raise RecipeError(
            "no preset given", hint="pass --preset NAME; `loraforge init --list` shows them"
        )
    if preset in PROJECT_PRESETS:
        from loraforge.demo import write_demo_project

        recipe_path = write_demo_project(preset, directory or Path(preset), force=force)
        info(f"wrote the {preset} project; train it with:  loraforge train {recipe_path}")
        return
    chosen = get_preset(preset)
    from loraforge.resources import data_path

    schema_uri = data_path("schema", "recipe.schema.json").resolve().as_uri()
    text = chosen.path.read_text(encoding="utf-8")
    write_text_atomic(output, _SCHEMA_LINE.format(schema_uri) + text, force=force)
    info(f"wrote {output} from preset {preset} ({chosen.purpose}); next: loraforge check {output}")


def _print_presets() -> None:
    table = Table(title="presets")
    for column in ("name", "family", "purpose", "VRAM target"):
        table.add_column(column)
    for p in list_presets():
        table.add_row(p.name, p.family, p.purpose, p.vram)
    table.add_row("demo", "sd1", "runnable project: built-in tiny model + generated images", "CPU")
    for name, family, what in (
        ("demo-sdxl", "sdxl", "SDXL"),
        ("demo-flux", "flux", "FLUX.1"),
        ("demo-sd3", "sd3", "SD3.5"),
    ):
        table.add_row(
            name, family, f"runnable project: tiny {what} model + generated images", "CPU"
        )
    out.print(table)
