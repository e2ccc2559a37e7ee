"""Data-parallel training across processes (``accelerate launch``), without wrapping in DDP.

The network's ``forward`` is never called: its modules ride on the base layers' forwards. DDP
only synchronises gradients of a module whose own ``forward`` ran, so (like sd-scripts'
``all_reduce_network``) the gradients are averaged here, explicitly, once per optimizer step. The
same collective carries the step's loss and any rank's request to stop, so every rank sees the
same loss (NaN checks agree) and stops at the same step.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class StepAgreement:
    """What all ranks agree on after an optimizer step's collective.

    Attributes:
        loss: the step's loss, averaged over ranks.
        stop: some rank asked to stop (Ctrl-C).
    """

    loss: float
    stop: bool


def is_distributed(num_processes: int) -> bool:
    return num_processes > 1 and dist.is_available() and dist.is_initialized()


def synchronise_step(
    parameters: Iterable[nn.Parameter], loss: float, stop: bool, num_processes: int
) -> StepAgreement:
    """Average gradients, the loss and the stop flag over every process (a no-op alone).

    Parameters without a gradient get zeros first, so every rank reduces the same tensors even
    when module dropout skipped a module on one of them.

    Args:
        parameters: the trainable parameters (same order on every rank).
        loss: this rank's loss of the step.
        stop: this rank wants to stop.
        num_processes: world size.
    """
    if not is_distributed(num_processes):
        return StepAgreement(loss, stop)
    params = list(parameters)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= num_processes
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
    device = params[0].device if params else torch.device("cpu")
    scalars = torch.tensor([loss, float(stop)], dtype=torch.float64, device=device)
    dist.all_reduce(scalars)
    return StepAgreement(float(scalars[0]) / num_processes, bool(scalars[1] > 0))


def broadcast_module(module: nn.Module, num_processes: int) -> None:
    """Copy rank 0's parameters and buffers of ``module`` to every rank (a no-op alone)."""
    if not is_distributed(num_processes):
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def wait_for_everyone(num_processes: int) -> None:
    """Barrier (a no-op alone)."""
    if is_distributed(num_processes):
        dist.barrier()
