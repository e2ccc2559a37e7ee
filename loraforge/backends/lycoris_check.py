"""What ``check`` can tell about a LyCORIS network from the model's configs alone (no torch): the
layers a built-in preset trains, and whether BOFT can be built on each of them.

The preset table mirrors ``lycoris.config.PRESET`` as loraforge reads it
(:mod:`loraforge.backends.lycoris_targets`): which diffusers classes and names each preset targets,
and whether kxk convs are trained. It is checked against the real selection in the tests.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loraforge.backends.lycoris_config import DEFAULT_PRESET, conv_dim_of

if TYPE_CHECKING:
    from loraforge.recipe.types import NetworkConfig
    from loraforge.vram.structure import Layer, TextStructure, UNetStructure


@dataclass(frozen=True)
class _Preset:
    """``unet``: parts of the UNet (``transformer``, ``resnet``, ``sampler`` = the classes;
    ``embedding`` = TimestepEmbedding; ``io`` = conv_in/conv_out; ``attention`` = the attention
    projections; ``names`` = only ``names``); ``text``: ``all``, ``attention``, ``names`` or
    ``None``; ``conv``: kxk convs are trained."""

    unet: frozenset[str]
    text: str | None
    conv: bool
    names: tuple[str, ...] = ()


_FULL_UNET = frozenset({"transformer", "resnet", "sampler", "embedding", "io"})
PRESETS = {
    "full": _Preset(_FULL_UNET, "all", True),
    "full-lin": _Preset(frozenset({"transformer", "resnet", "embedding"}), "all", False),
    "attn-mlp": _Preset(frozenset({"transformer", "embedding"}), "all", False),
    "attn-only": _Preset(frozenset({"attention"}), "attention", False),
    "unet-only": _Preset(_FULL_UNET, None, True),
    "unet-transformer-only": _Preset(frozenset({"transformer", "embedding"}), None, False),
    "unet-convblock-only": _Preset(frozenset({"resnet", "sampler", "io"}), None, True),
    "ia3": _Preset(
        frozenset({"names"}),
        "names",
        False,
        ("to_k", "to_v", "ff.net.2", "k_proj", "v_proj", "mlp.fc2"),
    ),
}
_ATTENTION_UNET = re.compile(r"\.attn\d+\.to_(q|k|v|out\.0)$")
_ATTENTION_TEXT = re.compile(r"\.self_attn\.(q|k|v|out)_proj$")


def _unet_part(layer: Layer) -> str:
    if layer.owner != "other":
        return layer.owner
    return "io" if layer.path in ("conv_in", "conv_out") else "embedding"


def _named(path: str, names: Sequence[str]) -> bool:
    return any(path == n or path.endswith("." + n) for n in names)


def _unet_keeps(spec: _Preset, layer: Layer) -> bool:
    if layer.kernel > 1 and not spec.conv:
        return False
    if "names" in spec.unet:
        return _named(layer.path, spec.names)
    if "attention" in spec.unet:
        return bool(_ATTENTION_UNET.search(layer.path))
    return _unet_part(layer) in spec.unet


def _text_keeps(spec: _Preset, layer: Layer) -> bool:
    if spec.text == "attention":
        return bool(_ATTENTION_TEXT.search(layer.path))
    if spec.text == "names":
        return _named(layer.path, spec.names)
    return spec.text == "all"


def preset_layers(
    preset: str,
    unet: UNetStructure | None,
    text_encoders: Sequence[TextStructure],
) -> list[Layer]:
    """The layers a built-in LyCORIS preset trains (``unet`` ``None`` / no text encoders: that
    part is not trained).

    Raises:
        KeyError: not a built-in preset.
    """
    spec = PRESETS[preset]
    chosen = [layer for layer in (unet.layers if unet else ()) if _unet_keeps(spec, layer)]
    for encoder in text_encoders:
        chosen += [layer for layer in encoder.layers if _text_keeps(spec, layer)]
    return chosen


def butterfly_factor(dimension: int, factor: int = -1) -> tuple[int, int] | None:
    """lycoris-lora's ``power2factorization`` for BOFT: ``(block size, block count)`` with an even
    block size of at most ``factor`` (``-1``: any) and a power-of-two block count, the largest
    block size that fits; ``None`` where lycoris-lora raises "impossible to decompose"."""
    if factor == -1:
        factor = dimension
    found = None
    for size in range(2, min(factor, dimension) + 1, 2):
        count = dimension // size
        if dimension % size == 0 and count & (count - 1) == 0:
            found = (size, count)
    return found


def smallest_boft_dim(width: int) -> int | None:
    """The smallest ``dim`` BOFT accepts for a layer of ``width`` outputs (larger ones work too);
    ``None`` when no ``dim`` does (an odd width)."""
    for size in range(2, width + 1, 2):
        if butterfly_factor(width, size) is not None:
            return size
    return None


def boft_problem(config: NetworkConfig, layers: Iterable[Layer], family: str) -> str | None:
    """Why BOFT cannot be built on these layers with the recipe's ``dim`` (``conv_dim`` for kxk
    convs), naming the widths that fail and the dims that work; ``None`` when it can."""
    failing: dict[int, int] = {}  # width -> the dim it was given
    widths: set[int] = set()
    for layer in layers:
        dim = conv_dim_of(config) if layer.kernel > 1 else config.dim
        widths.add(layer.out_features)
        if butterfly_factor(layer.out_features, dim) is None:
            failing[layer.out_features] = dim
    if not failing:
        return None
    shown = ", ".join(str(w) for w in sorted(failing))
    needed = [smallest_boft_dim(w) for w in widths]
    if any(n is None for n in needed):
        works = "no dim works (a layer has an odd width); choose another preset"
    else:
        least = max(n for n in needed if n is not None)
        works = f"dims that work for every layer: {least} or more (e.g. {_examples(least)})"
    return (
        f"BOFT cannot be built on the {family} layers of width {shown} with dim "
        f'{", ".join(sorted({str(d) for d in failing.values()}))} (lycoris-lora: "impossible to '
        f'decompose {min(failing)} with factor {failing[min(failing)]}": the block size must be '
        f"even, at most dim, and leave a power-of-two block count); {works}"
    )


def _examples(least: int) -> str:
    picks = [least, *(p for p in (16, 32, 64) if p > least)]
    return ", ".join(str(p) for p in picks[:3])


def boft_layers(
    config: NetworkConfig, unet: UNetStructure | None, text_encoders: Sequence[TextStructure]
) -> list[Layer]:
    """The layers the recipe's BOFT network trains (its preset; train_unet/train_text_encoder)."""
    preset = str(config.args.get("preset", DEFAULT_PRESET))
    return preset_layers(
        preset,
        unet if config.train_unet else None,
        text_encoders if config.train_text_encoder else (),
    )
