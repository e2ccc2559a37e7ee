"""Extract a LoRA/LoCon from the difference of two models, as sd-scripts' extract_lora_from_models.

For each target layer ``ΔW = W_tuned − W_base`` (conv 3x3 flattened to ``(out, in·k·k)``) is
factorised by SVD (same shapes batched), truncated to the rank (or a dynamic rule), and written
as ``up = U·S``, ``down = Vh``, ``alpha = rank`` (scale 1) — kohya's layout. Like sd-scripts:

- conv 3x3 layers are extracted only when a conv rank is given;
- the text encoder(s) are left out when no text-encoder weight changed by more than ``min_diff``
  (sd-scripts' default 0.01), since a fine-tune usually leaves them alone.

sd-scripts clamps ``U·S`` and ``Vh`` to their 99th-percentile magnitude by default; we keep the
exact truncation unless ``clamp_quantile`` is set.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from loraforge.errors import LoraFileError
from loraforge.ops.delta import make_lora_tensors
from loraforge.ops.resize import ModuleResize
from loraforge.ops.svd import check_param, choose_rank, svd_dense

TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_")


@dataclass(frozen=True)
class ExtractSpec:
    """How to extract.

    Attributes:
        rank: the rank of linear and 1x1 layers (the cap for dynamic methods).
        conv_rank: the rank of k x k conv layers; ``None`` leaves them out (LoRA, not LoCon).
        method, param: a rank rule (see :mod:`loraforge.ops.svd`).
        min_diff: text encoders whose largest change is at most this are skipped.
        clamp_quantile: clamp factors at this quantile like sd-scripts (e.g. 0.99); default off.
        device: where to compute.
        save_dtype: the output dtype.
    """

    rank: int
    conv_rank: int | None = None
    method: str = "fixed"
    param: float | None = None
    min_diff: float = 0.01
    clamp_quantile: float | None = None
    device: str = "cpu"
    save_dtype: torch.dtype = torch.float16


@dataclass(frozen=True)
class ExtractResult:
    """The LoRA tensors, one row per module, and what was left out and why."""

    tensors: dict[str, torch.Tensor]
    rows: tuple[ModuleResize, ...]
    skipped: tuple[tuple[str, str], ...]


def extract_lora(
    pairs: Mapping[str, tuple[torch.Tensor, torch.Tensor]], spec: ExtractSpec
) -> ExtractResult:
    """Extract a LoRA from ``{lora module name: (base weight, tuned weight)}``.

    Raises:
        LoraFileError: a pair whose shapes differ, or nothing left to extract.
        ValueError: a bad rank rule.
    """
    check_param(spec.method, spec.param)
    skipped: list[tuple[str, str]] = []
    diffs: dict[str, torch.Tensor] = {}
    for name, (base, tuned) in pairs.items():
        if base.shape != tuned.shape:
            raise LoraFileError(
                f"layer {name}: the base weight is {tuple(base.shape)} but the tuned one is "
                f"{tuple(tuned.shape)}",
                hint="extract between two models of the same architecture",
            )
        if base.dim() == 4 and any(k > 1 for k in base.shape[2:]) and spec.conv_rank is None:
            continue
        diffs[name] = tuned.to(torch.float32) - base.to(torch.float32)
    _drop_unchanged(diffs, spec.min_diff, skipped)
    if not diffs:
        raise LoraFileError(
            "the two models are identical in every target layer: there is nothing to extract",
            hint="check that --tuned is the fine-tuned model and --base its original",
        )
    names = list(diffs)
    svds = svd_dense([diffs[n].reshape(diffs[n].shape[0], -1) for n in names], device=spec.device)
    tensors: dict[str, torch.Tensor] = {}
    rows = []
    for name, svd in zip(names, svds, strict=True):
        shape = tuple(diffs[name].shape)
        spatial = len(shape) == 4 and any(k > 1 for k in shape[2:])
        cap = spec.conv_rank if spatial and spec.conv_rank else spec.rank
        k = choose_rank(svd.s, spec.method, spec.param, cap)
        up, down = svd.u[:, :k] * svd.s[:k], svd.vh[:k]
        if spec.clamp_quantile is not None:
            up, down = _clamp(up, down, spec.clamp_quantile)
        tensors.update(make_lora_tensors(name, up, down, float(k), shape, spec.save_dtype))
        rows.append(_row(name, shape, spatial, k, svd.s))
    return ExtractResult(tensors, tuple(rows), tuple(skipped))


def _drop_unchanged(
    diffs: dict[str, torch.Tensor], min_diff: float, skipped: list[tuple[str, str]]
) -> None:
    for prefix in TEXT_ENCODER_PREFIXES:
        te = [n for n in diffs if n.startswith(prefix)]
        if te and max(float(diffs[n].abs().max()) for n in te) <= min_diff:
            for n in te:
                del diffs[n]
            skipped.append((prefix.rstrip("_"), f"text encoder unchanged (max |ΔW| <= {min_diff})"))
    for name in [n for n, d in diffs.items() if not bool(d.any())]:
        del diffs[name]
        skipped.append((name, "unchanged"))


def _clamp(
    up: torch.Tensor, down: torch.Tensor, quantile: float
) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.cat([up.flatten(), down.flatten()])
    if values.numel() > 16_000_000:  # torch.quantile's input limit
        values = values[
            torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[:16_000_000]
        ]
    high = float(torch.quantile(values, quantile))
    return up.clamp(-high, high), down.clamp(-high, high)


def _row(name: str, shape: tuple[int, ...], spatial: bool, k: int, s: torch.Tensor) -> ModuleResize:
    kind = "linear" if len(shape) == 2 else ("conv3x3" if spatial else "conv1x1")
    s = s.double()
    total = float(s.square().sum().sqrt())
    kept = float(s[:k].square().sum().sqrt())
    full = int(s.numel())
    return ModuleResize(
        name, kind, full, k, float(full), float(k),
        kept / total if total > 0 else 1.0,
        float(s[k]) if k < full else 0.0,
        total,
    )  # fmt: skip
