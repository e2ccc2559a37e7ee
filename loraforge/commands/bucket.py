"""`loraforge bucket`: the aspect-ratio buckets a recipe's dataset will train with."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from loraforge.commands.options import ForceOpt, FormatOpt, OutputFormat, RecipeArg
from loraforge.commands.recipe_findings import load_checked_recipe
from loraforge.console import err, out, print_json


def command(
    recipe: RecipeArg,
    fmt: FormatOpt = OutputFormat.table,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="Also draw a bar chart of the buckets to this image (needs matplotlib).",
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    force: ForceOpt = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Also decode every image, as train and cache do, and list those that fail.",
        ),
    ] = False,
) -> None:
    """Show the aspect-ratio buckets of the recipe's dataset (image headers only, no decoding;
    --verify decodes every image as train and cache do).

    Per bucket: resolution, images, images x repeats and mean aspect-ratio error.
    Totals: images and steps per epoch for training.batch_size and gradient accumulation.
    Skipped files are listed with the reason; EXIF rotation of photos is respected.

    Example:

        loraforge bucket recipe.yaml
        loraforge bucket recipe.yaml --format json > buckets.json
        loraforge bucket recipe.yaml --plot buckets.png
        loraforge bucket recipe.yaml --verify
    """
    from loraforge.data.buckets import BucketSettings
    from loraforge.data.discovery import discover
    from loraforge.data.plan import plan_buckets
    from loraforge.data.report import bucket_report

    loaded = load_checked_recipe(recipe, models=False)
    with err.status("decoding images…" if verify else "reading image headers…"):
        discovery = discover(loaded.dataset, verify=verify)
        plan = plan_buckets(discovery, BucketSettings.from_dataset(loaded.dataset))
    report = bucket_report(
        discovery,
        plan,
        batch_size=loaded.training.batch_size,
        gradient_accumulation_steps=loaded.training.gradient_accumulation_steps,
    )
    if plot is not None:
        from loraforge.data.bucket_plot import plot_buckets

        plot_buckets(report, plot, force=force)
    if fmt == OutputFormat.json:
        print_json(report)
    else:
        _render(report)
    if plot is not None:
        err.print(f"bucket chart written to {escape(str(plot))}")


def _render(report: dict[str, Any]) -> None:
    settings = report["settings"]
    if not settings["enable_bucket"]:
        mode = "bucketing off: one bucket at the resolution"
    elif settings["bucket_no_upscale"]:
        mode = "bucket_no_upscale: buckets from each image's size, downscale only"
    else:
        mode = (
            f"buckets {settings['min_bucket_reso']}-{settings['max_bucket_reso']} px, "
            f"step {settings['bucket_reso_steps']}"
        )
    width, height = settings["resolution"]
    table = Table(title=f"buckets ({width}x{height}, {mode})", title_justify="left")
    table.add_column("bucket", justify="right")
    table.add_column("aspect", justify="right")
    table.add_column("images", justify="right")
    table.add_column("images x repeats", justify="right")
    table.add_column("batches", justify="right")
    table.add_column("mean aspect error", justify="right")
    for b in report["buckets"]:
        table.add_row(
            f"{b['width']}x{b['height']}",
            f"{b['width'] / b['height']:.3f}",
            str(b["images"]),
            str(b["samples"]),
            str(b["batches"]),
            f"{b['mean_aspect_error']:.4f}",
        )
    totals = report["totals"]
    table.add_section()
    table.add_row(
        "total",
        "",
        str(totals["images"]),
        str(totals["samples_per_epoch"]),
        str(totals["batches_per_epoch"]),
        f"{totals['mean_aspect_error']:.4f}",
        style="bold",
    )
    out.print(table)
    out.print(
        f"{totals['train_images']} training + {totals['reg_images']} regularization images; "
        f"{totals['steps_per_epoch']} steps per epoch at batch size {totals['batch_size']}"
        + (
            f" with gradient accumulation {totals['gradient_accumulation_steps']}"
            if totals["gradient_accumulation_steps"] > 1
            else ""
        )
    )
    _render_validation(report)
    _render_skipped(report)


def _render_validation(report: dict[str, Any]) -> None:
    """The held-out validation images, with their buckets (they are never trained on)."""
    if not report["validation"]:
        return
    title = f"held out for validation ({len(report['validation'])} images, not trained on)"
    table = Table(title=title, title_justify="left")
    table.add_column("file", overflow="fold")
    table.add_column("bucket", justify="right")
    for item in report["validation"]:
        table.add_row(escape(item["path"]), "x".join(map(str, item["bucket"])))
    out.print(table)


def _render_skipped(report: dict[str, Any]) -> None:
    """Skipped files as a table on stdout (they and the other dataset findings were printed as
    warnings with the recipe's findings)."""
    if report["skipped"]:
        table = Table(title=f"skipped files ({len(report['skipped'])})", title_justify="left")
        table.add_column("file", overflow="fold")
        table.add_column("reason", overflow="fold")
        for item in report["skipped"]:
            table.add_row(escape(item["path"]), escape(item["reason"]))
        out.print(table)
