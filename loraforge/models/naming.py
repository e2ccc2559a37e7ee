"""kohya LoRA module names, exactly as kohya-ss/sd-scripts (networks/lora.py) writes them.

* SD 1.x/2.x UNet: ``lora_unet_`` + the diffusers module path with ``.`` -> ``_``.
* SDXL UNet: ``lora_unet_`` + the SGM path (sd-scripts trains its own SGM-layout SDXL UNet), e.g.
  ``down_blocks.1.attentions.0`` -> ``lora_unet_input_blocks_4_1_…``.
* Text encoders: ``lora_te_`` (SD1/2) or ``lora_te1_`` / ``lora_te2_`` (SDXL) + the canonical CLIP
  path ``text_model_encoder_layers_N_…``. transformers >= 5 flattened ``CLIPTextModel`` (its module
  paths start with ``encoder.``) while ``CLIPTextModelWithProjection`` keeps ``text_model.``; both
  spellings map to the same canonical name, and the inverse maps back to whatever the model uses.

Everything except :func:`lora_targets` is pure string logic (no torch import).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from loraforge.models.sgm import SDXL_LAYOUT, UNetLayout, sgm_unet_path

if TYPE_CHECKING:
    import torch

# the UNet families; SD3 / FLUX names live in models/transformer_naming.py
UNET_FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl")

UNET_PREFIX = "lora_unet_"

# sd-scripts: LoRANetwork.UNET_TARGET_REPLACE_MODULE and friends (matched by class name)
UNET_TARGET_CLASSES = ("Transformer2DModel",)
UNET_CONV_TARGET_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_TARGET_CLASSES = (
    "CLIPAttention",
    "CLIPSdpaAttention",
    "CLIPFlashAttention2",
    "CLIPMLP",
)

# top-level children of a flattened (transformers >= 5) CLIPTextModel that live under `text_model`
_CLIP_TEXT_MODEL_CHILDREN = ("embeddings", "encoder", "final_layer_norm")

# sd-scripts' block counts (LoRANetwork.NUM_OF_BLOCKS, SDXL_NUM_OF_BLOCKS)
SD_NUM_BLOCKS = 12
SDXL_NUM_BLOCKS = 9
_RE_UPDOWN = re.compile(
    r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_"
)


def _check_family(family: str) -> None:
    if family not in UNET_FAMILIES:
        raise ValueError(
            f"unknown model family {family!r}; expected one of {', '.join(UNET_FAMILIES)}"
        )


def is_sdxl(family: str) -> bool:
    """Whether ``family`` uses the SDXL layout (two text encoders, SGM UNet names)."""
    _check_family(family)
    return family == "sdxl"


def num_blocks(family: str) -> int:
    """How many entries kohya's ``block_dims`` / ``block_alphas`` have: 25 (SD1/2) or 23 (SDXL)."""
    return 1 + 2 * SDXL_NUM_BLOCKS + 3 + 1 if is_sdxl(family) else 2 * SD_NUM_BLOCKS + 1


def text_encoder_prefix(family: str, encoder_index: int) -> str:
    """``lora_te_`` for SD1/2 (index 0), ``lora_te1_`` / ``lora_te2_`` for SDXL (index 0 / 1).

    Raises:
        ValueError: for an index the family does not have.
    """
    count = 2 if is_sdxl(family) else 1
    if not 0 <= encoder_index < count:
        raise ValueError(f"{family} has {count} text encoder(s); got encoder_index={encoder_index}")
    return f"lora_te{encoder_index + 1}_" if count == 2 else "lora_te_"


def _unet_layout(unet_config: Mapping[str, Any] | None) -> UNetLayout:
    return SDXL_LAYOUT if unet_config is None else UNetLayout.from_config(unet_config)


def unet_lora_name(
    family: str, module_path: str, *, unet_config: Mapping[str, Any] | None = None
) -> str:
    """kohya LoRA name of a UNet module given by its diffusers path.

    Args:
        family: ``sd1`` | ``sd2`` | ``sd2-v`` | ``sdxl``.
        module_path: diffusers module path, e.g. ``down_blocks.0.attentions.0.proj_in``.
        unet_config: the UNet's diffusers config; SDXL only, for SGM numbering of a UNet whose
            layout differs from SDXL base (default: SDXL base, as sd-scripts assumes).

    Raises:
        ValueError: for an unknown family, or (SDXL) a path with no SGM name.
    """
    if is_sdxl(family):
        module_path = sgm_unet_path(module_path, _unet_layout(unet_config))
    return UNET_PREFIX + module_path.replace(".", "_")


