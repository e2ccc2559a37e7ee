"""DyLoRA (sd-scripts networks/dylora.py): one file usable at every rank ``unit, 2*unit, … dim``.

The rank is kept as ``dim/unit`` separate parameter blocks of ``unit`` ranks each. Every training
forward draws a block ``k`` uniformly (sd-scripts draws a rank uniformly and floors it to a
multiple of ``unit``: the same distribution), runs the update truncated to the first
``(k+1)*unit`` ranks, trains only block ``k`` (the lower blocks are used detached, so they get no
gradient and the optimizer leaves them alone, as sd-scripts' ``requires_grad`` toggling does) and
rescales by ``sqrt(dim / ((k+1)*unit))`` like sd-scripts. In eval the full rank is used with the
plain ``alpha/dim`` scale, which is what every loader does with the saved file.

Differences from sd-scripts, on purpose: sd-scripts runs all ranks even while training (the paper
truncates; truncation is what makes the lower ranks usable on their own), and it also draws a
random rank in eval. The saved tensors are the same: full-rank ``lora_down``/``lora_up``/``alpha``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.backends.hooks import HookedAdapter


class DyLoRAModule(HookedAdapter):
    """DyLoRA on one Linear or Conv2d.

    Args:
        lora_name, target, dim, alpha, multiplier: see :class:`HookedAdapter`.
        unit: ranks per block; ``dim`` must be a multiple of it.

    Raises:
        ValueError: ``dim`` is not a multiple of ``unit``.
    """

    def __init__(
        self,
        lora_name: str,
        target: nn.Module,
        dim: int,
        alpha: float | None,
        *,
        unit: int = 1,
        multiplier: float = 1.0,
    ) -> None:
        super().__init__(lora_name, target, dim, alpha, multiplier=multiplier)
        if unit < 1 or dim % unit != 0:
            raise ValueError(f"{lora_name}: DyLoRA rank {dim} must be a multiple of unit {unit}")
        self.unit = unit
        self.is_conv = isinstance(target, nn.Conv2d)
        self.conv_args = (
            {"stride": target.stride, "padding": target.padding, "dilation": target.dilation}
            if self.is_conv
            else {}
        )
        device = target.weight.device
        blocks = dim // unit
        down_shape = (unit, self.in_features, *self.kernel_size)
        up_shape = (self.out_features, unit) + ((1, 1) if self.is_conv else ())
        self.lora_down_blocks = nn.ParameterList(
            [nn.Parameter(torch.empty(down_shape, device=device)) for _ in range(blocks)]
        )
        self.lora_up_blocks = nn.ParameterList(
            [nn.Parameter(torch.zeros(up_shape, device=device)) for _ in range(blocks)]
        )
        for block in self.lora_down_blocks:
            # fan_in of a (unit, in[, k, k]) block equals the full matrix's, so this matches
            # sd-scripts' per-rank kaiming init.
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))

    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(B, …, in)`` or ``(B, in, H, W)`` -> ``(B, …, out)`` or ``(B, out, H', W')``."""
        if self.training:
            k = int(torch.randint(len(self.lora_down_blocks), (1,)).item())
            down, up = self._truncated(k)
            rank = (k + 1) * self.unit
            scale = self.scale * math.sqrt(self.dim / rank)
        else:
            down, up = self.down_weight(keep_graph=True), self.up_weight(keep_graph=True)
            scale = self.scale
        x = x.to(down.dtype)
        if self.is_conv:
            out = F.conv2d(F.conv2d(x, down, **self.conv_args), up)
        else:
            out = F.linear(F.linear(x, down), up)
        return out * (self.multiplier * scale)

    def _truncated(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Down/up over blocks ``0..k``; only block ``k`` stays in the autograd graph."""
        downs = [b.detach() for b in self.lora_down_blocks[:k]] + [self.lora_down_blocks[k]]
        ups = [b.detach() for b in self.lora_up_blocks[:k]] + [self.lora_up_blocks[k]]
        return torch.cat(downs, dim=0), torch.cat(ups, dim=1)

    def down_weight(self, keep_graph: bool = False) -> torch.Tensor:
        weight = torch.cat(tuple(self.lora_down_blocks), dim=0)
        return weight if keep_graph else weight.detach()

    def up_weight(self, keep_graph: bool = False) -> torch.Tensor:
        weight = torch.cat(tuple(self.lora_up_blocks), dim=1)
        return weight if keep_graph else weight.detach()

    @torch.no_grad()
    def load_down_up(self, down: torch.Tensor, up: torch.Tensor) -> None:
        for i, (down_block, up_block) in enumerate(
            zip(self.lora_down_blocks, self.lora_up_blocks, strict=True)
        ):
            ranks = slice(i * self.unit, (i + 1) * self.unit)
            down_block.copy_(down[ranks])
            up_block.copy_(up[:, ranks])

    @torch.no_grad()
    def scale_weights_(self, ratio: float) -> None:
        root = math.sqrt(ratio)
        for block in (*self.lora_down_blocks, *self.lora_up_blocks):
            block.mul_(root)

    def up_parameters(self) -> list[nn.Parameter]:
        return list(self.lora_up_blocks)
