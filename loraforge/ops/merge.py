"""Merge LoRAs into one: exact or concat (merging into base weights: :mod:`loraforge.ops.merge_into`).

- **concat**: ``up = [r₁·s₁·up₁ | r₂·s₂·up₂ | …]``, ``down = [down₁; down₂; …]``, alpha = rank
  (``rᵢ`` the ratio, ``sᵢ = alphaᵢ/rankᵢ``). The rank is the sum of the ranks; nothing is lost.
- **exact**: the same sum, truncated by SVD to ``rank`` (or a dynamic rule) — the best rank-``k``
  approximation of ``Σ rᵢ ΔWᵢ``. LoRA/LoCon sums are factorised without forming ``ΔW``; LoHa,
  LoKr and full deltas are summed densely.

Ratios may be negative (subtracting a LoRA). Modules that depend on the base weight (DoRA, OFT,
BOFT, IA3, GLoRA), and what a LoRA cannot hold (norm-layer deltas, the bias deltas of full and
norm modules), merge into weights only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loraforge.errors import LoraFileError
from loraforge.ops.delta import (
    is_additive,
    lora_factors,
    lora_weight_shape,
    make_lora_tensors,
    module_delta,
)
from loraforge.ops.family import FAMILY_NAMES, FamilyGuess
from loraforge.ops.modules import LoraModule, ParsedLora, user_algorithm
from loraforge.ops.resize import ModuleResize, module_kind
from loraforge.ops.svd import Svd, check_param, choose_rank, svd_dense, svd_of_products


@dataclass(frozen=True)
class WeightedLora:
    """One input: a parsed LoRA, its ratio and what it was detected as."""

    parsed: ParsedLora
    ratio: float
    family: FamilyGuess | None = None


def check_lora_families(loras: Sequence[WeightedLora]) -> str | None:
    """The common family of the inputs (``None`` if none is known).

    Raises:
        LoraFileError: two inputs are for different families, naming both.
    """
    seen: tuple[str, str] | None = None
    for item in loras:
        family = item.family.family if item.family else None
        if family is None:
            continue
        if seen is not None and seen[0] != family:
            raise LoraFileError(
                f"{item.parsed.label} is an {FAMILY_NAMES[family]} LoRA but {seen[1]} is an "
                f"{FAMILY_NAMES[seen[0]]} LoRA; they cannot be merged",
                hint="merge LoRAs trained for the same base model family",
            )
        seen = seen or (family, item.parsed.label)
    return seen[0] if seen else None


def _contributions(
    loras: Sequence[WeightedLora],
) -> dict[str, list[tuple[LoraModule, WeightedLora]]]:
    table: dict[str, list[tuple[LoraModule, WeightedLora]]] = {}
    for item in loras:
        item.parsed.require_valid()
        for name, module in item.parsed.modules.items():
            table.setdefault(name, []).append((module, item))
    return table


def _refuse_what_a_lora_cannot_hold(
    name: str, parts: list[tuple[LoraModule, WeightedLora]]
) -> None:
    hint = "merge it into a checkpoint: `loraforge merge --base MODEL --lora FILE`"
    for module, item in parts:
        if not is_additive(module):
            raise LoraFileError(
                f"{item.parsed.label}: module {name} is {user_algorithm(module)}, whose effect "
                "depends on the base weights, so it cannot be merged into a LoRA",
                hint=hint,
            )
        if module.algorithm == "norm" or module.bias_delta is not None:
            what = "a norm layer" if module.algorithm == "norm" else "a bias (diff_b)"
            raise LoraFileError(
                f"{item.parsed.label}: module {name} changes {what}, which a LoRA file "
                "(matrix deltas only) cannot hold, so it cannot be merged into a LoRA",
                hint=hint,
            )


@dataclass(frozen=True)
class LoraMergeResult:
    """Merged LoRA tensors and one report row per module (``old_rank`` = summed input ranks)."""

    tensors: dict[str, torch.Tensor]
    rows: tuple[ModuleResize, ...]


def merge_loras_concat(loras: Sequence[WeightedLora], save_dtype: torch.dtype) -> LoraMergeResult:
    """Merge LoRA/LoCon files into one by stacking their ranks (lossless).

    Raises:
        LoraFileError: a module that is not LoRA/LoCon, or shapes that disagree between files.
    """
    tensors: dict[str, torch.Tensor] = {}
    rows = []
    for name, parts in _contributions(loras).items():
        _refuse_what_a_lora_cannot_hold(name, parts)
        shape = _lora_only_shape(name, parts, "concat")
        ups, downs = [], []
        for module, item in parts:
            up, down = lora_factors(module, torch.float32)
            ups.append(up * (item.ratio * module.scale))
            downs.append(down)
        up, down = torch.cat(ups, 1), torch.cat(downs, 0)
        rank = int(down.shape[0])
        tensors.update(make_lora_tensors(name, up, down, float(rank), shape, save_dtype))
        norm = float(torch.linalg.matrix_norm(up.double() @ down.double()))
        kind = module_kind(parts[0][0])
        rows.append(ModuleResize(name, kind, rank, rank, float(rank), float(rank), 1.0, 0.0, norm))
    return LoraMergeResult(tensors, tuple(rows))


def _lora_only_shape(
    name: str, parts: list[tuple[LoraModule, WeightedLora]], mode: str
) -> tuple[int, ...]:
    shapes = {}
    for module, item in parts:
        if module.algorithm != "lora":
            raise LoraFileError(
                f"{item.parsed.label}: module {name} is {user_algorithm(module)}; {mode} merging "
                "stacks LoRA/LoCon ranks only",
                hint="use --mode exact, which sums the deltas of LoRA, LoHa, LoKr and full modules",
            )
        shapes[lora_weight_shape(module)] = item.parsed.label
    return _one_shape(name, shapes)


def _one_shape(name: str, shapes: dict[tuple[int, ...], str]) -> tuple[int, ...]:
    if len(shapes) > 1:
        described = "; ".join(f"{label}: {tuple(s)}" for s, label in shapes.items())
        raise LoraFileError(
            f"module {name} has different layer shapes in the inputs ({described})",
            hint="the LoRAs were trained for different base models",
        )
    return next(iter(shapes))


@dataclass(frozen=True)
class ExactSpec:
    """Rank rule for exact merging (see :mod:`loraforge.ops.svd`)."""

    rank: int
    conv_rank: int | None = None
    method: str = "fixed"
    param: float | None = None
    device: str = "cpu"


def merge_loras_exact(
    loras: Sequence[WeightedLora], spec: ExactSpec, save_dtype: torch.dtype
) -> LoraMergeResult:
    """Sum the scaled deltas of every input and re-factorise each module to a LoRA/LoCon.

    Raises:
        LoraFileError: weight-dependent modules, disagreeing shapes, or a LoHa conv whose kernel
            cannot be told from its tensors.
        ValueError: a bad rank rule.
    """
    check_param(spec.method, spec.param)
    table = _contributions(loras)
    names, shapes, svds = _exact_svds(table, spec)
    tensors: dict[str, torch.Tensor] = {}
    rows = []
    for name, shape, svd in zip(names, shapes, svds, strict=True):
        kind = (
            "linear"
            if len(shape) == 2
            else ("conv3x3" if any(k > 1 for k in shape[2:]) else "conv1x1")
        )
        cap = spec.conv_rank if (kind == "conv3x3" and spec.conv_rank) else spec.rank
        k = choose_rank(svd.s, spec.method, spec.param, cap)
        up = svd.u[:, :k] * svd.s[:k]
        tensors.update(make_lora_tensors(name, up, svd.vh[:k], float(k), shape, save_dtype))
        s = svd.s.double()
        total = float(s.square().sum().sqrt())
        kept = float(s[:k].square().sum().sqrt())
        summed = sum(_input_rank(m) for m, _ in table[name])
        rows.append(
            ModuleResize(
                name, kind, summed, k, float(summed), float(k),
                kept / total if total > 0 else 1.0,
                float(s[k]) if k < s.numel() else 0.0,
                total,
            )
        )  # fmt: skip
    return LoraMergeResult(tensors, tuple(rows))


def _input_rank(m: LoraModule) -> int:
    return m.rank or 0


def _exact_svds(
    table: dict[str, list[tuple[LoraModule, WeightedLora]]], spec: ExactSpec
) -> tuple[list[str], list[tuple[int, ...]], list[Svd]]:
    factored: list[tuple[str, tuple[int, ...], torch.Tensor, torch.Tensor]] = []
    dense: list[tuple[str, tuple[int, ...], torch.Tensor]] = []
    for name, parts in table.items():
        _refuse_what_a_lora_cannot_hold(name, parts)
        shape = _layer_shape(name, parts)
        if all(m.algorithm == "lora" for m, _ in parts):
            ups, downs = zip(*(lora_factors(m) for m, _ in parts), strict=True)
            scaled = [u * (item.ratio * m.scale) for u, (m, item) in zip(ups, parts, strict=True)]
            factored.append((name, shape, torch.cat(scaled, 1), torch.cat(downs, 0)))
        else:
            total = sum(item.ratio * module_delta(m, shape=shape) for m, item in parts)
            dense.append((name, shape, total.reshape(shape[0], -1)))
    svd_a = svd_of_products([f[2] for f in factored], [f[3] for f in factored], device=spec.device)
    svd_b = svd_dense([d[2] for d in dense], device=spec.device)
    names = [f[0] for f in factored] + [d[0] for d in dense]
    shapes = [f[1] for f in factored] + [d[1] for d in dense]
    return names, shapes, svd_a + svd_b


def _layer_shape(name: str, parts: list[tuple[LoraModule, WeightedLora]]) -> tuple[int, ...]:
    shapes: dict[tuple[int, ...], str] = {}
    unknown = []
    for module, item in parts:
        shape = _implied_shape(module)
        if shape is None:
            unknown.append(item.parsed.label)
        else:
            shapes[shape] = item.parsed.label
    if not shapes:
        raise LoraFileError(
            f"module {name}: the layer shape cannot be told from the tensors in {unknown[0]} "
            "(a LoHa/LoKr conv without a kernel dimension)",
            hint="merge it into a checkpoint and extract a LoRA from the result",
        )
    return _one_shape(name, shapes)


def _implied_shape(m: LoraModule) -> tuple[int, ...] | None:
    if m.algorithm == "lora":
        return lora_weight_shape(m)
    if m.algorithm == "full":
        return tuple(int(s) for s in m.tensors["diff"].shape)
    delta = module_delta(m)
    if delta.dim() == 4:
        return tuple(int(s) for s in delta.shape)
    # LyCORIS stores a non-Tucker LoHa/LoKr conv flattened to (out, in·k·k): its kernel is lost.
    if m.name.endswith(_SPATIAL_CONV_SUFFIXES):
        return None
    return tuple(int(s) for s in delta.shape)


# kohya names of the k x k convolutions (diffusers and SGM spellings)
_SPATIAL_CONV_SUFFIXES = (
    "_conv1", "_conv2", "_conv", "_op", "conv_in", "conv_out", "_in_layers_2", "_out_layers_3",
)  # fmt: skip