def canonical_clip_path(module_path: str) -> str:
    """The text-encoder module path as older transformers spelled it (with ``text_model.``)."""
    if module_path.startswith("text_model.") or module_path == "text_model":
        return module_path
    head = module_path.split(".", 1)[0]
    if head in _CLIP_TEXT_MODEL_CHILDREN:
        return "text_model." + module_path
    return module_path  # e.g. text_projection, outside text_model in every version


def text_encoder_lora_name(family: str, encoder_index: int, module_path: str) -> str:
    """kohya LoRA name of a text-encoder module, whatever transformers calls it.

    ``encoder.layers.0.self_attn.q_proj`` and ``text_model.encoder.layers.0.self_attn.q_proj`` both
    give ``lora_te_text_model_encoder_layers_0_self_attn_q_proj`` (SD1/2).

    Raises:
        ValueError: for an unknown family or an encoder index it does not have.
    """
    prefix = text_encoder_prefix(family, encoder_index)
    return prefix + canonical_clip_path(module_path).replace(".", "_")


def module_path_for_lora_name(
    family: str,
    lora_name: str,
    unet_module_paths: Iterable[str],
    te_module_paths_list: Sequence[Iterable[str]],
    *,
    unet_config: Mapping[str, Any] | None = None,
) -> tuple[str, int | None, str]:
    """Find the module a kohya LoRA name refers to (the inverse of the two naming functions).

    The name tables are cached per module-path list, so calling this once per key of a LoRA file
    stays fast.

    Args:
        family: the model family.
        lora_name: e.g. ``lora_unet_input_blocks_4_1_proj_in`` (no ``.lora_down.weight`` suffix).
        unet_module_paths: the UNet's module paths (``name for name, _ in unet.named_modules()``).
        te_module_paths_list: one iterable of module paths per text encoder.
        unet_config: as in :func:`unet_lora_name`.

    Returns:
        ``("unet", None, path)`` or ``("text_encoder", index, path)`` with the path as the given
        model spells it.

    Raises:
        KeyError: when no module has that name (the message names the LoRA name).
    """
    if lora_name.startswith(UNET_PREFIX):
        table = _unet_table(family, tuple(unet_module_paths), _unet_layout(unet_config))
        if lora_name in table:
            return "unet", None, table[lora_name]
    else:
        for index, paths in enumerate(te_module_paths_list):
            if lora_name.startswith(text_encoder_prefix(family, index)):
                table = _text_encoder_table(family, index, tuple(paths))
                if lora_name in table:
                    return "text_encoder", index, table[lora_name]
    raise KeyError(f"no module of the {family} model is named {lora_name!r}")


@lru_cache(maxsize=8)
def _unet_table(family: str, paths: tuple[str, ...], layout: UNetLayout) -> dict[str, str]:
    table: dict[str, str] = {}
    for path in paths:
        if not path:
            continue
        try:
            named = sgm_unet_path(path, layout) if is_sdxl(family) else path
        except ValueError:
            continue  # containers such as `down_blocks.0` have no SGM name
        table.setdefault(UNET_PREFIX + named.replace(".", "_"), path)
    return table


@lru_cache(maxsize=8)
def _text_encoder_table(family: str, index: int, paths: tuple[str, ...]) -> dict[str, str]:
    return {text_encoder_lora_name(family, index, p): p for p in paths if p}


def block_index(family: str, lora_name: str) -> int | None:
    """kohya's block index of a UNet LoRA name (sd-scripts ``get_block_index``), ``None`` if none.

    SD1/2: 0 (unused) and IN01–IN11 = 1–11, MID = 12, OUT00–OUT11 = 13–24 (25 entries).
    SDXL: 0 time/label embedding, 1–9 ``input_blocks_0…8``, 10–12 ``middle_block_0…2``,
    13–21 ``output_blocks_0…8``, 22 ``out`` (23 entries).
    Text-encoder names and names outside the blocks (e.g. SD1 ``conv_in``) give ``None``.
    """
    if not is_sdxl(family):
        if not lora_name.startswith(UNET_PREFIX):
            return None
        m = _RE_UPDOWN.search(lora_name)
        if m:
            level, kind, j = int(m[2]), m[3], int(m[4])
            idx = 3 * level + (2 if kind in ("upsamplers", "downsamplers") else j)
            return 1 + idx if m[1] == "down" else SD_NUM_BLOCKS + 1 + idx
        return SD_NUM_BLOCKS if "mid_block_" in lora_name else None
    if not lora_name.startswith(UNET_PREFIX):
        return None
    name = lora_name[len(UNET_PREFIX) :]
    if name.startswith(("time_embed_", "label_emb_")):
        return 0
    for head, base in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
        if name.startswith(head):
            return base + int(name.split("_")[2])
    return 22 if name.startswith("out_") else None


