"""Count the bytes of live tensor storage while PyTorch runs, real tensors or fake ones alike.

:class:`LiveBytesTracker` is a ``TorchDispatchMode``: every ATen operation passes through it, so it
sees every storage an operation creates (forward, autograd's backward formulas, gradient
accumulation, optimizer steps, checkpoint recomputation). A storage is counted once, when it
first appears, and uncounted when its ``StorageImpl`` dies (a ``weakref.finalize`` on the
storage's Python object, which PyTorch keeps alive exactly as long as the storage). Views and
in-place results share their input's storage and so cost nothing, as on a GPU.

Sizes are rounded up the way the CUDA caching allocator rounds blocks (512 bytes), so the peak is
comparable with ``torch.cuda.max_memory_allocated``. Workspaces a single kernel allocates
internally (cuDNN, cuBLAS) are invisible here: they are part of the overhead term.

The same tracker measures a real CPU step and a ``FakeTensorMode`` trace, which is what makes the
two comparable (tests/vram checks they agree).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# c10::cuda::CUDACachingAllocator kMinBlockSize: every block is a multiple of 512 bytes.
ALLOCATOR_BLOCK_BYTES = 512


def rounded_bytes(nbytes: int, block: int = ALLOCATOR_BLOCK_BYTES) -> int:
    """``nbytes`` rounded up to a multiple of ``block`` (0 stays 0)."""
    return -(-nbytes // block) * block if nbytes > 0 else 0


@dataclass
class _Record:
    nbytes: int
    category: str
    allocated_at: int
    freed_at: int | None = None


class LiveBytesTracker(TorchDispatchMode):
    """Track current and peak bytes of live tensor storages.

    Use ``register(tensors, category)`` for tensors that exist before tracking starts (weights),
    then run the step inside ``with tracker:``. Storages created while tracking get the category
    set with :meth:`phase` (``"activations"`` by default); :meth:`recategorize` moves live ones
    afterwards (e.g. the gradients, once they are known).

    Attributes:
        current: bytes alive now.
        peak: the largest ``current`` seen.
        peak_event: the allocation counter at the peak (see :meth:`live_at_peak`).
    """

    def __init__(self, block_bytes: int = ALLOCATOR_BLOCK_BYTES) -> None:
        super().__init__()
        self.block_bytes = block_bytes
        self.current = 0
        self.peak = 0
        self.peak_event = 0
        self._event = 0
        self._category = "activations"
        self._live: dict[int, _Record] = {}
        self._records: list[_Record] = []

    # ---- public API ------------------------------------------------------------------------
    def phase(self, category: str) -> None:
        """Category for the storages created from now on."""
        self._category = category

    def register(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        """Count already existing tensors (e.g. model weights) under ``category``."""
        for tensor in tensors:
            self._track(tensor, category)

    def recategorize(self, tensors: Iterable[torch.Tensor], category: str) -> None:
        """Give the (live) storages of ``tensors`` another category."""
        for tensor in tensors:
            record = self._live.get(_storage_key(tensor))
            if record is not None:
                record.category = category

    def live_at_peak(self) -> dict[str, int]:
        """Bytes per category of the storages that were alive at the peak."""
        totals: dict[str, int] = {}
        for record in self._records:
            alive = record.allocated_at <= self.peak_event and (
                record.freed_at is None or record.freed_at > self.peak_event
            )
            if alive:
                totals[record.category] = totals.get(record.category, 0) + record.nbytes
        return totals

    def reset_peak(self) -> None:
        """Start a new peak from the current level (like ``torch.cuda.reset_peak_memory_stats``)."""
        self.peak = self.current
        self.peak_event = self._event
        self._records = [r for r in self._records if r.freed_at is None]

    # ---- internals -------------------------------------------------------------------------
    def _track(self, tensor: torch.Tensor, category: str) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._live:
            return
        self._event += 1
        record = _Record(rounded_bytes(storage.nbytes(), self.block_bytes), category, self._event)
        self._live[key] = record
        self._records.append(record)
        self.current += record.nbytes
        if self.current > self.peak:
            self.peak = self.current
            self.peak_event = self._event
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        record = self._live.pop(key, None)
        if record is None:
            return
        self._event += 1
        record.freed_at = self._event
        self.current -= record.nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default and _is_fake(args[0]):
            return _placeholder_scalar(args[0])
        result = func(*args, **(kwargs or {}))
        for item in tree_flatten(result)[0]:
            if isinstance(item, torch.Tensor):
                self._track(item, self._category)
        return result


def _is_fake(tensor: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


def _placeholder_scalar(tensor: torch.Tensor) -> bool | int | float:
    """A value for ``.item()`` on a fake tensor, which has none.

    Chosen so that random choices keep the most memory: ``torch.rand(1).item() < p`` (module
    dropout) is false, so the module runs; ``randint(...).item()`` (DyLoRA's rank) is 0; a
    boolean test is true.
    """
    if tensor.dtype == torch.bool:
        return True
    if tensor.is_floating_point():
        return 1.0
    return 0


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata
