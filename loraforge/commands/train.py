"""`loraforge train`: train the recipe's LoRA (or, with --dry-run, show what training would do)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from loraforge.commands.options import ForceOpt, FormatOpt, OutputFormat, RecipeArg
from loraforge.commands.recipe_findings import load_checked_recipe
from loraforge.console import err, info, out, print_json

_MAX_FILES_SHOWN = 12


def command(
    recipe_path: RecipeArg,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Resolve and print the plan; train nothing.")
    ] = False,
    resume: Annotated[
        str | None,
        typer.Option(
            "--resume",
            metavar="DIR|auto",
            help="Continue from a saved state folder, or `auto` for the run's latest state.",
        ),
    ] = None,
    force: ForceOpt = False,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            min=1,
            metavar="N",
            help="CPU training threads (default: OMP_NUM_THREADS, else the free cores).",
            show_default=False,
        ),
    ] = None,
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    """Train the recipe's LoRA and write kohya-compatible .safetensors files.

    The recipe's warnings (those `loraforge check` shows) come first; its errors stop it before
    anything runs. Ctrl-C stops after the current step and saves a resumable state (a second
    Ctrl-C aborts at once, keeping what was saved before); continue with --resume auto. Existing
    outputs are not overwritten without --force. For several GPUs or machines, start it with
    accelerate.

    Example:

        loraforge train recipe.yaml --dry-run
        loraforge train recipe.yaml
        loraforge train recipe.yaml --resume auto
        accelerate launch --multi_gpu --num_processes 2 -m loraforge train recipe.yaml
    """
    recipe = load_checked_recipe(recipe_path)
    if dry_run:
        with err.status("resolving the plan…"):
            from loraforge.training.dry_run import build_plan

            plan = build_plan(recipe, resume=resume)
        if fmt == OutputFormat.json:
            print_json(plan.to_dict())
        else:
            render_plan(plan, force=force)
        return
    with err.status("loading torch…"):
        from loraforge.training.run import TrainingAborted, run_training
    try:
        result = run_training(recipe, resume=resume, force=force, threads=threads)
    except TrainingAborted as e:
        if e.main_process:
            info(escape(aborted_message(e, recipe_path)))
        raise typer.Exit(130) from None
    if result.interrupted:
        if result.main_process:
            info(
                f"interrupted at step {result.progress.global_step}; state saved to "
                f"{result.final_path}\n  continue with: loraforge train {recipe_path} --resume auto"
            )
        raise typer.Exit(130)
    if result.main_process:
        how = ", stopped early" if result.stopped_early else ""
        info(f"done: {result.final_path} ({result.progress.global_step} steps{how})")


def aborted_message(aborted: Any, recipe_path: Path) -> str:
    """What a second Ctrl-C kept: the newest LoRA file and state of the run, and how to go on."""
    kept = aborted.kept
    head = f"aborted at step {aborted.step} (second Ctrl-C)"
    if not kept:
        return f"{head}: this run saved nothing yet; files from earlier runs are untouched"
    files = [f"{path} (step {step})" for step, path in kept.values()]
    text = f"{head}; kept: {', '.join(files)}"
    if "state" in kept:
        text += f"\n  continue from step {kept['state'][0]} with: "
        text += f"loraforge train {recipe_path} --resume auto"
    return text


def render_plan(plan: Any, *, force: bool) -> None:
    """The dry-run plan as tables on stdout; what would block the run goes to stderr."""
    length = plan.length
    summary = Table(title=f"training plan: {plan.recipe}", show_header=False)
    summary.add_column("what", style="bold")
    summary.add_column("value")
    rows = [
        (
            "model",
            f"{plan.family}{' (v-prediction)' if plan.v_prediction else ''} — {plan.architecture}",
        ),
        (
            "dataset",
            f"{plan.images} images, {plan.reg_images} regularization, "
            f"{plan.samples_per_epoch} samples per epoch (repeats included)"
            + (
                f", {plan.validation_images} held out for validation"
                if plan.validation_images
                else ""
            ),
        ),
        (
            "length",
            f"{length.max_train_steps} steps = {length.num_epochs} epochs x "
            f"{length.steps_per_epoch} steps ({length.batches_per_epoch} batches per epoch "
            f"per process)",
        ),
        ("batch", f"total {plan.total_batch_size} ({plan.num_processes} process(es))"),
        (
            "network",
            f"{plan.network.backend}/{plan.network.algorithm} dim {plan.network.dim} "
            f"alpha {plan.network.alpha:g}: {plan.network.unet_modules} UNet + "
            f"{plan.network.text_encoder_modules} text-encoder modules",
        ),
        ("trainable parameters", f"{plan.network.trainable_parameters:,}"),
        ("learning rates", ", ".join(f"{k} {v:g}" for k, v in plan.network.groups.items())),
        ("optimizer", plan.optimizer),
        ("scheduler", f"{plan.scheduler}, {plan.warmup_steps} warmup steps"),
        ("precision", ", ".join(f"{k} {v}" for k, v in plan.precision.items())),
        ("caches", ", ".join(f"{k} {v}" for k, v in plan.caches.items())),
        ("VRAM", _vram_summary(plan.vram)),
    ]
    if plan.resume_from is not None:
        rows.append(("resume", f"from {plan.resume_from} at step {plan.resume_step}"))
    for row in rows:
        summary.add_row(*row)
    out.print(summary)
    out.print(_bucket_table(plan))
    out.print(_files_table(plan))
    if plan.vram is not None:
        from loraforge.vram import render_vram

        out.print(render_vram(plan.vram))
    # skipped files and dataset warnings were printed with the recipe's findings
    if plan.existing and not force:
        err.print(
            f"[yellow]note:[/] {len(plan.existing)} output(s) exist already; "
            "training needs --force to overwrite them"
        )


def _bucket_table(plan: Any) -> Table:
    table = Table(title="buckets")
    for column in ("resolution", "images", "samples", "batches"):
        table.add_column(column, justify="left" if column == "resolution" else "right")
    for b in plan.buckets:
        table.add_row(f"{b.width}x{b.height}", str(b.images), str(b.samples), str(b.batches))
    return table


def _files_table(plan: Any) -> Table:
    existing = {Path(p) for p in plan.existing}
    root = plan.output_dir
    table = Table(title=f"files it would write in {root}")
    for column in ("step", "kind", "path", ""):
        table.add_column(column, justify="right" if column == "step" else "left", overflow="fold")
    files = plan.files
    shown = files if len(files) <= _MAX_FILES_SHOWN else files[: _MAX_FILES_SHOWN - 2] + files[-2:]
    for f in shown:
        mark = "exists" if f.path in existing else ""
        path = f.path.relative_to(root) if f.path.is_relative_to(root) else f.path
        table.add_row(str(f.step), f.kind, str(path), mark)
    if len(files) > len(shown):
        table.caption = f"{len(files) - len(shown)} more not shown (--format json lists all)"
    return table


def _vram_summary(estimate: Any) -> str:
    if estimate is None:
        return "not estimated"
    from loraforge.vram import format_bytes

    return (
        f"{format_bytes(estimate.total_bytes)} peak ({estimate.method} estimate, breakdown below)"
    )
