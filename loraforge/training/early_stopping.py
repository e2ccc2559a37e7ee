"""What the validation losses of a run decide: the best file and early stopping. Torch-free.

The best is the lowest validation loss so far (``output.keep_best`` keeps its weights). Early
stopping counts validations in a row that do not improve on the reference loss by more than
``min_delta``; the reference moves only on such an improvement (as Keras' ``EarlyStopping``), so
slow creep by less than ``min_delta`` per validation still stops the run. The tracker's state
goes into the resumable state, so a resumed run decides exactly as the uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class ValidationTracker:
    """The validation history a run needs (mutable; the loop owns one).

    Attributes:
        min_delta: the improvement early stopping asks for.
        patience: validations without improvement before stopping; ``None``: never stop.
        last, last_step: the newest validation loss and its step.
        best, best_step: the lowest validation loss so far and its step.
        reference: the loss early stopping compares with.
        since_improvement: validations in a row without an improvement over ``reference``.
    """

    min_delta: float = 0.0
    patience: int | None = None
    last: float | None = None
    last_step: int | None = None
    best: float | None = None
    best_step: int | None = None
    reference: float | None = None
    since_improvement: int = 0

    def add(self, loss: float, step: int) -> bool:
        """Record the validation loss at ``step``; returns whether it is a new best."""
        self.last, self.last_step = loss, step
        finite = math.isfinite(loss)
        if finite and (self.reference is None or loss < self.reference - self.min_delta):
            self.reference, self.since_improvement = loss, 0
        else:
            self.since_improvement += 1
        if finite and (self.best is None or loss < self.best):
            self.best, self.best_step = loss, step
            return True
        return False

    @property
    def should_stop(self) -> bool:
        """Early stopping: ``patience`` validations in a row without improvement."""
        return self.patience is not None and self.since_improvement >= self.patience

    def stop_message(self) -> str:
        return (
            f"early stopping: the validation loss has not improved by more than "
            f"{self.min_delta:g} for {self.since_improvement} validation(s) (best {self.best:.6f} "
            f"at step {self.best_step}, last {self.last:.6f} at step {self.last_step})"
        )

    def metadata(self) -> dict[str, str]:
        """``ss_validation_loss`` / ``ss_validation_step`` of the newest validation (files saved
        after it carry them); empty before the first."""
        if self.last is None:
            return {}
        return {"ss_validation_loss": repr(self.last), "ss_validation_step": str(self.last_step)}

    def state(self) -> dict[str, Any]:
        """JSON data for the resumable state (the settings are the recipe's, not saved)."""
        data = asdict(self)
        del data["min_delta"], data["patience"]
        return data

    @classmethod
    def restore(
        cls, saved: Mapping[str, Any] | None, *, min_delta: float, patience: int | None
    ) -> ValidationTracker:
        """A tracker from :meth:`state` (``None``: a fresh run) with this run's settings."""
        fields = {k: v for k, v in (saved or {}).items() if k in cls.__dataclass_fields__}
        return cls(min_delta=min_delta, patience=patience, **fields)
