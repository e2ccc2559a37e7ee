"""Resize a LoRA/LoCon to a lower rank by truncated SVD (fixed or dynamic rank).

For each module the delta ``up @ down`` (conv 3x3 included: down flattened to ``(r, in·k·k)``) is
factorised exactly (:func:`loraforge.ops.svd.svd_of_products`, same-shaped modules batched into one
call), truncated to the chosen rank, and written back as ``up = U·S``, ``down = Vh``. By
Eckart–Young this is the best rank-``k`` approximation in both the spectral and the Frobenius
norm, with error ``σ_k+1`` and ``sqrt(Σ_{i>k} σᵢ²)`` respectively.

The new alpha keeps each module's effective scale: ``alpha' = (alpha / rank) · k``. The dynamic
rank rules and the sd-scripts off-by-one they fix are described in :mod:`loraforge.ops.svd`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from loraforge.errors import LoraFileError
from loraforge.ops.delta import lora_factors, lora_weight_shape, make_lora_tensors
from loraforge.ops.derived_metadata import common_rank_alpha, training_comment
from loraforge.ops.modules import LoraModule, ParsedLora, user_algorithm
from loraforge.ops.svd import check_param, choose_rank, svd_of_products


@dataclass(frozen=True)
class ResizeSpec:
    """How to resize.

    Attributes:
        rank: the new rank (the cap for dynamic methods).
        conv_rank: the cap for conv 3x3 modules; default ``rank``.
        method: ``fixed``, ``sv_ratio``, ``sv_fro`` or ``sv_cumulative``.
        param: the dynamic method's parameter.
        device: where to compute (``cpu``, ``cuda``).
        save_dtype: the output dtype; default: the input file's.
        batched: default True; False resizes one module at a time (benchmark baseline).
    """

    rank: int
    conv_rank: int | None = None
    method: str = "fixed"
    param: float | None = None
    device: str = "cpu"
    save_dtype: torch.dtype | None = None
    batched: bool = True


@dataclass(frozen=True)
class ModuleResize:
    """One report row.

    Attributes:
        retained_fro: ``‖ΔW_k‖_F / ‖ΔW‖_F`` (1.0 for an all-zero module).
        largest_discarded: the largest dropped singular value of the scaled ``ΔW``
            (its spectral-norm error); 0.0 when nothing was dropped.
    """

    name: str
    kind: str
    old_rank: int
    new_rank: int
    old_alpha: float
    new_alpha: float
    retained_fro: float
    largest_discarded: float
    norm: float


@dataclass(frozen=True)
class ResizeResult:
    """The resized tensors and the report."""

    tensors: dict[str, torch.Tensor]
    rows: tuple[ModuleResize, ...]

    @property
    def mean_retained_fro(self) -> float:
        return sum(r.retained_fro for r in self.rows) / len(self.rows) if self.rows else 1.0


def module_kind(m: LoraModule) -> str:
    """``linear``, ``conv1x1`` or ``conv3x3`` (any kernel larger than 1x1)."""
    if not m.kernel:
        return "linear"
    return "conv3x3" if m.is_conv3x3 else "conv1x1"


def _refuse_non_lora(parsed: ParsedLora) -> None:
    for m in parsed.modules.values():
        if m.algorithm != "lora" or m.dora:
            algo = user_algorithm(m)
            raise LoraFileError(
                f"{parsed.label}: resize is defined for LoRA/LoCon only; module {m.name} is {algo}",
                hint="bake it into a checkpoint (`loraforge merge --base MODEL --lora FILE`) and "
                "extract a LoRA from the difference (`loraforge merge --extract`)",
            )


def resize_lora(
    parsed: ParsedLora, spec: ResizeSpec, stray: Mapping[str, torch.Tensor] | None = None
) -> ResizeResult:
    """Resize every module of a LoRA/LoCon.

    Args:
        parsed: the grouped file (must be valid and LoRA/LoCon only).
        spec: the new rank and rule.
        stray: tensors outside any module, copied through unchanged.

    Raises:
        LoraFileError: a broken file, or a module that is not LoRA/LoCon.
        ValueError: a bad rank rule parameter or rank.
    """
    parsed.require_valid()
    _refuse_non_lora(parsed)
    check_param(spec.method, spec.param)
    if spec.rank < 1 or (spec.conv_rank is not None and spec.conv_rank < 1):
        raise ValueError("the rank must be at least 1")
    modules = list(parsed.modules.values())
    first = modules[0].tensors["lora_down.weight"]
    save_dtype = spec.save_dtype or (first.dtype if first.is_floating_point() else torch.float32)
    factors = [lora_factors(m, torch.float32) for m in modules]
    svds = svd_of_products(
        [f[0] for f in factors], [f[1] for f in factors], device=spec.device, batched=spec.batched
    )
    tensors: dict[str, torch.Tensor] = dict(stray or {})
    rows = []
    for m, svd in zip(modules, svds, strict=True):
        kind = module_kind(m)
        cap = spec.conv_rank if (kind == "conv3x3" and spec.conv_rank) else spec.rank
        old_rank = int(m.tensors["lora_down.weight"].shape[0])
        k = choose_rank(svd.s, spec.method, spec.param, min(cap, old_rank))
        scale = m.scale
        new_alpha = scale * k
        up = svd.u[:, :k] * svd.s[:k]
        tensors.update(
            make_lora_tensors(m.name, up, svd.vh[:k], new_alpha, lora_weight_shape(m), save_dtype)
        )
        rows.append(_row(m, kind, old_rank, k, new_alpha, svd.s, scale))
    return ResizeResult(tensors, tuple(rows))


def _row(
    m: LoraModule, kind: str, old_rank: int, k: int, new_alpha: float, s: torch.Tensor, scale: float
) -> ModuleResize:
    s64 = s.double().abs() * abs(scale)
    total = float(s64.square().sum().sqrt())
    kept = float(s64[:k].square().sum().sqrt())
    return ModuleResize(
        name=m.name,
        kind=kind,
        old_rank=old_rank,
        new_rank=k,
        old_alpha=m.alpha if m.alpha is not None else float(old_rank),
        new_alpha=new_alpha,
        retained_fro=kept / total if total > 0 else 1.0,
        largest_discarded=float(s64[k]) if k < s64.numel() else 0.0,
        norm=total,
    )


def resized_metadata(
    metadata: Mapping[str, str], result: ResizeResult, spec: ResizeSpec
) -> dict[str, str]:
    """The output metadata: dims/alphas, a training comment, everything else kept.

    ``ss_network_dim``/``ss_network_alpha`` hold the common linear rank/alpha, or ``Dynamic``
    when the modules differ (as sd-scripts writes for dynamic resizes). Conv ranks go into
    ``ss_network_args`` (``conv_dim``/``conv_alpha``) when the file had conv 3x3 modules.
    The hashes are recomputed by :func:`loraforge.ops.lora_file.write_lora_file`.
    """
    meta = dict(metadata)
    linear = [r for r in result.rows if r.kind != "conv3x3"]
    conv = [r for r in result.rows if r.kind == "conv3x3"]
    old_dim = max((r.old_rank for r in result.rows), default=0)
    comment = training_comment(meta)
    if spec.method == "fixed":
        conv_note = (
            f" (conv: {spec.conv_rank})" if spec.conv_rank and spec.conv_rank != spec.rank else ""
        )
        what = f"dimension is resized from {old_dim} to {spec.rank}{conv_note} by loraforge"
    else:
        what = (
            f"Dynamic resize with {spec.method}: {spec.param} from {old_dim} "
            f"(max {spec.rank}) by loraforge"
        )
    meta["ss_training_comment"] = f"{what}; {comment}" if comment else what
    meta["ss_network_dim"], meta["ss_network_alpha"] = common_rank_alpha(
        [(r.new_rank, r.new_alpha) for r in linear]
    )
    if conv:
        args = _json_object(meta.get("ss_network_args"))
        args["conv_dim"], args["conv_alpha"] = common_rank_alpha(
            [(r.new_rank, r.new_alpha) for r in conv]
        )
        meta["ss_network_args"] = json.dumps(args)
    return meta


def _json_object(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
