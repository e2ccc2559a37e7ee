"""CPU offload of the checkpointed block inputs (sd-scripts' ``--cpu_offload_checkpointing``).

With gradient checkpointing each transformer block keeps only its inputs for backward; this
keeps those inputs in CPU memory instead: they go to the CPU before the checkpointed call and
back to the GPU inside it (forward and its recomputation in backward), so a step holds about
one block's inputs on the GPU instead of every block's. Gradients flow through both copies.
On a CPU run there is nothing to move and the blocks run as before.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _moves(value: Any, storage: torch.device) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.device != storage


def enable_cpu_offload_checkpointing(transformer: nn.Module) -> None:
    """Wrap ``transformer``'s checkpointing function (set by ``enable_gradient_checkpointing``,
    which must come first) so block inputs wait in CPU memory."""
    original = transformer._gradient_checkpointing_func
    storage = torch.device("cpu")

    def offloaded(block: Any, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return original(block, *args, **kwargs)
        devices = [a.device if _moves(a, storage) else None for a in args]
        stored = [a.to(storage) if d is not None else a for a, d in zip(args, devices, strict=True)]

        def run(*inner: Any, **inner_kwargs: Any) -> Any:
            back = [x.to(d) if d is not None else x for x, d in zip(inner, devices, strict=True)]
            return block(*back, **inner_kwargs)

        return original(run, *stored, **kwargs)

    transformer._gradient_checkpointing_func = offloaded
