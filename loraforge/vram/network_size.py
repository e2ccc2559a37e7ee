"""How many parameters the recipe's network has, from the layer structure alone (no torch).

Native (kohya) algorithms are counted exactly as the kohya backend builds them: the same targets
(:mod:`loraforge.models.naming` rules), per-block ranks (``rank_plan``), train_unet /
train_text_encoder, LoRA-FA's frozen down matrices. LyCORIS algorithms are approximated on the
same targets with each algorithm's factor shapes; the traced method builds the real modules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loraforge.backends.kohya_blocks import rank_plan
from loraforge.models.naming import block_index, text_encoder_lora_name, unet_lora_name
from loraforge.recipe.types import NetworkConfig
from loraforge.vram.structure import Layer, TextStructure, UNetStructure, iter_unet_targets


@dataclass(frozen=True)
class NetworkSize:
    """Parameters of a network.

    Attributes:
        total: every parameter (LoRA-FA's frozen down matrices included).
        trainable: parameters the optimizer updates.
        unet_modules, text_modules: adapter modules on each part.
        rebuilt_weight_elements: elements of the full weights LyCORIS modules rebuild in each
            forward (0 for native algorithms, which add ``up(down(x))`` instead).
    """

    total: int
    trainable: int
    unet_modules: int
    text_modules: int
    rebuilt_weight_elements: int = 0


def _factor(dim: int, factor: int) -> tuple[int, int]:
    """LyCORIS' ``factorization``: ``(m, n)`` with ``m * n == dim``, ``m <= n``, ``m`` near the
    factor (or near sqrt(dim) for ``factor <= 0``)."""
    if factor > 0 and dim % factor == 0:
        m, n = factor, dim // factor
        return (m, n) if m <= n else (n, m)
    target = math.isqrt(dim) if factor <= 0 else factor
    m = max(d for d in range(1, target + 1) if dim % d == 0)
    return m, dim // m


def _module_params(algorithm: str, layer: Layer, rank: int, args: Mapping[str, Any]) -> int:
    """Parameters of one adapter module on ``layer`` (LyCORIS shapes approximated)."""
    k2 = max(layer.kernel, 1) ** 2
    fan_in, fan_out = layer.in_features * k2, layer.out_features
    low_rank = rank * (fan_in + fan_out)
    if algorithm in ("lora", "locon", "lora-fa", "dylora"):
        params = low_rank
    elif algorithm in ("loha", "glora"):
        params = 2 * low_rank
    elif algorithm == "lokr":
        out_m, out_n = _factor(fan_out, int(args.get("factor", -1)))
        in_m, in_n = _factor(layer.in_features, int(args.get("factor", -1)))
        second = out_n * in_n * k2
        if rank < max(out_n, in_n * k2) / 2:
            second = rank * (out_n + in_n * k2)
        params = out_m * in_m + second
    elif algorithm == "ia3":
        params = fan_out
    elif algorithm == "full":
        params = fan_in * fan_out + (fan_out if layer.bias else 0)
    else:  # diag-oft / boft: block-diagonal rotations of block size `rank`
        params = fan_out * rank
    if args.get("dora_wd") or args.get("weight_decompose"):
        params += fan_out
    return params


def _trainable(algorithm: str, layer: Layer, rank: int, params: int) -> int:
    if algorithm == "lora-fa":  # the down projection is frozen
        return rank * layer.out_features
    return params


def network_size(
    config: NetworkConfig,
    family: str,
    unet: UNetStructure,
    text_encoders: Sequence[TextStructure],
    unet_config: Mapping[str, Any],
) -> NetworkSize:
    """Count the network's parameters for ``family``'s architecture.

    Raises:
        RecipeError: per-block lists of the wrong length (as the backend would).
    """
    plan = rank_plan(config, family)
    algorithm = config.algorithm
    total = trainable = rebuilt = unet_modules = text_modules = 0
    chosen: list[tuple[Layer, int]] = []
    if config.train_unet:
        for layer in iter_unet_targets(unet, conv=plan.uses_conv):
            name = unet_lora_name(family, layer.path, unet_config=unet_config)
            spec = plan.spec_for(
                is_unet=True, is_kxk_conv=layer.kernel > 1, block=block_index(family, name)
            )
            if spec is not None:
                chosen.append((layer, spec.dim))
                unet_modules += 1
    if config.train_text_encoder:
        for index, encoder in enumerate(text_encoders):
            for layer in encoder.layers:
                text_encoder_lora_name(family, index, layer.path)  # validates the index
                spec = plan.spec_for(is_unet=False, is_kxk_conv=False, block=None)
                if spec is not None:
                    chosen.append((layer, spec.dim))
                    text_modules += 1
    for layer, rank in chosen:
        params = _module_params(algorithm, layer, rank, config.args)
        total += params
        trainable += _trainable(algorithm, layer, rank, params)
        if config.backend == "lycoris" and algorithm not in ("lora", "locon", "ia3"):
            rebuilt += layer.in_features * layer.out_features * max(layer.kernel, 1) ** 2
    return NetworkSize(total, trainable, unet_modules, text_modules, rebuilt)
