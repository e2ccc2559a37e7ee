"""The estimate as data: itemised rows, the total, the budget verdict and suggestions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Method = Literal["analytic", "traced"]

# Row kinds: what is resident for the whole run, what exists only around the peak, overheads.
RowKind = Literal["resident", "step", "overhead", "info"]


@dataclass(frozen=True)
class VramRow:
    """One line of the breakdown.

    Attributes:
        component: what it is (``UNet weights (fp16)``, ``optimizer state (AdamW8bit)``…).
        bytes: its share of the peak (``info`` rows are 0 and only explain).
        note: how it was computed or why it is absent.
        kind: ``resident`` | ``step`` | ``overhead`` | ``info``.
    """

    component: str
    bytes: int
    note: str = ""
    kind: RowKind = "resident"


@dataclass(frozen=True)
class Suggestion:
    """A recipe change that lowers the estimate.

    Attributes:
        change: what to do, in words (``turn on gradient checkpointing``).
        settings: the recipe fields and their new values (``{"training.batch_size": 1}``).
        saving_bytes: how much lower the re-estimated total is.
        total_bytes: the re-estimated total.
        fits: whether the new total is within the budget.
        cost: what it costs (speed, quality).
    """

    change: str
    settings: Mapping[str, Any]
    saving_bytes: int
    total_bytes: int
    fits: bool
    cost: str = ""


@dataclass(frozen=True)
class VramEstimate:
    """Peak GPU memory of one training step for a recipe.

    Attributes:
        method: ``analytic`` or ``traced``.
        family: the model family estimated.
        architecture: where the architecture came from.
        resolution: ``(width, height)`` of the largest bucket.
        batch_size: images per step.
        rows: the breakdown; the bytes of all rows sum to ``total_bytes``.
        total_bytes: the estimated peak the card must hold (tensors + overheads).
        tensor_bytes: the peak of live tensors alone (comparable with
            ``torch.cuda.max_memory_allocated``).
        budget_bytes: the budget checked against, if any.
        suggestions: cheapest-first changes that lower the total (ranked by saving when
            nothing fits).
        notes: caveats (approximations, assumptions).
    """

    method: Method
    family: str
    architecture: str
    resolution: tuple[int, int]
    batch_size: int
    rows: tuple[VramRow, ...]
    total_bytes: int
    tensor_bytes: int
    budget_bytes: int | None = None
    suggestions: tuple[Suggestion, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def fits(self) -> bool | None:
        """``True``/``False`` against the budget; ``None`` without a budget."""
        if self.budget_bytes is None:
            return None
        return self.total_bytes <= self.budget_bytes
