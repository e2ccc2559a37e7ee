"""Optimizers for a memory trace: the one ``train`` builds wherever it runs on this machine.

Every optimizer whose package is installed and that runs on the CPU is built by
:func:`loraforge.training.optim.build_optimizer`, as ``train`` builds it, so its state *and* its
step's temporaries are measured. Only the bitsandbytes 8-bit optimizers (CUDA kernels) and
optimizers whose optional package is missing get a :class:`StateOnlyOptimizer` standing in,
holding exactly the state bytes per parameter that ``loraforge.training.optim`` records for each.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from loraforge.training.optim import canonical_name, optimizer_state_bytes_per_param

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


def stands_in(name: str) -> bool:
    """Whether the trace measures a stand-in for ``name`` (CUDA-only or not installed)."""
    import importlib.util

    from loraforge.training.optim import optimizer_spec

    spec = optimizer_spec(name)
    if spec.needs_cuda:
        return True
    return spec.package is not None and importlib.util.find_spec(spec.module.split(".")[0]) is None


def trace_optimizer(
    name: str,
    groups: list[dict[str, Any]],
    lr: float,
    args: Mapping[str, Any] | None,
    *,
    foreach: bool = False,
) -> torch.optim.Optimizer:
    """The optimizer ``train`` builds for ``name`` over ``groups``, or its stand-in.

    Args:
        foreach: ask torch's optimizers for their multi-tensor path, as torch picks on a GPU.

    Raises:
        RecipeError: an unknown optimizer name or argument.
    """
    from loraforge.training.optim import build_optimizer, optimizer_spec

    canonical = canonical_name(name)
    if stands_in(canonical):
        dtype = next((p.dtype for g in groups for p in g["params"]), torch.float32)
        return StateOnlyOptimizer(groups, lr, state_bytes_for(canonical, dtype))
    args = dict(args or {})
    if foreach and optimizer_spec(canonical).module == "torch.optim":
        args.setdefault("foreach", True)
    return build_optimizer(canonical, groups, lr, args)
