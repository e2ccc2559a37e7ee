"""Where FLUX.1 / SD3 LoRA modules land in an original-layout (BFL / SAI) single file.

sd-scripts names a module ``lora_unet_`` + the original module path with ``.`` -> ``_``, so in a
file of that layout (``flux1-dev.safetensors``, ``sd3.5_large.safetensors``; keys with or
without ``model.diffusion_model.``) every LoRA module is one whole weight, as ComfyUI and Forge
apply it. SD3 files with text encoders keep them under ``text_encoders.clip_l/clip_g/t5xxl.
transformer.`` (transformers layout): ``lora_te1_``/``lora_te2_`` (CLIP paths with
``text_model.``) and ``lora_te3_`` (T5 paths).

A diffusers folder splits the fused layers (``qkv``, ``linear1``) and orders SD3's pre-only
modulations differently: each such LoRA module gets a *view*, a state entry holding the original
layer (its diffusers layers' rows in the original order), which merge and extract treat like any
weight; :func:`scatter_views` writes a changed view back into the diffusers layers. A
diffusers-layout transformer single file is refused (merge into the original file instead).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from loraforge.errors import ModelError
from loraforge.models.transformer_naming import (
    TransformerLoraOptions,
    text_encoder_lora_name,
    transformer_targets,
)
from loraforge.ops.merge_into import TargetRef
from loraforge.ops.targets import Target

_PREFIXES = ("model.diffusion_model.", "")
# sd-scripts' default targets: the Linears of the transformer blocks
_BLOCKS = re.compile(r"^(double_blocks|single_blocks|joint_blocks)\.\d+\.")
_TEXT = {
    "sd3": (
        ("text_encoders.clip_l.transformer.", 0),
        ("text_encoders.clip_g.transformer.", 1),
        ("text_encoders.t5xxl.transformer.", 2),
    ),
    "flux": (),
}
_TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3")
_CLIP_DEFAULT = re.compile(r"encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


def flow_single_file_targets(
    family: str, state: Mapping[str, torch.Tensor], *, source: str
) -> dict[str, Target]:
    """``{kohya name: Target}`` of a BFL/SAI-layout FLUX or SD3 file (2-D and conv weights).

    Raises:
        ModelError: a diffusers-layout transformer file (fused layers are split there).
    """
    keys = set(state)
    if not any(_BLOCKS.match(k.removeprefix(_PREFIXES[0])) for k in keys):
        raise ModelError(
            f"{source}: a {family} transformer in diffusers layout; merging kohya LoRAs needs "
            "the original (BFL/SAI) layout, where sd-scripts' fused layers exist",
            hint="merge into the original single file (e.g. flux1-dev.safetensors), or load "
            "the LoRA in diffusers with load_lora_weights",
        )
    table: dict[str, Target] = {}
    text_prefixes = tuple(prefix for prefix, _ in _TEXT[family])
    for key in sorted(keys):
        if not key.endswith(".weight") or state[key].dim() < 2 or key.startswith(text_prefixes):
            continue
        path = key.removeprefix(_PREFIXES[0]).removesuffix(".weight")
        group = "attn" if _BLOCKS.match(path + ".") else "other"
        table["lora_unet_" + path.replace(".", "_")] = Target(TargetRef(key), group, "transformer")
    for prefix, index in _TEXT[family]:
        table.update(_text_targets(family, index, state, prefix, _TEXT_COMPONENTS[index]))
    return table


def _text_targets(
    family: str, index: int, state: Mapping[str, torch.Tensor], prefix: str, component: str
) -> dict[str, Target]:
    """Targets of one text encoder (transformers layout): the keys of ``state`` that start with
    ``prefix`` (a single file), or (``prefix`` ``"<component>/"``) all of a component's keys,
    which the flat state holds under that prefix."""
    table = {}
    folder = prefix == f"{component}/"
    t5 = text_encoder_lora_name(family, index, "x").startswith("lora_te3_")
    for key, tensor in state.items():
        if not key.endswith(".weight") or tensor.dim() != 2:
            continue
        if not folder and not key.startswith(prefix):
            continue
        path = (key if folder else key.removeprefix(prefix)).removesuffix(".weight")
        group = "attn" if not t5 and _CLIP_DEFAULT.search(path) else "other"
        ref = TargetRef(prefix + key if folder else key)
        table[text_encoder_lora_name(family, index, path)] = Target(ref, group, component)
    return table


View = list[tuple[str, tuple[int, int], int]]
_FOLDER_TEXT = {"flux": ("text_encoder", "text_encoder_2"), "sd3": _TEXT_COMPONENTS}


def flow_diffusers_base(path: Path, components: Mapping[str, tuple[dict, dict]]) -> Any:
    """A FLUX/SD3 diffusers folder as :class:`~loraforge.ops.base_model.BaseWeights`.

    Args:
        components: ``{name: (state, config)}`` of ``transformer`` and the text encoders.

    Raises:
        ModelError: a transformer class that is neither FLUX's nor SD3's.
    """
    from loraforge.ops.base_model import BaseWeights
    from loraforge.ops.targets import flatten_components

    config = components["transformer"][1]
    family = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3"}.get(
        str(config.get("_class_name"))
    )
    if family is None:
        raise ModelError(
            f"{path}: transformer {config.get('_class_name')!r} is neither FLUX.1 nor SD3",
            hint="pass a SD 1.x/2.x/XL, SD3/SD3.5 or FLUX.1 model",
        )
    flat = flatten_components({name: st for name, (st, _) in components.items()})
    targets, views = _transformer_views(family, config, flat)
    for index, name in enumerate(_FOLDER_TEXT[family]):
        if name in components:
            targets.update(_text_targets(family, index, components[name][0], f"{name}/", name))
    return BaseWeights(path, "diffusers", family, False, flat, targets, views=views)


def _transformer_views(
    family: str, config: Mapping[str, Any], flat: dict[str, torch.Tensor]
) -> tuple[dict[str, Target], dict[str, View]]:
    extra = TransformerLoraOptions(extra_dims=(1,) * (5 if family == "flux" else 6))
    defaults = {t.name for t in transformer_targets(family, config)}
    targets: dict[str, Target] = {}
    views: dict[str, View] = {}
    for target in transformer_targets(family, config, extra):
        keys = [f"transformer/{part.path}.weight" for part in target.parts]
        if any(k not in flat for k in keys):
            continue
        group = "attn" if target.name in defaults else "other"
        if not target.fused:
            targets[target.name] = Target(TargetRef(keys[0]), group, "transformer")
            continue
        view = f"transformer/{target.name}@original"
        views[view] = [
            (key, part.rows, part.dest) for key, part in zip(keys, target.parts, strict=True)
        ]
        flat[view] = torch.cat(
            [
                flat[key][part.dest : part.dest + part.rows[1] - part.rows[0]]
                for key, part in zip(keys, target.parts, strict=True)
            ]
        )
        targets[target.name] = Target(TargetRef(view), group, "transformer")
    return targets, views


def scatter_views(state: dict[str, torch.Tensor], views: Mapping[str, View]) -> None:
    """Write each view's rows back into its diffusers layers and drop the view entries."""
    for view, parts in views.items():
        fused = state.pop(view)
        for key, (start, stop), dest in parts:
            weight = state[key].clone()
            weight[dest : dest + stop - start] = fused[start:stop].to(weight.dtype)
            state[key] = weight
