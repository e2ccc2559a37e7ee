"""Where each kohya LoRA module lands in a base model's state dict (diffusers or single file).

Builds ``{kohya name: Target}`` tables with :mod:`loraforge.models.naming` and
:mod:`loraforge.models.sgm` (pure string logic), so merge and extract work on state dicts without
instantiating the models:

- diffusers folder: UNet keys are diffusers paths (SGM-renamed for SDXL), text-encoder keys CLIP
  paths with or without ``text_model.``;
- single file: UNet keys ``model.diffusion_model.<SGM path>`` (SD 1.x/2.x LoRA names use the
  diffusers path, so SGM paths are mapped back), CLIP-L text encoders in transformers layout,
  OpenCLIP ones (SD 2.x, SDXL's second) with fused ``attn.in_proj_weight`` whose row thirds are
  q, k and v, and ``mlp.c_fc``/``mlp.c_proj`` for ``fc1``/``fc2``.

Each target also says which kohya target group it belongs to: ``attn`` (layers inside
Transformer2DModel blocks and the text encoders' attention/MLP: the default LoRA targets),
``conv`` (ResNet and sampler layers: LoCon's extra targets), ``norm`` (the UNet's GroupNorm and
LayerNorm layers, which LyCORIS ``train_norm`` files change) or ``other``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from loraforge.models.naming import text_encoder_lora_name, unet_lora_name
from loraforge.models.sgm import SD_LAYOUT, SDXL_LAYOUT, UNetLayout, diffusers_unet_path
from loraforge.ops.merge_into import TargetRef

UNET_PREFIX = "model.diffusion_model."
SINGLE_FILE_TEXT = {
    "sd1": (("cond_stage_model.transformer.", "hf"),),
    "sd2": (("cond_stage_model.model.", "openclip"),),
    "sdxl": (
        ("conditioner.embedders.0.transformer.", "hf"),
        ("conditioner.embedders.1.model.", "openclip"),
    ),
}
_TE_LAYER_MODULE = re.compile(
    r"(^|\.)encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$"
)
_OPEN_CLIP = re.compile(
    r"^transformer\.resblocks\.(\d+)\.(attn\.in_proj_weight|attn\.out_proj\.weight|mlp\.c_fc\.weight|mlp\.c_proj\.weight)$"
)
_OPEN_CLIP_NAMES = {
    "attn.out_proj.weight": "self_attn_out_proj",
    "mlp.c_fc.weight": "mlp_fc1",
    "mlp.c_proj.weight": "mlp_fc2",
}


@dataclass(frozen=True)
class Target:
    """A LoRA module's place in a state dict and its kohya target group (attn, conv, other)."""

    ref: TargetRef
    group: str
    component: str


def _unet_group(diffusers_path: str) -> str:
    if ".attentions." in diffusers_path:
        return "attn"
    if any(part in diffusers_path for part in (".resnets.", ".downsamplers.", ".upsamplers.")):
        return "conv"
    return "other"


def _family_for_naming(family: str) -> str:
    return "sdxl" if family == "sdxl" else "sd1" if family == "sd1" else "sd2"


def unet_targets(
    family: str,
    state: Mapping[str, torch.Tensor],
    unet_config: Mapping | None,
    *,
    prefix: str = "",
    sgm: bool = False,
) -> dict[str, Target]:
    """Targets of a UNet's matrix/conv weights and of its norm layers (1-D weights).

    Args:
        family: ``sd1``, ``sd2`` or ``sdxl``.
        state: the state dict holding the UNet (other keys are ignored).
        unet_config: the UNet's diffusers config, for the SGM numbering (default: the family's
            published layout).
        prefix: the UNet's key prefix (``model.diffusion_model.`` in single files).
        sgm: the keys use SGM paths (single files) rather than diffusers paths.
    """
    if unet_config is not None:
        layout = UNetLayout.from_config(unet_config)
    else:
        layout = SDXL_LAYOUT if family == "sdxl" else SD_LAYOUT
    naming_family = _family_for_naming(family)
    config = dict(unet_config) if (unet_config is not None and family == "sdxl") else None
    table: dict[str, Target] = {}
    for key, value in state.items():
        if not (key.startswith(prefix) and key.endswith(".weight") and value.dim() in (1, 2, 4)):
            continue
        path = key[len(prefix) : -len(".weight")]
        try:
            diffusers_path = diffusers_unet_path(path, layout) if sgm else path
            name = unet_lora_name(naming_family, diffusers_path, unet_config=config)
        except ValueError:
            continue  # modules outside the SGM blocks that have no kohya name
        group = "norm" if value.dim() == 1 else _unet_group(diffusers_path)
        table[name] = Target(TargetRef(key), group, "unet")
    return table


