"""Merge LoRAs into base weights: ``W ← apply(W)`` for every module at its ratio
(:func:`~loraforge.ops.delta.apply_module`), and the bias deltas of full (``diff_b``) and norm
(``b_norm``) modules into the layers' biases. A resolver maps each LoRA module name to a weight
key (and, for fused ``in_proj`` tensors, a row range); the bias sits next to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from loraforge.errors import LoraFileError
from loraforge.ops.delta import apply_bias, apply_module
from loraforge.ops.family import FAMILY_NAMES
from loraforge.ops.merge import WeightedLora
from loraforge.ops.modules import LoraModule


@dataclass(frozen=True)
class TargetRef:
    """Where a LoRA module lands in a state dict.

    Attributes:
        key: the weight's key.
        rows: ``(start, stop)`` rows of a fused tensor (OpenCLIP ``in_proj_weight`` q/k/v).
    """

    key: str
    rows: tuple[int, int] | None = None


Resolver = Callable[[str], "TargetRef | None"]


def check_base_family(lora: WeightedLora, base_family: str | None, base_label: str) -> None:
    """Refuse a LoRA made for another family than the base model.

    Raises:
        LoraFileError: naming both families.
    """
    family = lora.family.family if lora.family else None
    if family is None or base_family is None or family == base_family:
        return
    raise LoraFileError(
        f"{lora.parsed.label} is an {FAMILY_NAMES[family]} LoRA but {base_label} is an "
        f"{FAMILY_NAMES[base_family]} model",
        hint=f"use an {FAMILY_NAMES[base_family]} LoRA with this model, "
        f"or an {FAMILY_NAMES[family]} base",
    )


@dataclass(frozen=True)
class MergeIntoReport:
    """What merging into weights did.

    Attributes:
        merged: ``(lora label, modules merged)`` per input.
        skipped: per input, the names of its modules that have no layer in the model.
        keys: the weight (and bias) keys that changed.
        biases: per input, how many bias deltas (full ``diff_b``, norm ``b_norm``) were added.
    """

    merged: tuple[tuple[str, int], ...]
    skipped: tuple[tuple[str, ...], ...]
    keys: tuple[str, ...]
    biases: tuple[int, ...] = ()


Entry = tuple[LoraModule, WeightedLora, TargetRef]


def bias_ref(weight: TargetRef) -> TargetRef:
    """Where the bias of a weight's layer is (``….weight`` -> ``….bias``; OpenCLIP's fused
    ``in_proj_weight`` rows -> the same rows of ``in_proj_bias``)."""
    return TargetRef(weight.key.removesuffix("weight") + "bias", weight.rows)


def merge_into_state_dict(
    state_dict: dict[str, torch.Tensor],
    loras: Sequence[WeightedLora],
    resolve: Resolver,
    *,
    device: str = "cpu",
    compute_dtype: torch.dtype = torch.float32,
    base_label: str = "the base model",
) -> MergeIntoReport:
    """Apply every module of every input to ``state_dict`` **in place**: the weight deltas, and
    the bias deltas of full (``diff_b``) and norm (``b_norm``) modules to the layers' biases.

    Modules with no layer in the model are skipped and reported (sd-scripts warns and goes on,
    e.g. for a text-encoder projection a checkpoint stores differently); an input none of whose
    modules has a layer was made for another model and is refused.

    Args:
        state_dict: the base weights; changed entries keep their dtype.
        loras: the inputs with their ratios.
        resolve: maps a LoRA module name to its :class:`TargetRef` (``None``: not in this model).
        device, compute_dtype: where and in which precision to compute (float32 default).
        base_label: how messages name the base model.

    Raises:
        LoraFileError: an input with no module in the model, a module whose shape does not fit,
            or a bias delta for a layer without a bias.
    """
    weights: dict[str, list[Entry]] = {}
    biases: dict[str, list[Entry]] = {}
    counts, skipped, bias_counts = [], [], []
    for item in loras:
        item.parsed.require_valid()
        missing, bias_count = [], 0
        for name, module in item.parsed.modules.items():
            target = resolve(name)
            if target is None or target.key not in state_dict:
                missing.append(name)
                continue
            weights.setdefault(target.key, []).append((module, item, target))
            if module.bias_delta is not None:
                bias = _bias_target(state_dict, module, item, target, base_label)
                biases.setdefault(bias.key, []).append((module, item, bias))
                bias_count += 1
        if missing and len(missing) == len(item.parsed.modules):
            raise LoraFileError(
                f"{item.parsed.label}: none of its {len(missing)} modules has a matching layer "
                f"in {base_label} (e.g. {', '.join(missing[:3])})",
                hint="the LoRA was made for another model family or architecture; check it with "
                "`loraforge check LORA`",
            )
        counts.append((item.parsed.label, len(item.parsed.modules) - len(missing)))
        skipped.append(tuple(missing))
        bias_counts.append(bias_count)
    for table, apply in ((weights, apply_module), (biases, apply_bias)):
        for key, entries in table.items():
            state_dict[key] = _apply_all(
                state_dict[key], entries, apply, device, compute_dtype, base_label
            )
    return MergeIntoReport(tuple(counts), tuple(skipped), (*weights, *biases), tuple(bias_counts))


def _bias_target(
    state_dict: dict[str, torch.Tensor],
    module: LoraModule,
    item: WeightedLora,
    target: TargetRef,
    base_label: str,
) -> TargetRef:
    bias = bias_ref(target)
    if bias.key not in state_dict:
        raise LoraFileError(
            f"{item.parsed.label}: module {module.name} changes the bias of {target.key}, "
            f"which has no bias in {base_label}",
            hint="the LoRA was made for a different model (a layer with a bias)",
        )
    return bias


def _apply_all(
    original: torch.Tensor,
    entries: list[Entry],
    apply: Callable[[LoraModule, torch.Tensor, float], torch.Tensor],
    device: str,
    dtype: torch.dtype,
    base_label: str,
) -> torch.Tensor:
    weight = original.to(device=device, dtype=dtype)
    for module, item, target in entries:
        part = weight if target.rows is None else weight[target.rows[0] : target.rows[1]]
        try:
            updated = apply(module, part, item.ratio)
        except (ValueError, RuntimeError) as e:
            raise LoraFileError(
                f"{item.parsed.label}: module {module.name} does not fit {target.key} "
                f"{tuple(part.shape)} in {base_label}: {e}",
                hint="the LoRA was made for a different model (family or size)",
            ) from e
        if target.rows is None:
            weight = updated
        else:
            weight = weight.clone()
            weight[target.rows[0] : target.rows[1]] = updated
    return weight.to(device=original.device, dtype=original.dtype)
