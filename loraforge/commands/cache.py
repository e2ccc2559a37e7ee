"""`loraforge cache`: pre-compute VAE latents and text-encoder outputs to disk."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer
from rich.table import Table

from loraforge.commands.options import FormatOpt, OutputFormat, RecipeArg
from loraforge.commands.recipe_findings import load_checked_recipe
from loraforge.console import err, out, print_json, warn
from loraforge.errors import RecipeError


class CacheDevice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def command(
    recipe_path: RecipeArg,
    device: Annotated[
        CacheDevice,
        typer.Option("--device", help="Where to encode: auto (a CUDA GPU when there is one)."),
    ] = CacheDevice.auto,
    fmt: FormatOpt = OutputFormat.table,
) -> None:
    """Pre-compute VAE latents and text-encoder outputs into the recipe's disk cache.

    Every bucketed image is encoded (and its mirror with flip_aug), and the captions too when the
    recipe caches text-encoder outputs. A second run reuses every valid entry; a changed VAE,
    model, resolution or image is re-encoded.

    Example:

        loraforge cache recipe.yaml
    """
    recipe = load_checked_recipe(recipe_path)
    if "disk" not in (recipe.cache.latents, recipe.cache.text_encoder_outputs):
        raise RecipeError(
            "the recipe caches nothing on disk "
            "(neither cache.latents nor cache.text_encoder_outputs is `disk`)",
            hint="set cache.latents: disk (memory caches are built by `loraforge train` itself)",
        )
    with err.status("loading torch and the model…"):
        import torch

        from loraforge.data.buckets import BucketSettings
        from loraforge.data.cache_setup import cache_dir, prepare_caches, vae_dtype
        from loraforge.data.discovery import discover
        from loraforge.data.plan import plan_buckets
        from loraforge.data.report import skipped_summary
        from loraforge.training.precision import move_module

        if device == CacheDevice.auto:
            target = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            target = torch.device(device.value)
        discovery = discover(recipe.dataset, verify=True)
        plan = plan_buckets(discovery, BucketSettings.from_dataset(recipe.dataset))
    summary = skipped_summary([*discovery.skipped, *plan.skipped])
    if summary:
        warn(summary)
    from loraforge.training.build import load_base_model

    model = load_base_model(recipe)
    with err.status("moving the encoders…"):
        move_module(model.vae, target, vae_dtype(recipe, model.family, target))
        for encoder in model.text_encoders:
            move_module(encoder, target)
    from functools import partial

    from loraforge.progress import progress_callback

    caches = prepare_caches(
        recipe,
        model,
        plan,
        discovery.subsets,
        progress=partial(progress_callback, err),
        only_disk=True,
    )
    rows = []
    if caches.latents is not None:
        s = caches.latents.stats
        rows.append(_row("latents", s.encoded, s.reused, s.stale, s.seconds))
    if caches.text is not None:
        t = caches.text
        rows.append(_row("text-encoder outputs", t.encoded, t.reused, t.stale, t.seconds))
    if fmt == OutputFormat.json:
        print_json({"cache_dir": str(cache_dir(recipe)), "caches": rows})
        return
    table = Table(title=f"cache: {cache_dir(recipe)}")
    for column in ("cache", "encoded", "reused", "stale rebuilt", "seconds"):
        table.add_column(column, justify="left" if column == "cache" else "right")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    out.print(table)


def _row(name: str, encoded: int, reused: int, stale: int, seconds: float) -> dict[str, object]:
    return {
        "cache": name,
        "encoded": encoded,
        "reused": reused,
        "stale_rebuilt": stale,
        "seconds": round(seconds, 2),
    }
