"""Where FLUX.1 / SD3 LoRA modules land in an original-layout (BFL / SAI) single file.

sd-scripts names a module ``lora_unet_`` + the original module path with ``.`` -> ``_``, so in a
file of that layout (``flux1-dev.safetensors``, ``sd3.5_large.safetensors``; keys with or
without ``model.diffusion_model.``) every LoRA module is one whole weight, as ComfyUI and Forge
apply it. SD3 files with text encoders keep them under ``text_encoders.clip_l/clip_g/t5xxl.
transformer.`` (transformers layout): ``lora_te1_``/``lora_te2_`` (CLIP paths with
``text_model.``) and ``lora_te3_`` (T5 paths).

A diffusers-layout folder splits the fused layers (``qkv``, ``linear1``); merging into one is
refused with a hint (merge into the single file, or load the LoRA in diffusers).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from loraforge.errors import ModelError
from loraforge.models.transformer_naming import text_encoder_lora_name
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
        component = f"text_encoder_{index + 1}" if index else "text_encoder"
        for key in keys:
            if not key.startswith(prefix) or not key.endswith(".weight") or state[key].dim() != 2:
                continue
            path = key.removeprefix(prefix).removesuffix(".weight")
            group = "attn" if index < 2 and _CLIP_DEFAULT.search(path) else "other"
            name = text_encoder_lora_name(family, index, path)
            table[name] = Target(TargetRef(key), group, component)
    return table
