"""`loraforge tag`: caption the dataset with a WD14 tagger or an image-to-text captioner."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from loraforge.commands.options import FormatOpt, OutputFormat, RecipeArg
from loraforge.commands.recipe_findings import load_checked_recipe
from loraforge.console import err, out, print_json
from loraforge.errors import DatasetError, LoraforgeError

if TYPE_CHECKING:
    from loraforge.tagging.runner import TagRunResult

REPORT_NAME = "tag_frequency.json"
TOP_TAGS = 15


def command(
    recipe: RecipeArg,
    folder: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            help="Tag this folder instead of the recipe's dataset subsets.",
            file_okay=False,
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace existing captions (else: recipe setting).")
    ] = False,
    append: Annotated[
        bool, typer.Option("--append", help="Add new tags after existing captions.")
    ] = False,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", min=1, help="Images per batch (default: tagging.batch_size)."),
    ] = None,
    recursive: Annotated[
        bool, typer.Option("--recursive", help="With --dir: include sub-folders.")
    ] = False,
    include_reg: Annotated[
        bool, typer.Option("--include-reg", help="Also tag regularization subsets.")
    ] = False,
    report: Annotated[
        Path | None,
        typer.Option(
            "--report",
            dir_okay=False,
            help=f"Where to write the tag frequency JSON (default: <output.dir>/{REPORT_NAME}, "
            f"or <dir>/{REPORT_NAME} with --dir).",
            show_default=False,
        ),
    ] = None,
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    """Tag or caption the images with the model in the recipe's [bold]tagging[/] section.

    Captions are written next to the images, which are never modified.
    Images that already have a caption are skipped, so an interrupted run resumes;
    --overwrite, --append or tagging.existing_captions change that.
    A tag frequency report ({folder: {tag: count}}, as ss_tag_frequency) is written as JSON.

    Example:

        loraforge tag recipe.yaml
        loraforge tag recipe.yaml --dir ./extra_images --append --batch-size 16
        loraforge tag recipe.yaml --format json > tagging.json
    """
    if overwrite and append:
        raise LoraforgeError(
            "--overwrite and --append cannot be used together",
            hint="--overwrite replaces captions, --append adds new tags after them: choose one",
        )
    from loraforge.tagging import (
        folder_from_path,
        folders_from_dataset,
        load_annotator,
        run_tagging,
    )

    # with --dir the recipe's dataset is not read, so its folders are not checked
    loaded = load_checked_recipe(recipe, dataset=folder is None, models=False)
    config = loaded.tagging
    if folder is not None:
        selection = folder_from_path(folder, recursive=recursive)
        report_path = report or selection.folders[0].path / REPORT_NAME
    else:
        selection = folders_from_dataset(loaded.dataset, config.caption_extension, include_reg)
        report_path = report or Path(loaded.output.dir) / REPORT_NAME
    for note in selection.notes:
        _warn(note)
    if not selection.folders:
        raise DatasetError(
            "no folders to tag", hint="check dataset.subsets in the recipe, or pass --dir"
        )
    with err.status(f"loading {config.mode} {config.model} …"):
        annotator = load_annotator(config, suggest_dir=recipe.resolve().parent / "models")
    err.print(f"tagging with {annotator.description}")
    existing = "overwrite" if overwrite else "append" if append else None
    result = run_tagging(
        selection.folders,
        annotator,
        config,
        console=err,
        existing=existing,
        batch_size=batch_size,
        report_path=report_path,
        workers=max(loaded.dataset.num_workers, 1),
    )
    _render(result, fmt, annotator.description)
    if result.problems:
        raise DatasetError(
            f"{len(result.problems)} image(s) were not captioned (listed above)",
            hint="fix or remove them and run again; images already captioned are skipped",
        )


def _render(result: TagRunResult, fmt: OutputFormat, model: str) -> None:
    for problem in result.problems:
        _warn(f"{problem.path}: {problem.reason}")
    if fmt == OutputFormat.json:
        print_json(_as_json(result, model))
        return
    err.print(
        f"{result.written} caption(s) written, {result.kept} kept, "
        f"{len(result.problems)} problem(s); {result.images_per_second:.1f} img/s"
    )
    for name, counts in result.frequency.items():
        table = Table(title=f"{name}: top tags", title_justify="left")
        table.add_column("tag")
        table.add_column("images", justify="right")
        for tag, count in list(counts.items())[:TOP_TAGS]:
            table.add_row(tag, str(count))
        out.print(table)
    if result.report_path is not None:
        err.print(f"tag frequency report: {result.report_path}")


def _warn(text: str) -> None:
    """A warning line on stderr; paths are escaped (``[`` is markup) and never wrapped."""
    from rich.markup import escape

    err.print(f"[yellow]warning:[/] {escape(text)}", soft_wrap=True)


def _as_json(result: TagRunResult, model: str) -> dict[str, Any]:
    return {
        "model": model,
        "written": result.written,
        "kept": result.kept,
        "problems": [{"path": str(p.path), "reason": p.reason} for p in result.problems],
        "seconds": round(result.seconds, 3),
        "images_per_second": round(result.images_per_second, 2),
        "report": str(result.report_path) if result.report_path else None,
        "tag_frequency": result.frequency,
    }
