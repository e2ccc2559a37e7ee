"""Pretrained weights of the demo's tiny SD1 model (``demo-sd1.safetensors``, fp16).

``scripts/pretrain_demo_model.py`` makes the file, reproducibly: the tiny SD1 architecture of
:mod:`loraforge.models.tiny` trained on drawn shapes (coloured circles, squares and triangles on
white, black or grey backgrounds), so the demo starts from a model that draws and the demo LoRA
visibly teaches it a new shape. Keys are ``<component>.<parameter>`` (``unet.``, ``vae.``,
``text_encoder.``); the header's :data:`METADATA_KEY` entry holds the VAE's scaling factor and
the settings the script ran with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DEMO_WEIGHTS = Path(__file__).resolve().parent / "demo-sd1.safetensors"
METADATA_KEY = "loraforge_demo_model"


def demo_weights_info(path: Path = DEMO_WEIGHTS) -> dict[str, Any]:
    """The JSON the pretraining script stored in the weights file's header."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        return json.loads((file.metadata() or {})[METADATA_KEY])


def load_demo_weights(components: dict[str, Any], path: Path = DEMO_WEIGHTS) -> None:
    """Load the pretrained weights into the tiny SD1 ``components`` (in place, as fp32).

    Also sets the VAE's ``scaling_factor`` to the one the weights were trained with, and
    replaces ``components["vae"]`` by one with the weights' GroupNorm group count when the
    header names another (``vae_config``).

    Raises:
        FileNotFoundError: the weights file is missing (a broken install).
        RuntimeError: the file does not fit the components (keys or shapes differ).
    """
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    info = demo_weights_info(path)
    groups = info.get("vae_config", {}).get("norm_num_groups")
    if groups is not None and groups != components["vae"].config.norm_num_groups:
        components["vae"] = _regrouped_vae(components["vae"], groups)
    for name, module in components.items():
        prefix = f"{name}."
        state = {k[len(prefix) :]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
        missing, unexpected = module.load_state_dict(state, strict=False)
        floats = {k for k, v in module.state_dict().items() if v.is_floating_point()}
        if unexpected or set(missing) & floats:
            raise RuntimeError(
                f"{path.name} does not fit the tiny model's {name}: "
                f"missing {sorted(set(missing) & floats)[:3]}, unexpected {unexpected[:3]}"
            )
    components["vae"].register_to_config(scaling_factor=info["vae_scaling_factor"])


def _regrouped_vae(vae: Any, groups: int) -> Any:
    """``vae``'s architecture with ``groups`` GroupNorm groups (same weight shapes)."""
    from diffusers import AutoencoderKL

    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    return AutoencoderKL.from_config({**config, "norm_num_groups": groups}).eval()
