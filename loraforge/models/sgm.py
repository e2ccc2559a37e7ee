"""Map diffusers UNet module paths to the original SGM/LDM ("stable-diffusion") layout and back.

Pure string logic (no torch). The SGM layout is what the original SD checkpoints, A1111, ComfyUI
and kohya-ss/sd-scripts' SDXL UNet use: ``input_blocks.N.M``, ``middle_block.N``,
``output_blocks.N.M``, ResNet children ``in_layers.2`` / ``out_layers.3`` / ``emb_layers.1`` /
``skip_connection``, down-samplers ``op``. The numbering follows sd-scripts'
``make_unet_conversion_map`` (library/sdxl_model_util.py) generalised to any level count:
every down level holds ``layers_per_block`` layers plus one down-sampler slot, every up level
``layers_per_block + 1`` layers, and the up-sampler sits after the attention when the level has one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# diffusers ResnetBlock2D child -> SGM ResBlock child
_RESNET_TO_SGM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_SGM_TO_RESNET = {v: k for k, v in _RESNET_TO_SGM.items()}

# top-level modules outside the blocks
_TOP_TO_SGM = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_SGM_TO_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}

_DOWN = re.compile(r"^down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)(?:\.(.*))?$")
_UP = re.compile(r"^up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)(?:\.(.*))?$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$")
_SGM_IN = re.compile(r"^input_blocks\.(\d+)\.(\d+)(?:\.(.*))?$")
_SGM_OUT = re.compile(r"^output_blocks\.(\d+)\.(\d+)(?:\.(.*))?$")
_SGM_MID = re.compile(r"^middle_block\.(\d+)(?:\.(.*))?$")


@dataclass(frozen=True)
class UNetLayout:
    """What the SGM numbering depends on.

    Args:
        layers_per_block: ResNet layers per down level (up levels have one more).
        up_attention: per up level (diffusers ``up_blocks`` order), whether it has attentions;
            the up-sampler is child ``2`` of the last layer when it does, child ``1`` otherwise.
    """

    layers_per_block: int
    up_attention: tuple[bool, ...]

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UNetLayout:
        """Build the layout from a diffusers ``unet/config.json`` dict."""
        layers = config.get("layers_per_block", 2)
        if not isinstance(layers, int):
            # per-level layer counts do not fit the SGM numbering sd-scripts uses
            raise ValueError(f"layers_per_block must be one integer for SGM names, got {layers!r}")
        up_types = config.get("up_block_types") or ()
        return cls(layers, tuple("CrossAttn" in t for t in up_types))


# sd-scripts hard-codes this layout for SDXL (3 levels, 2 layers, attention in up levels 0 and 1)
SDXL_LAYOUT = UNetLayout(layers_per_block=2, up_attention=(True, True, False))
# SD 1.x/2.x: 4 levels, no attention in the deepest level (up_blocks.0)
SD_LAYOUT = UNetLayout(layers_per_block=2, up_attention=(False, True, True, True))


def _join(*parts: str | None) -> str:
    return ".".join(p for p in parts if p)


def _resnet_child(rest: str | None, table: Mapping[str, str]) -> str | None:
    """Rename the first component(s) of a ResNet child path via ``table``."""
    if not rest:
        return rest
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def _has_attention(layout: UNetLayout, up_index: int) -> bool:
    if up_index < len(layout.up_attention):
        return layout.up_attention[up_index]
    return True


def sgm_unet_path(module_path: str, layout: UNetLayout = SDXL_LAYOUT) -> str:
    """Return the SGM path of a diffusers UNet module (or parameter) path.

    ``down_blocks.1.attentions.0.proj_in`` -> ``input_blocks.4.1.proj_in`` (SDXL layout).

    Raises:
        ValueError: for a path outside the UNet's known structure.
    """
    step = layout.layers_per_block + 1
    for old, new in _TOP_TO_SGM.items():
        if module_path == old or module_path.startswith(old + "."):
            return new + module_path[len(old) :]
    if m := _DOWN.match(module_path):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":
            rest = "op" + rest[len("conv") :] if rest and rest.startswith("conv") else rest
            return _join(f"input_blocks.{step * (level + 1)}.0", rest)
        if kind == "resnets":
            child = _resnet_child(rest, _RESNET_TO_SGM)
            return _join(f"input_blocks.{step * level + j + 1}.0", child)
        return _join(f"input_blocks.{step * level + j + 1}.1", rest)
    if m := _UP.match(module_path):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "upsamplers":
            child = 2 if _has_attention(layout, level) else 1
            return _join(f"output_blocks.{step * level + step - 1}.{child}", rest)
        if kind == "resnets":
            return _join(f"output_blocks.{step * level + j}.0", _resnet_child(rest, _RESNET_TO_SGM))
        return _join(f"output_blocks.{step * level + j}.1", rest)
    if m := _MID.match(module_path):
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "resnets":
            return _join(f"middle_block.{2 * j}", _resnet_child(rest, _RESNET_TO_SGM))
        return _join("middle_block.1", rest)
    raise ValueError(f"not a UNet module path that has an SGM name: {module_path!r}")


def diffusers_unet_path(sgm_path: str, layout: UNetLayout = SDXL_LAYOUT) -> str:
    """Inverse of :func:`sgm_unet_path`.

    ``input_blocks.4.1.proj_in`` -> ``down_blocks.1.attentions.0.proj_in`` (SDXL layout).

    ``label_emb`` maps to ``add_embedding`` (SDXL's text-time embedding).

    Raises:
        ValueError: for a path outside the SGM UNet structure.
    """
    step = layout.layers_per_block + 1
    for old, new in _SGM_TO_TOP.items():
        if sgm_path == old or sgm_path.startswith(old + "."):
            return new + sgm_path[len(old) :]
    if m := _SGM_IN.match(sgm_path):
        n, child, rest = int(m[1]), int(m[2]), m[3]
        if n == 0:
            raise ValueError(f"not an SGM UNet module path: {sgm_path!r}")
        level, j = divmod(n - 1, step)
        if j == step - 1:  # the down-sampler slot
            rest = "conv" + rest[len("op") :] if rest and rest.startswith("op") else rest
            return _join(f"down_blocks.{level}.downsamplers.0", rest)
        if child == 0:
            return _join(f"down_blocks.{level}.resnets.{j}", _resnet_child(rest, _SGM_TO_RESNET))
        return _join(f"down_blocks.{level}.attentions.{j}", rest)
    if m := _SGM_OUT.match(sgm_path):
        n, child, rest = int(m[1]), int(m[2]), m[3]
        level, j = divmod(n, step)
        if child == 0:
            return _join(f"up_blocks.{level}.resnets.{j}", _resnet_child(rest, _SGM_TO_RESNET))
        attention = _has_attention(layout, level)
        if child == 2 or (child == 1 and not attention):
            return _join(f"up_blocks.{level}.upsamplers.0", rest)
        return _join(f"up_blocks.{level}.attentions.{j}", rest)
    if m := _SGM_MID.match(sgm_path):
        n, rest = int(m[1]), m[2]
        if n % 2 == 0:
            return _join(f"mid_block.resnets.{n // 2}", _resnet_child(rest, _SGM_TO_RESNET))
        return _join("mid_block.attentions.0", rest)
    raise ValueError(f"not an SGM UNet module path: {sgm_path!r}")
