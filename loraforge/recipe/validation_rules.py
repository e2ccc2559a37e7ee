"""Cross-field rules of the validation options (held-out images, best file, early stopping).

Findings as in :mod:`loraforge.recipe.rules`: ``(severity, path, message, hint)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from loraforge.recipe.types import Recipe

Finding = tuple[str, tuple[Any, ...], str, str | None]

_HOLD_OUT_HINT = "set dataset.validation_split (e.g. 0.1) or add a subset with is_validation: true"


def validation_problems(r: Recipe) -> Iterator[Finding]:
    """Options that need held-out images without any, and subsets that cannot be held out."""
    d, t = r.dataset, r.training
    held_out = d.validation_split > 0 or any(s.is_validation for s in d.subsets)
    if not held_out:
        needing = {
            ("training", "validate_every_n_steps"): t.validate_every_n_steps is not None,
            ("training", "validate_every_n_epochs"): t.validate_every_n_epochs is not None,
            ("training", "max_validation_steps"): t.max_validation_steps is not None,
            ("training", "early_stopping"): t.early_stopping is not None,
            ("output", "keep_best"): r.output.keep_best,
        }
        for path, set_ in needing.items():
            if set_:
                yield (
                    "error",
                    path,
                    f"{path[-1]} needs a validation loss, but no image is held out",
                    _HOLD_OUT_HINT,
                )
    for i, s in enumerate(d.subsets):
        if s.is_validation and s.is_reg:
            yield (
                "error",
                ("dataset", "subsets", i, "is_validation"),
                "a subset cannot be both regularization and validation images",
                "set is_reg: false, or is_validation: false",
            )
        elif s.is_validation and (s.flip_aug or s.color_aug or s.random_crop):
            yield (
                "warning",
                ("dataset", "subsets", i, "is_validation"),
                "validation images are never augmented: flip_aug, color_aug and random_crop "
                "have no effect here",
                None,
            )
