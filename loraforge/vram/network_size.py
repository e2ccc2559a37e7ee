"""How many parameters the recipe's network has, from the layer structure alone (no torch).

Native (kohya) algorithms are counted exactly as the kohya backend builds them: the same targets
(:mod:`loraforge.models.naming` rules), per-block ranks (``rank_plan``), train_unet /
train_text_encoder, LoRA-FA's frozen down matrices. LyCORIS algorithms are approximated: the
layers of the classes their preset names (a torch-free copy of lycoris-lora's preset table) with
each algorithm's factor shapes; the traced method builds the real modules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loraforge.backends.kohya_blocks import rank_plan
from loraforge.backends.kohya_config import conv_dim_of
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
    tensor_sizes: tuple[int, ...] = ()
    scalar_buffers: int = 0

    def allocated_bytes(self, dtype_bytes: int, block: int = 512) -> int:
        """Bytes of the network's tensors as the CUDA allocator holds them: every parameter
        tensor and scalar buffer (alpha, …) rounded up to ``block`` bytes."""

        def rounded(n: int) -> int:
            return -(-n // block) * block

        return sum(rounded(n * dtype_bytes) for n in self.tensor_sizes) + block * (
            self.scalar_buffers
        )


# lycoris-lora's presets on a diffusers UNet (``lycoris.config.PRESET``), by the owners of
# ``vram.structure`` layers: (owners, kxk convs enabled, text encoders trained)
_LYCORIS_PRESETS: Mapping[str, tuple[frozenset[str], bool, bool]] = {
    "full": (frozenset({"transformer", "resnet", "sampler", "other"}), True, True),
    "full-lin": (frozenset({"transformer", "resnet", "other"}), False, True),
    "attn-mlp": (frozenset({"transformer"}), False, True),
    "attn-only": (frozenset({"transformer"}), False, True),
    "unet-only": (frozenset({"transformer", "resnet", "sampler", "other"}), True, False),
    "unet-transformer-only": (frozenset({"transformer"}), False, False),
    "unet-convblock-only": (frozenset({"resnet", "sampler", "other"}), True, False),
}
_LYCORIS_SCALARS = 3  # alpha, scalar and dtype_tensor buffers per module


def _lycoris_unet_targets(unet: UNetStructure, preset: str) -> list[Layer]:
    owners, conv, _ = _LYCORIS_PRESETS.get(preset, _LYCORIS_PRESETS["full"])
    return [layer for layer in unet.layers if layer.owner in owners and (conv or layer.kernel <= 1)]


def _tensor_sizes(algorithm: str, layer: Layer, rank: int, params: int) -> tuple[int, ...]:
    """Element counts of one module's parameter tensors (their allocator rounding matters)."""
    fan_in = layer.in_features * max(layer.kernel, 1) ** 2
    pair = (rank * fan_in, layer.out_features * rank)
    if algorithm in ("lora", "locon", "lora-fa", "dylora"):
        sizes = pair
    elif algorithm == "loha":
        sizes = pair + pair
    else:
        sizes = (params,)
    extra = params - sum(sizes)
    return sizes + ((extra,) if extra > 0 else ())


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
        # the magnitude per input column (1, in), or per output row with wd_on_output
        params += fan_out if args.get("wd_on_output") else fan_in
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
    if config.backend == "lycoris":
        return _lycoris_size(config, unet, text_encoders)
    plan = rank_plan(config, family)
    chosen: list[tuple[Layer, int]] = []
    unet_modules = text_modules = 0
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
    return _sum_modules(config, chosen, unet_modules, text_modules, scalars_per_module=1)


def _lycoris_size(
    config: NetworkConfig, unet: UNetStructure, text_encoders: Sequence[TextStructure]
) -> NetworkSize:
    preset = str(config.args.get("preset", "full"))
    conv_rank = conv_dim_of(config) or config.dim
    chosen: list[tuple[Layer, int]] = []
    if config.train_unet:
        for layer in _lycoris_unet_targets(unet, preset):
            chosen.append((layer, conv_rank if layer.kernel > 1 else config.dim))
    unet_modules = len(chosen)
    trains_text = _LYCORIS_PRESETS.get(preset, _LYCORIS_PRESETS["full"])[2]
    if config.train_text_encoder and trains_text:
        chosen += [(layer, config.dim) for encoder in text_encoders for layer in encoder.layers]
    return _sum_modules(
        config,
        chosen,
        unet_modules,
        len(chosen) - unet_modules,
        scalars_per_module=_LYCORIS_SCALARS,
    )


def _sum_modules(
    config: NetworkConfig,
    chosen: Sequence[tuple[Layer, int]],
    unet_modules: int,
    text_modules: int,
    *,
    scalars_per_module: int,
) -> NetworkSize:
    algorithm = config.algorithm
    total = trainable = rebuilt = 0
    sizes: list[int] = []
    for layer, rank in chosen:
        params = _module_params(algorithm, layer, rank, config.args)
        total += params
        trainable += _trainable(algorithm, layer, rank, params)
        sizes += _tensor_sizes(algorithm, layer, rank, params)
        if config.backend == "lycoris" and algorithm not in ("lora", "locon", "ia3"):
            rebuilt += layer.in_features * layer.out_features * max(layer.kernel, 1) ** 2
    return NetworkSize(
        total,
        trainable,
        unet_modules,
        text_modules,
        rebuilt,
        tuple(sizes),
        scalars_per_module * len(chosen),
    )
