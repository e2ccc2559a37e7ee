"""CUDA autocast behaviour on CPU tensors, so a CPU (or fake-CPU) step keeps GPU dtypes.

Which dtype autocast gives an operation's result decides how many bytes autograd saves, and the
CPU and CUDA autocast policies differ: CUDA runs normalisations, softmax, up-sampling and a few
element-wise functions in float32 (``AT_FORALL_FP32`` / ``AT_FORALL_FP32_SET_OPT_DTYPE`` in
PyTorch's ``aten/src/ATen/autocast_mode.cpp``), CPU keeps them in the low-precision dtype. A fake
CUDA device cannot run autograd on a CPU-only PyTorch build, so the trace runs on the CPU under
``torch.autocast("cpu")`` -- whose low-precision list (convolutions, matmuls, linear, SDPA)
matches CUDA's -- plus :class:`CudaFp32Policy`, which applies CUDA's float32 policy at the same
level autocast does (before autograd records the operation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

# CUDA's fp32 policy: floating inputs are cast to float32 (names of the Python-level functions).
_FP32_CAST = frozenset(
    {
        "group_norm",
        "layer_norm",
        "interpolate",
        "upsample",
        "upsample_nearest",
        "upsample_bilinear",
        "exp",
        "expm1",
        "log",
        "log2",
        "log10",
        "log1p",
        "reciprocal",
        "rsqrt",
        "pow",
        "__pow__",
        "__rpow__",
        "softplus",
        "acos",
        "asin",
        "cosh",
        "sinh",
        "tan",
        "erfinv",
        "cosine_similarity",
        "logsumexp",
        "cdist",
        "dist",
        "renorm",
    }
)
# CUDA's fp32-set-opt-dtype policy: the op computes in float32 given ``dtype=float32`` (no copy
# of the input).
_FP32_DTYPE = frozenset({"softmax", "log_softmax", "cumsum", "cumprod", "prod", "sum"})
_LOW = (torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)


def _to_fp32(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype in _LOW:
        return value.to(torch.float32)
    return value


class CudaFp32Policy(TorchFunctionMode):
    """While CPU autocast is on, run CUDA's float32-policy operations in float32.

    Stays active for a whole step: it acts only where CPU autocast is enabled.
    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        if not torch.is_autocast_enabled("cpu"):
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in _FP32_CAST:
            return func(*tree_map(_to_fp32, args), **tree_map(_to_fp32, kwargs))
        if name in _FP32_DTYPE and kwargs.get("dtype") is None:
            first = args[0] if args else kwargs.get("input")
            if isinstance(first, torch.Tensor) and first.dtype in _LOW:
                kwargs["dtype"] = torch.float32
        return func(*args, **kwargs)


def autocast(dtype: torch.dtype | None, device: str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` to ``dtype`` on ``device`` (``None``: no autocast).

    On the CPU, run the step inside :func:`cuda_policy` too, and checkpoint with
    :func:`checkpoint_contexts` (backward does not keep Python modes, so a recomputed forward
    needs the policy entered again).
    """
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=dtype)


@contextlib.contextmanager
def cuda_policy(enabled: bool = True) -> Iterator[None]:
    """Apply CUDA's float32 autocast policy to CPU autocast regions (when ``enabled``)."""
    if not enabled:
        yield
        return
    with CudaFp32Policy():
        yield


def checkpoint_contexts(enabled: bool = True) -> tuple[Any, Any]:
    """``context_fn`` result for ``torch.utils.checkpoint``: the policy again in recomputation
    (when ``enabled``)."""
    if not enabled:
        return contextlib.nullcontext(), contextlib.nullcontext()
    return contextlib.nullcontext(), CudaFp32Policy()
