"""Learning-rate schedulers by name, as sd-scripts' ``train_util.get_scheduler_fix`` builds them.

The schedules are transformers' (the functions sd-scripts calls), stepped once per optimizer
step. With ``W`` warmup steps and ``N`` total steps, the LR factor at step ``s`` is ``s / W``
during warmup, then:

- constant: 1
- linear: ``(N - s) / (N - W)``
- cosine: ``0.5 * (1 + cos(pi * p))`` with ``p = (s - W) / (N - W)``
- cosine_with_restarts: ``0.5 * (1 + cos(pi * ((cycles * p) % 1)))``, 0 once ``p >= 1``
- polynomial: ``((lr - lr_end) * (1 - p)**power + lr_end) / lr`` with ``lr_end = 1e-7``

Schedule-free optimizers get a constant scheduler (they schedule themselves); Adafactor with
``relative_step`` gets transformers' ``AdafactorSchedule``, which reports the optimizer's own LR.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loraforge.console import warn
from loraforge.errors import RecipeError

if TYPE_CHECKING:
    import torch

SCHEDULER_NAMES: tuple[str, ...] = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)


def resolve_warmup_steps(warmup: float, total_steps: int) -> int:
    """Warmup as a step count: ``warmup`` steps when ``>= 1``, ``int(warmup * total_steps)`` when
    it is a ratio in ``(0, 1)``, 0 when 0.

    Raises:
        RecipeError: negative, or a non-integer count of steps (``12.5``).
    """
    if warmup < 0:
        raise RecipeError(
            f"training.lr_warmup_steps: {warmup:g} is negative",
            hint="use a step count (>= 1), a ratio of the total steps (< 1), or 0",
        )
    if warmup < 1:
        return int(warmup * total_steps)
    if warmup != int(warmup):
        raise RecipeError(
            f"training.lr_warmup_steps: {warmup:g} is neither a whole number of steps nor a "
            "ratio below 1",
            hint=f"write {int(warmup)} steps, or a ratio such as 0.05",
        )
    return int(warmup)


def _is_relative_adafactor(optimizer: Any) -> bool:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps optimizers
    return type(inner).__name__ == "Adafactor" and bool(inner.defaults.get("relative_step"))


def _is_schedule_free(optimizer: Any) -> bool:
    inner = getattr(optimizer, "optimizer", optimizer)
    return type(inner).__module__.split(".")[0] == "schedulefree"


def _constant(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    from transformers.optimization import get_constant_schedule

    return get_constant_schedule(optimizer)


def _special_scheduler(
    name: str, optimizer: Any, warmup_steps: int, learning_rate: float | None
) -> Any | None:
    """The scheduler for optimizers that schedule themselves, or ``None`` for the others."""
    ignored = name != "constant" or warmup_steps > 0
    if _is_schedule_free(optimizer):
        if ignored:
            warn(
                f"schedule-free optimizers ignore lr_scheduler {name!r} and lr_warmup_steps; "
                "set warmup with training.optimizer_args.warmup_steps instead"
            )
        return _constant(optimizer)
    if _is_relative_adafactor(optimizer):
        from transformers.optimization import AdafactorSchedule

        if ignored:
            warn(
                f"Adafactor with relative_step schedules itself; lr_scheduler {name!r} and "
                "lr_warmup_steps are ignored (set optimizer_args.relative_step: false to use them)"
            )
        # the schedule reads Adafactor's own step sizes: give it the optimizer accelerate wraps
        inner = getattr(optimizer, "optimizer", optimizer)
        return AdafactorSchedule(inner, initial_lr=learning_rate or 0.0)
    return None


def build_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup: float = 0,
    num_cycles: int = 1,
    power: float = 1.0,
    *,
    learning_rate: float | None = None,
) -> torch.optim.lr_scheduler.LRScheduler:
    """Create the LR scheduler ``name`` for ``optimizer``.

    Args:
        name: one of :data:`SCHEDULER_NAMES`.
        optimizer: from :func:`loraforge.training.optim.build_optimizer`.
        total_steps: how many times ``scheduler.step()`` will be called (optimizer steps; times
            the number of processes when accelerate steps a prepared scheduler once per process).
        warmup: ``training.lr_warmup_steps`` (steps when >= 1, ratio of ``total_steps`` when < 1).
        num_cycles: hard restarts of ``cosine_with_restarts``.
        power: exponent of ``polynomial``.
        learning_rate: only reported by Adafactor's relative-step schedule before its first step.

    Raises:
        RecipeError: unknown name, warmup with ``constant``, or a polynomial decay whose learning
            rate is not above its end value 1e-7.
    """
    if name not in SCHEDULER_NAMES:
        raise RecipeError(
            f"training.lr_scheduler: unknown scheduler {name!r}",
            hint=f"use one of {', '.join(SCHEDULER_NAMES)}",
        )
    warmup_steps = resolve_warmup_steps(warmup, total_steps)
    special = _special_scheduler(name, optimizer, warmup_steps, learning_rate)
    if special is not None:
        return special
    if warmup_steps > total_steps:
        warn(f"lr warmup ({warmup_steps} steps) is longer than training ({total_steps} steps)")
    return _standard_scheduler(name, optimizer, total_steps, warmup_steps, num_cycles, power)


def _standard_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    num_cycles: int,
    power: float,
) -> torch.optim.lr_scheduler.LRScheduler:
    from transformers import optimization as tf

    if name == "constant":
        if warmup_steps:
            raise RecipeError(
                f"training.lr_warmup_steps is {warmup_steps} but lr_scheduler 'constant' has no "
                "warmup",
                hint="use lr_scheduler: constant_with_warmup, or lr_warmup_steps: 0",
            )
        return tf.get_constant_schedule(optimizer)
    if name == "constant_with_warmup":
        return tf.get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps)
    common = {"num_warmup_steps": warmup_steps, "num_training_steps": total_steps}
    if name == "linear":
        return tf.get_linear_schedule_with_warmup(optimizer, **common)
    if name == "cosine":
        return tf.get_cosine_schedule_with_warmup(optimizer, **common)
    if name == "cosine_with_restarts":
        return tf.get_cosine_with_hard_restarts_schedule_with_warmup(
            optimizer, num_cycles=num_cycles, **common
        )
    try:
        return tf.get_polynomial_decay_schedule_with_warmup(optimizer, power=power, **common)
    except ValueError as e:
        raise RecipeError(
            f"training.lr_scheduler polynomial: {e}",
            hint="the learning rate must be above the polynomial end value 1e-7",
        ) from e
