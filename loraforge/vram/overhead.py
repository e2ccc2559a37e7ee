"""What a GPU needs beyond the live tensors: the CUDA context and the allocator's slack.

Both are constants to calibrate with ``benchmarks/vram_calibration.py`` on real cards:

* the CUDA context (driver state, kernel images of PyTorch/cuDNN/cuBLAS, their handles and
  default workspaces) takes a few hundred MiB before the first tensor;
* PyTorch's caching allocator reserves more than it hands out (2 MiB-rounded segments, blocks
  split and not coalesced, cuDNN/cuBLAS workspaces taken from the same pool), so
  ``max_memory_reserved`` runs some percent above ``max_memory_allocated``.

The tensor peak both estimators compute is the ``max_memory_allocated`` part.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from loraforge.vram.result import Method, VramEstimate, VramRow
from loraforge.vram.sizes import format_bytes

CUDA_CONTEXT_BYTES = 512 * 2**20
# Bucketed training changes tensor shapes from batch to batch, so cached blocks fit less well
# than in a fixed-shape loop; 15% is on the safe side of the usual 5-20%.
ALLOCATOR_SLACK = 0.15


def overhead_rows(tensor_bytes: int) -> list[VramRow]:
    """The two overhead rows for a tensor peak of ``tensor_bytes``."""
    slack = int(tensor_bytes * ALLOCATOR_SLACK)
    return [
        VramRow(
            "CUDA context",
            CUDA_CONTEXT_BYTES,
            "driver state and kernels of PyTorch, cuBLAS, cuDNN",
            "overhead",
        ),
        VramRow(
            "allocator reserve",
            slack,
            f"{ALLOCATOR_SLACK:.0%} of the {format_bytes(tensor_bytes)} tensor peak: "
            "fragmentation and library workspaces",
            "overhead",
        ),
    ]


def estimate_with_overheads(
    method: Method,
    settings: Any,
    arch: Any,
    rows: Sequence[VramRow],
    tensor_bytes: int,
    notes: Sequence[str],
) -> VramEstimate:
    """An estimate from a method's tensor rows: the overhead rows added and the total summed.

    Args:
        method: ``analytic`` or ``traced``.
        settings: the :class:`~loraforge.vram.settings.MemorySettings` estimated.
        arch: the :class:`~loraforge.vram.arch.Architecture` estimated.
        rows: the tensor rows (and 0-byte info rows).
        tensor_bytes: the peak of live tensors.
        notes: caveats to show with the estimate.
    """
    rows = [*rows, *overhead_rows(tensor_bytes)]
    return VramEstimate(
        method=method,
        family=settings.family,
        architecture=arch.source,
        resolution=(settings.width, settings.height),
        batch_size=settings.batch_size,
        rows=tuple(rows),
        total_bytes=sum(r.bytes for r in rows),
        tensor_bytes=tensor_bytes,
        notes=tuple(notes),
    )