def lora_targets(
    family: str,
    unet: torch.nn.Module | None,
    text_encoders: Sequence[torch.nn.Module],
    *,
    conv: bool,
    unet_config: Mapping[str, Any] | None = None,
) -> dict[str, torch.nn.Module]:
    """The modules kohya's LoRA wraps, keyed by kohya name (UNet first, then text encoders).

    Default targets: every ``Linear`` and ``Conv2d`` inside the UNet's ``Transformer2DModel``
    blocks (attention, feed-forward, 1x1 ``proj_in``/``proj_out``) and inside the text encoders'
    ``CLIPAttention`` / ``CLIPMLP``. With ``conv=True`` (LoCon, sd-scripts' ``conv_dim``) also every
    ``Linear``/``Conv2d`` of ``ResnetBlock2D``, ``Downsample2D`` and ``Upsample2D``: the 3x3 convs
    take the conv rank, ``time_emb_proj`` and 1x1 ``conv_shortcut`` the linear rank, as in
    sd-scripts (check ``module.kernel_size`` to tell them apart).

    Args:
        family: the model family.
        unet: the diffusers UNet, or ``None`` to skip it.
        text_encoders: the family's text encoders in order (may be empty to skip them).
        conv: also target the ResNet/sampler convolutions.
        unet_config: as in :func:`unet_lora_name` (default: ``unet.config`` when it has one).

    Raises:
        ValueError: when two modules would get the same name (a naming bug, never silent).
    """

    targets: dict[str, torch.nn.Module] = {}
    if unet is not None:
        classes = UNET_TARGET_CLASSES + (UNET_CONV_TARGET_CLASSES if conv else ())
        if unet_config is None and is_sdxl(family):
            unet_config = dict(getattr(unet, "config", {}) or {}) or None
        for path, module in _layers_in(unet, classes):
            _add(targets, unet_lora_name(family, path, unet_config=unet_config), module, path)
    for index, encoder in enumerate(text_encoders):
        for path, module in _layers_in(encoder, TEXT_ENCODER_TARGET_CLASSES):
            _add(targets, text_encoder_lora_name(family, index, path), module, path)
    return targets


def _layers_in(
    root: torch.nn.Module, classes: tuple[str, ...]
) -> list[tuple[str, torch.nn.Module]]:
    """``(path, module)`` of each Linear/Conv2d below a module of a class in ``classes``."""
    import torch

    found: dict[str, torch.nn.Module] = {}
    for name, module in root.named_modules():
        if type(module).__name__ not in classes:
            continue
        for child_name, child in module.named_modules():
            if isinstance(child, torch.nn.Linear | torch.nn.Conv2d) and child_name:
                found.setdefault(f"{name}.{child_name}" if name else child_name, child)
    return list(found.items())


def _add(targets: dict[str, Any], name: str, module: Any, path: str) -> None:
    if name in targets and targets[name] is not module:
        raise ValueError(f"two modules get the kohya name {name!r} (second one: {path})")
    targets[name] = module


#: text-encoder module names without CLIPTextModel's ``text_model`` part, as a plain
#: ``named_modules()`` walk writes them under transformers >= 5 (lycoris-lora does);
#: no UI loads them.
TE_WITHOUT_TEXT_MODEL = re.compile(r"^(lora_te[12]?)_encoder_layers_")


def restore_text_model_names(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """Rename ``lora_te_encoder_layers_…`` keys to the kohya names (``lora_te_text_model_…``).

    A key whose kohya name is already in the file is left alone (the file then has both).

    Returns:
        the tensors with restored names, and the module names that were renamed (as found).
    """
    restored: dict[str, torch.Tensor] = {}
    renamed: set[str] = set()
    for key, tensor in tensors.items():
        fixed = TE_WITHOUT_TEXT_MODEL.sub(r"\1_text_model_encoder_layers_", key)
        if fixed != key and fixed not in tensors:
            renamed.add(key.split(".", 1)[0])
            key = fixed
        restored[key] = tensor
    return restored, tuple(sorted(renamed))
