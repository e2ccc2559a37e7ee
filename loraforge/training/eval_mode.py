"""Evaluation mode for a moment: sampling and the validation loss run with dropout off."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn


@contextmanager
def evaluation(optimizer: Any, modules: Sequence[nn.Module]) -> Iterator[None]:
    """Put ``modules`` in eval mode and a schedule-free ``optimizer`` in its evaluation weights;
    restore both afterwards, whatever happens."""
    from loraforge.training.optim import set_eval_mode, set_train_mode

    modes = [m.training for m in modules]
    set_eval_mode(optimizer)
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, mode in zip(modules, modes, strict=True):
            module.train(mode)
        set_train_mode(optimizer)
