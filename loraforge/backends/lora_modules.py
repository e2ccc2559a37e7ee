"""The kohya LoRA module (LoRA, LoCon conv kxk, LoRA-FA) as sd-scripts' networks/lora.py defines it.

Semantics matched to sd-scripts:
- down is a Linear ``(r, in)`` or a Conv2d with the target's kernel/stride/padding
  ``(r, in, kh, kw)``;
  up is a Linear ``(out, r)`` or a 1x1 Conv2d ``(out, r, 1, 1)``; no biases.
- init: down ``kaiming_uniform_(a=sqrt(5))``, up zeros (LoRA-FA: down
  ``normal(0, sqrt(2/(in+r)))``).
- output ``up(down(x)) * multiplier * alpha/r``; network dropout on the down output, rank dropout
  masks ranks per sample and rescales by ``1/(1-p)``, module dropout skips the module; all three
  only in training.
- LoRA-FA: down is frozen (never handed to the optimizer, stays frozen on ``requires_grad_(True)``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.backends.hooks import HookedAdapter


class LoRAModule(HookedAdapter):
    """A low-rank ``up @ down`` update on one Linear or Conv2d.

    Args:
        lora_name, target, dim, alpha, multiplier, module_dropout: see :class:`HookedAdapter`.
        dropout: network (neuron) dropout probability on the down output; ``None``/0 = off.
        rank_dropout: probability of dropping each rank per sample; ``None``/0 = off.
        freeze_down: LoRA-FA: initialise down from a normal distribution and never train it.
    """

    def __init__(
        self,
        lora_name: str,
        target: nn.Module,
        dim: int,
        alpha: float | None,
        *,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        freeze_down: bool = False,
    ) -> None:
        super().__init__(
            lora_name, target, dim, alpha, multiplier=multiplier, module_dropout=module_dropout
        )
        device = target.weight.device
        if isinstance(target, nn.Conv2d):
            self.lora_down: nn.Module = nn.Conv2d(
                self.in_features,
                dim,
                target.kernel_size,
                target.stride,
                target.padding,
                target.dilation,
                bias=False,
                device=device,
            )
            self.lora_up: nn.Module = nn.Conv2d(
                dim, self.out_features, 1, bias=False, device=device
            )
        else:
            self.lora_down = nn.Linear(self.in_features, dim, bias=False, device=device)
            self.lora_up = nn.Linear(dim, self.out_features, bias=False, device=device)
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.freeze_down = freeze_down
        self.reset_parameters()
        self.requires_grad_(True)

    def reset_parameters(self) -> None:
        """sd-scripts' initialisation: the module starts as a no-op (up = 0)."""
        if self.freeze_down:
            # LoRA-FA paper / sd-scripts lora_fa.py: a fixed random projection.
            std = math.sqrt(2.0 / (self.in_features + self.dim))
            nn.init.normal_(self.lora_down.weight, std=std)
        else:
            nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def requires_grad_(self, requires_grad: bool = True) -> LoRAModule:
        """Like ``nn.Module.requires_grad_``, but a LoRA-FA down stays frozen."""
        self.lora_up.requires_grad_(requires_grad)
        self.lora_down.requires_grad_(requires_grad and not self.freeze_down)
        return self

    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(B, …, in)`` or ``(B, in, H, W)`` -> ``(B, …, out)`` or ``(B, out, H', W')``."""
        if not torch.is_autocast_enabled(x.device.type):
            # Under autocast the matmul casts by itself; an explicit cast there would keep an
            # extra copy of every input alive for backward.
            x = x.to(self.lora_down.weight.dtype)
        lx = self.lora_down(x)
        if self.training and self.dropout:
            lx = F.dropout(lx, p=self.dropout)
        scale = self.scale
        if self.training and self.rank_dropout:
            lx = lx * self._rank_mask(lx)
            # Treat it as if the rank shrank: keep the expected update the same.
            scale = scale / (1.0 - self.rank_dropout)
        return self.lora_up(lx) * (self.multiplier * scale)

    def _rank_mask(self, lx: torch.Tensor) -> torch.Tensor:
        """One keep/drop draw per (sample, rank), broadcast over tokens or pixels."""
        mask = torch.rand((lx.size(0), self.dim), device=lx.device) > self.rank_dropout
        if lx.dim() == 3:  # (B, L, r): text encoder / transformer tokens
            mask = mask.unsqueeze(1)
        elif lx.dim() == 4:  # (B, r, H, W): conv
            mask = mask[:, :, None, None]
        return mask.to(lx.dtype)

    def down_weight(self) -> torch.Tensor:
        return self.lora_down.weight.detach()

    def up_weight(self) -> torch.Tensor:
        return self.lora_up.weight.detach()

    @torch.no_grad()
    def load_down_up(self, down: torch.Tensor, up: torch.Tensor) -> None:
        self.lora_down.weight.copy_(down)
        self.lora_up.weight.copy_(up)

    @torch.no_grad()
    def scale_weights_(self, ratio: float) -> None:
        if self.freeze_down:
            # The frozen projection must stay as it is; up alone carries the whole ratio.
            self.lora_up.weight.mul_(ratio)
            return
        root = math.sqrt(ratio)
        self.lora_up.weight.mul_(root)
        self.lora_down.weight.mul_(root)

    def up_parameters(self) -> list[nn.Parameter]:
        return [self.lora_up.weight]

    def trainable_parameters(self) -> list[nn.Parameter]:
        if self.freeze_down:
            return [self.lora_up.weight]
        return [self.lora_down.weight, self.lora_up.weight]
