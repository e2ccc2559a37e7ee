"""Cross-field rules of masked loss (``training.masked_loss`` with the subsets' mask sources) and
of the weight average (``training.ema``). Findings as in :mod:`loraforge.recipe.rules`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from loraforge.recipe.types import Recipe

Finding = tuple[str, tuple[Any, ...], str, str | None]

_SCHEDULE_FREE = ("AdamWScheduleFree", "SGDScheduleFree")


def masked_loss_problems(r: Recipe) -> Iterator[Finding]:
    """Masked loss needs a mask source on every subset; mask sources need masked loss."""
    masked = r.training.masked_loss
    for i, s in enumerate(r.dataset.subsets):
        has_masks = s.alpha_mask or s.conditioning_data_dir is not None
        if masked and not has_masks:
            kind = "regularization subset" if s.is_reg else "subset"
            yield (
                "error",
                ("dataset", "subsets", i, "dir"),
                f"training.masked_loss is on but {kind} {i} ({s.dir}) has no masks",
                "set alpha_mask: true (transparent pixels are not learned; images without "
                "alpha count as fully opaque) or conditioning_data_dir: a folder of mask "
                "images, or turn training.masked_loss off",
            )
        if has_masks and not masked:
            field = "alpha_mask" if s.alpha_mask else "conditioning_data_dir"
            yield (
                "warning",
                ("dataset", "subsets", i, field),
                f"{field} has no effect without training.masked_loss",
                "set training.masked_loss: true",
            )
        if s.alpha_mask and s.conditioning_data_dir is not None:
            yield (
                "warning",
                ("dataset", "subsets", i, "alpha_mask"),
                "alpha_mask and conditioning_data_dir are both set: the mask folder is used "
                "(as sd-scripts does)",
                "remove one of them",
            )


def ema_problems(r: Recipe) -> Iterator[Finding]:
    """A weight average that never starts, or one on top of a schedule-free optimizer."""
    t, ema = r.training, r.training.ema
    if ema is None:
        return
    if t.max_train_steps is not None and ema.start_step >= t.max_train_steps:
        yield (
            "warning",
            ("training", "ema", "start_step"),
            f"the average starts after step {ema.start_step} and the run has "
            f"{t.max_train_steps} steps: the saved files hold the raw weights",
            "lower start_step",
        )
    if t.optimizer in _SCHEDULE_FREE:
        yield (
            "warning",
            ("training", "ema"),
            f"{t.optimizer} averages the weights itself; the EMA averages its training-mode "
            "weights, and the saved files hold that average",
            "use one of them",
        )
