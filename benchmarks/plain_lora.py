"""A LoRA in plain torch: ``W x + up(down(x)) * scale`` on one layer, by forward replacement.

Uses nothing of loraforge, so hand-written loops built on it (the minimal loop of
``benchmarks/minimal_loop.py``, the reference loop of ``tests/train/test_train_reference_step.py``)
stay independent of loraforge's network code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class PlainLora:
    """Adds ``up(down(x)) * scale`` to a ``nn.Linear``'s or ``nn.Conv2d``'s output.

    Args:
        target: the layer; its ``forward`` is replaced until :meth:`remove`.
        down: ``(r, in)`` or ``(r, in, kh, kw)``; copied into a trainable parameter.
        up: ``(out, r)`` or ``(out, r, 1, 1)``; copied into a trainable parameter.
        scale: ``alpha / r``.
    """

    def __init__(self, target: torch.nn.Module, down: torch.Tensor, up: torch.Tensor, scale: float):
        self.target = target
        self.down = torch.nn.Parameter(down.detach().clone())
        self.up = torch.nn.Parameter(up.detach().clone())
        self.scale = scale
        original = target.forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            if isinstance(target, torch.nn.Conv2d):
                mid = F.conv2d(x, self.down, stride=target.stride, padding=target.padding)
                delta = F.conv2d(mid, self.up)
            else:
                delta = F.linear(F.linear(x, self.down.flatten(1)), self.up.flatten(1))
            return original(x) + delta * self.scale

        target.forward = forward

    def remove(self) -> None:
        """Give the layer its class's ``forward`` back."""
        del self.target.forward