def clip_targets(
    family: str,
    index: int,
    state: Mapping[str, torch.Tensor],
    *,
    prefix: str = "",
    component: str = "text_encoder",
) -> dict[str, Target]:
    """Targets of a transformers-layout CLIP text encoder (attention and MLP projections)."""
    table: dict[str, Target] = {}
    naming_family = _family_for_naming(family)
    for key in state:
        if not (key.startswith(prefix) and key.endswith(".weight")):
            continue
        path = key[len(prefix) : -len(".weight")]
        if _TE_LAYER_MODULE.search(path):
            name = text_encoder_lora_name(naming_family, index, path)
            table[name] = Target(TargetRef(key), "attn", component)
    return table


def open_clip_targets(
    family: str, index: int, state: Mapping[str, torch.Tensor], *, prefix: str, component: str
) -> dict[str, Target]:
    """Targets of an OpenCLIP-layout text encoder (fused q/k/v rows of ``in_proj_weight``)."""
    table: dict[str, Target] = {}
    lead = text_encoder_lora_name(_family_for_naming(family), index, "text_model.encoder.layers")
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        match = _OPEN_CLIP.match(key[len(prefix) :])
        if not match:
            continue
        layer, what = match[1], match[2]
        if what == "attn.in_proj_weight":
            third = value.shape[0] // 3
            for i, proj in enumerate(("q", "k", "v")):
                ref = TargetRef(key, (i * third, (i + 1) * third))
                table[f"{lead}_{layer}_self_attn_{proj}_proj"] = Target(ref, "attn", component)
        else:
            table[f"{lead}_{layer}_{_OPEN_CLIP_NAMES[what]}"] = Target(
                TargetRef(key), "attn", component
            )
    return table


def diffusers_targets(
    family: str, states: Mapping[str, Mapping[str, torch.Tensor]], unet_config: Mapping
) -> dict[str, Target]:
    """Targets of a diffusers folder's components; keys are ``"<component>/<key>"``.

    Args:
        states: ``unet``, ``text_encoder`` and (SDXL) ``text_encoder_2`` state dicts.
        unet_config: the UNet's ``config.json``.
    """
    table = _with_component(unet_targets(family, states["unet"], unet_config), "unet")
    for index, name in enumerate(("text_encoder", "text_encoder_2")):
        if name in states:
            table.update(_with_component(clip_targets(family, index, states[name]), name))
    return table


def _with_component(table: dict[str, Target], component: str) -> dict[str, Target]:
    return {
        n: Target(TargetRef(f"{component}/{t.ref.key}", t.ref.rows), t.group, component)
        for n, t in table.items()
    }


def flatten_components(states: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One state dict with ``"<component>/<key>"`` keys (see :func:`diffusers_targets`)."""
    return {f"{c}/{k}": v for c, state in states.items() for k, v in state.items()}


def split_components(flat: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The inverse of :func:`flatten_components`."""
    states: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        component, _, inner = key.partition("/")
        states.setdefault(component, {})[inner] = value
    return states


def single_file_targets(
    family: str, state: Mapping[str, torch.Tensor], unet_config: Mapping | None
) -> dict[str, Target]:
    """Targets of an original-layout (LDM/SGM) single-file checkpoint."""
    table = unet_targets(family, state, unet_config, prefix=UNET_PREFIX, sgm=True)
    for index, (prefix, kind) in enumerate(SINGLE_FILE_TEXT[family]):
        component = "text_encoder" if index == 0 else "text_encoder_2"
        if kind == "hf":
            found = clip_targets(family, index, state, prefix=prefix, component=component)
        else:
            found = open_clip_targets(family, index, state, prefix=prefix, component=component)
        table.update(found)
    return table


def default_targets(table: Mapping[str, Target], *, conv: bool) -> list[str]:
    """The names kohya's LoRA (``conv=False``) or LoCon (``conv=True``) trains, in table order."""
    groups = ("attn", "conv") if conv else ("attn",)
    return [name for name, target in table.items() if target.group in groups]


def weight_of(state: Mapping[str, torch.Tensor], target: Target) -> torch.Tensor:
    """The (possibly row-sliced) weight a target points at."""
    weight = state[target.ref.key]
    rows = target.ref.rows
    return weight if rows is None else weight[rows[0] : rows[1]]
