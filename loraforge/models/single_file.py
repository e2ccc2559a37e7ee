"""Single-file (A1111/LDM/SGM layout) checkpoints: reading them safely and writing them.

Reading goes through diffusers' single-file converters with configs from this package (or, for
files loraforge wrote, from the file's own metadata), so nothing is fetched from the network.
Writing converts diffusers state dicts to the original key layout; the tiny models use it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge.errors import ModelError
from loraforge.models.families import Detection, detect_family_from_keys
from loraforge.models.naming import canonical_clip_path
from loraforge.models.pickles import PICKLE_SUFFIXES
from loraforge.models.sgm import UNetLayout, sgm_unet_path

if TYPE_CHECKING:
    import torch

# safetensors metadata key under which loraforge-written checkpoints carry their diffusers configs
EMBEDDED_CONFIG_KEY = "loraforge_diffusers_configs"

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")


# OpenCLIP's initial logit scale, log(1 / 0.07); written for fidelity, unused by diffusers
_OPEN_CLIP_LOGIT_SCALE = 4.605170249938965


def read_checkpoint(
    path: Path, *, allow_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a checkpoint's tensors (CPU) and its safetensors metadata.

    Args:
        path: a ``.safetensors`` file, or a pickled ``.ckpt``/``.pt``/``.pth``/``.bin`` file.
        allow_pickle: allow pickled files (loaded with ``torch.load(weights_only=True)``).

    Raises:
        ModelError: the file is missing or unreadable, or pickled without ``allow_pickle``.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}", hint="check model.base in the recipe")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(path)
    if suffix not in PICKLE_SUFFIXES:
        raise ModelError(
            f"{path}: unknown checkpoint format {suffix!r}",
            hint="use a .safetensors file or a diffusers folder",
        )
    if not allow_pickle:
        raise ModelError(
            f"{path} is a pickle file, which can run code when loaded; refusing to load it",
            hint="convert it to .safetensors, or set model.allow_pickle: true if you trust it",
        )
    return _read_pickle(path), {}


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"{path}: not a readable safetensors file ({e})") from e
    return tensors, metadata


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    import torch

    from loraforge.models.pickles import load_weights_only

    data = load_weights_only(path, ModelError, hint="convert the checkpoint to .safetensors")
    while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelError(f"{path}: holds {type(data).__name__}, not a state dict")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def embedded_configs(metadata: Mapping[str, str]) -> dict[str, Any] | None:
    """The configs a loraforge-written checkpoint carries, or ``None`` for other files."""
    raw = metadata.get(EMBEDDED_CONFIG_KEY)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ModelError(f"checkpoint metadata {EMBEDDED_CONFIG_KEY} is not valid JSON") from e
    return data


def detect_checkpoint_family(
    state: Mapping[str, Any], embedded: Mapping[str, Any] | None, *, source: str
) -> Detection:
    """The family of an original-layout checkpoint: its keys, and for a file loraforge wrote
    (``embedded`` configs) the family it was written as, which also says epsilon or v for SD 2.x.
    """
    detection = detect_family_from_keys(state, source=source)
    written_as = embedded.get("family") if embedded is not None else None
    if written_as in ("sd2", "sd2-v") and detection.family in ("sd2", "sd2-v"):
        return Detection(written_as, True, f"{detection.evidence}, written as {written_as}")
    return detection


def materialise_config_dir(embedded: Mapping[str, Any], out_dir: Path) -> Path:
    """Write embedded configs and tokenizer files as a diffusers folder without weights."""
    configs = embedded["configs"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "model_index.json").write_text(json.dumps(configs["model_index"]), "utf-8")
    for name, config in configs.items():
        if name == "model_index":
            continue
        folder = out_dir / name
        folder.mkdir(exist_ok=True)
        file_name = "scheduler_config.json" if name == "scheduler" else "config.json"
        (folder / file_name).write_text(json.dumps(config), "utf-8")
    for name, files in embedded.get("tokenizers", {}).items():
        folder = out_dir / name
        folder.mkdir(exist_ok=True)
        for file_name, text in files.items():
            (folder / Path(file_name).name).write_text(text, "utf-8")
    return out_dir


# --- writing the original layout ---------------------------------------------------------


def diffusers_to_ldm_state_dict(
    family: str, components: Mapping[str, Any], *, unet_config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """Convert diffusers components to one original-layout state dict.

    Args:
        family: ``sd1``, ``sd2``, ``sd2-v`` or ``sdxl``.
        components: ``unet``, ``vae``, ``text_encoder`` and (SDXL) ``text_encoder_2`` modules.
        unet_config: the UNet's diffusers config (for the SGM block numbering).
    """
    layout = UNetLayout.from_config(unet_config)
    state: dict[str, torch.Tensor] = {}
    for key, value in components["unet"].state_dict().items():
        path, param = key.rsplit(".", 1)
        state[f"{UNET_PREFIX}{sgm_unet_path(path, layout)}.{param}"] = value
    levels = len(components["vae"].config.block_out_channels)
    for key, value in components["vae"].state_dict().items():
        ldm_key, ldm_value = _vae_ldm_item(key, value, levels)
        state[VAE_PREFIX + ldm_key] = ldm_value
    te_state = components["text_encoder"].state_dict()
    if family == "sdxl":
        state.update(_hf_clip_items(te_state, SDXL_TEXT_PREFIXES[0]))
        state.update(
            _open_clip_items(components["text_encoder_2"].state_dict(), SDXL_TEXT_PREFIXES[1])
        )
    elif family in ("sd2", "sd2-v"):
        state.update(_open_clip_items(te_state, SD2_TEXT_PREFIX))
    else:
        state.update(_hf_clip_items(te_state, SD1_TEXT_PREFIX))
    return state


_VAE_RESNET = re.compile(r"^(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$")
_VAE_SAMPLER = re.compile(
    r"^(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(downsamplers|upsamplers)\.0\.(.*)$"
)
_VAE_MID = re.compile(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)$")
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_ldm_item(key: str, value: torch.Tensor, levels: int) -> tuple[str, torch.Tensor]:
    """One diffusers VAE parameter as its LDM key (and LDM shape)."""
    if m := _VAE_RESNET.match(key):
        part, kind, level, j, rest = m[1], m[2], int(m[3]), m[4], m[5]
        level = (
            level if kind == "down" else levels - 1 - level
        )  # LDM numbers decoder levels upwards
        rest = rest.replace("conv_shortcut", "nin_shortcut")
        return f"{part}.{kind}.{level}.block.{j}.{rest}", value
    if m := _VAE_SAMPLER.match(key):
        part, kind, level, rest = m[1], m[2], int(m[3]), m[5]
        level = level if kind == "down" else levels - 1 - level
        name = "downsample" if kind == "down" else "upsample"
        return f"{part}.{kind}.{level}.{name}.{rest}", value
    if m := _VAE_MID.match(key):
        part, kind, index, rest = m[1], m[2], int(m[3]), m[4]
        if kind == "resnets":
            rest = rest.replace("conv_shortcut", "nin_shortcut")
            return f"{part}.mid.block_{index + 1}.{rest}", value
        module, param = rest.rsplit(".", 1)
        if value.ndim == 2:  # LDM's attention projections are 1x1 convolutions
            value = value[:, :, None, None]
        return f"{part}.mid.attn_1.{_VAE_ATTN[module]}.{param}", value
    return key.replace("conv_norm_out", "norm_out"), value


def _hf_clip_items(te_state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {
        prefix + canonical_clip_path(key): value
        for key, value in te_state.items()
        if not key.endswith("position_ids")
    }


_CLIP_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.*)$")
_OPEN_CLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPEN_CLIP_LAYER = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
    "self_attn.out_proj.": "attn.out_proj.",
}


def _open_clip_items(te_state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model's state dict in OpenCLIP layout (fused q/k/v)."""
    import torch

    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in te_state.items():
        key = canonical_clip_path(key)
        if key.endswith("position_ids"):
            continue
        if key in _OPEN_CLIP_TOP:
            out[prefix + _OPEN_CLIP_TOP[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif m := _CLIP_LAYER.match(key):
            layer, rest = m[1], m[2]
            if rest.startswith("self_attn.") and rest.split(".")[1] in (
                "q_proj",
                "k_proj",
                "v_proj",
            ):
                proj, param = rest.split(".")[1:]
                qkv.setdefault((layer, param), {})[proj] = value
                continue
            for old, new in _OPEN_CLIP_LAYER.items():
                if rest.startswith(old):
                    rest = new + rest[len(old) :]
                    break
            out[f"{prefix}transformer.resblocks.{layer}.{rest}"] = value
        else:
            raise ValueError(f"unexpected CLIP text-model key {key!r}")
    for (layer, param), parts in qkv.items():
        fused = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{param}"] = fused
    out[prefix + "logit_scale"] = torch.tensor(_OPEN_CLIP_LOGIT_SCALE)
    return out
