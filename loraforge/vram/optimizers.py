"""Optimizers for a memory trace: the real ones where they run anywhere, stand-ins elsewhere.

AdamW and SGD (torch) and Adafactor (transformers) run for real, with ``foreach=True`` as torch
picks on a GPU, so their state *and* their step's temporaries are measured. The others
(bitsandbytes 8-bit, Lion, Prodigy, D-Adaptation, schedule-free) need a GPU or an optional
package; a :class:`StateOnlyOptimizer` stands in for them, holding exactly the state bytes
per parameter that ``loraforge.training.optim`` records for each (fused kernels, no
temporaries).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from loraforge.training.optim import canonical_name, optimizer_state_bytes_per_param

REAL_OPTIMIZERS = ("AdamW", "SGDNesterov", "Adafactor")
_EIGHT_BIT = ("AdamW8bit", "PagedAdamW8bit", "Lion8bit")


class StateOnlyOptimizer(torch.optim.Optimizer):
    """Holds ``state_bytes`` bytes of state per parameter and applies plain SGD updates.

    Args:
        params: parameters or groups.
        lr: learning rate.
        state_bytes: bytes of optimizer state per parameter element (may be fractional).
    """

    def __init__(self, params: Any, lr: float, state_bytes: float) -> None:
        super().__init__(params, {"lr": lr})
        self.state_bytes = state_bytes

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "buffer" not in state:
                    size = math.ceil(p.numel() * self.state_bytes)
                    state["buffer"] = torch.zeros(size, dtype=torch.uint8, device=p.device)
                p.add_(p.grad, alpha=-group["lr"])


def state_bytes_for(name: str, param_dtype: torch.dtype) -> float:
    """State bytes per parameter of ``name`` when the parameters are ``param_dtype``.

    ``training.optim`` records fp32 parameters; states that follow the parameter dtype shrink
    with full_fp16/full_bf16, 8-bit states do not.
    """
    canonical = canonical_name(name)
    per_param = optimizer_state_bytes_per_param(canonical)
    if canonical in _EIGHT_BIT:
        return per_param
    element = torch.empty((), dtype=param_dtype).element_size()
    return per_param * element / 4


def trace_optimizer(
    name: str, groups: list[dict[str, Any]], lr: float, args: Mapping[str, Any] | None
) -> torch.optim.Optimizer:
    """An optimizer over ``groups`` whose memory behaves like ``name``'s on a GPU.

    Raises:
        RecipeError: an unknown optimizer name.
    """
    canonical = canonical_name(name)
    args = dict(args or {})
    if canonical == "AdamW":
        return torch.optim.AdamW(
            groups, lr=lr, amsgrad=bool(args.get("amsgrad", False)), foreach=True
        )
    if canonical == "SGDNesterov":
        momentum = float(args.get("momentum", 0.9))
        return torch.optim.SGD(
            groups, lr=lr, momentum=momentum, nesterov=momentum > 0, foreach=True
        )
    if canonical == "Adafactor":
        from transformers.optimization import Adafactor

        relative = bool(args.get("relative_step", True)) or bool(args.get("warmup_init", False))
        plain = [{"params": g["params"]} for g in groups] if relative else groups
        return Adafactor(
            plain,
            lr=None if relative else lr,
            relative_step=relative,
            scale_parameter=bool(args.get("scale_parameter", True)),
            warmup_init=bool(args.get("warmup_init", False)),
            beta1=args.get("beta1"),
        )
    dtype = next((p.dtype for g in groups for p in g["params"]), torch.float32)
    return StateOnlyOptimizer(groups, lr, state_bytes_for(canonical, dtype))
