"""`loraforge report`: one self-contained HTML page about a training run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from loraforge.commands.options import ForceOpt
from loraforge.console import err


def command(
    target: Annotated[
        Path,
        typer.Argument(
            help="The run's output folder (output.dir), or its recipe file.", show_default=False
        ),
    ],
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            metavar="NAME",
            help="The run's output.name, when the folder holds several runs.",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            dir_okay=False,
            help="Where to write the page (default: <output.dir>/<name>-report.html).",
            show_default=False,
        ),
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Write one HTML page about a run from its metrics file (<name>-metrics.jsonl): loss and
    validation loss, learning rates, gradient norm, step time, the sample images per prompt over
    the steps, the bucket histogram, the VRAM estimate against the measured peak, the recipe.

    The page is self-contained (charts drawn inline, images embedded, no script, nothing
    fetched): open it in any browser, mail it, archive it. It can be made while the run trains.

    Example:

        loraforge report output/
        loraforge report recipe.yaml -o mychar-report.html
        loraforge report output/ --name mychar --force
    """
    from loraforge.fileio import atomic_path
    from loraforge.training.report_page import render_page
    from loraforge.training.run_report import load_run, locate_metrics

    metrics = locate_metrics(target, name)
    with err.status("reading the metrics and sample images…"):
        data = load_run(metrics)
        page = render_page(data)
    path = output or data.output_dir / f"{data.name}-report.html"
    with atomic_path(path, force=force) as tmp:
        tmp.write_text(page, encoding="utf-8")
    err.print(f"report of {len(data.steps)} step(s) written to {escape(str(path))}")
