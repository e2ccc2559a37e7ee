"""Model families (sd1, sd2, sd2-v, sdxl): what each one is, and telling them apart.

Detection reads a diffusers folder's configs or a single-file checkpoint's keys. A checkpoint's
keys tell SD1 from SD2 from SDXL but not, in general, epsilon from v-prediction; for SD 2.x files
the recipe's ``sd2``/``sd2-v`` is trusted then (as sd-scripts trusts ``--v_parameterization``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from loraforge.errors import ModelError
from loraforge.models.configs import architecture_config_dir

__all__ = [
    "FAMILIES",
    "Detection",
    "FamilySpec",
    "architecture_config_dir",
    "detect_family_from_configs",
    "detect_family_from_keys",
    "family_spec",
    "resolve_family",
]

FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl")


@dataclass(frozen=True)
class FamilySpec:
    """Facts about one family.

    Args:
        name: ``sd1`` | ``sd2`` | ``sd2-v`` | ``sdxl``.
        v_prediction: trained to predict v rather than noise.
        num_text_encoders: 1, or 2 for SDXL.
        resolution: native training resolution (pixels, square).
        base_model_version: sd-scripts' ``ss_base_model_version`` value.
    """

    name: str
    v_prediction: bool
    num_text_encoders: int
    resolution: int
    base_model_version: str


_SPECS = {
    "sd1": FamilySpec("sd1", False, 1, 512, "sd_v1"),
    "sd2": FamilySpec("sd2", False, 1, 512, "sd_v2"),
    "sd2-v": FamilySpec("sd2-v", True, 1, 768, "sd_v2"),
    "sdxl": FamilySpec("sdxl", False, 2, 1024, "sdxl_base_v1-0"),
}


def family_spec(family: str) -> FamilySpec:
    """The :class:`FamilySpec` of ``family``.

    Raises:
        ValueError: for an unknown family.
    """
    try:
        return _SPECS[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}") from None


@dataclass(frozen=True)
class Detection:
    """What a model turned out to be.

    Args:
        family: the detected family.
        prediction_known: whether epsilon vs v-prediction was actually read from the model
            (``False`` for most single files: then ``sd2`` may still be a v-prediction model).
        evidence: a short phrase saying what the detection is based on, for error messages.
    """

    family: str
    prediction_known: bool
    evidence: str


def detect_family_from_configs(
    model_index: Mapping[str, Any],
    unet_config: Mapping[str, Any],
    scheduler_config: Mapping[str, Any] | None,
) -> Detection:
    """Detect the family of a diffusers model from its ``model_index.json`` and configs.

    SDXL has a second text encoder (or a ``text_time`` added embedding); SD 2.x uses linear
    projections in its transformers / 1024-wide cross-attention, SD 1.x neither;
    v-prediction comes from the scheduler's ``prediction_type``.
    """
    if "text_encoder_2" in model_index or unet_config.get("addition_embed_type") == "text_time":
        if "text_encoder" not in model_index and "text_encoder_2" in model_index:
            raise ModelError(
                "this looks like an SDXL refiner (only text_encoder_2); refiners are not supported",
                hint="use an SDXL base model",
            )
        return Detection("sdxl", True, "two text encoders")
    cross = unet_config.get("cross_attention_dim")
    if cross == 1024 or unet_config.get("use_linear_projection"):
        prediction = (scheduler_config or {}).get("prediction_type", "epsilon")
        family = "sd2-v" if prediction == "v_prediction" else "sd2"
        return Detection(family, True, f"SD 2.x UNet, scheduler prediction_type {prediction}")
    return Detection("sd1", True, f"SD 1.x UNet (cross-attention {cross})")


# keys that only one family's single-file checkpoints have
_SDXL_KEY = "conditioner.embedders.1.model.positional_embedding"
_SDXL_REFINER_KEY = "conditioner.embedders.0.model.text_projection"
_SD2_KEY = "cond_stage_model.model.token_embedding.weight"
_SD1_KEY = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
_ATTN2_K = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def detect_family_from_keys(state: Mapping[str, Any], *, source: str = "checkpoint") -> Detection:
    """Detect the family of an original-layout checkpoint from its keys (and one shape).

    A ``v_pred`` key (ComfyUI's marker) says v-prediction; otherwise SD 2.x files are reported as
    ``sd2`` with ``prediction_known=False``.

    Raises:
        ModelError: for an SDXL refiner or a file that is not a SD/SDXL checkpoint.
    """
    v_marked = "v_pred" in state
    if _SDXL_KEY in state:
        return Detection("sdxl", True, "SDXL text encoders (conditioner.embedders.1)")
    if _SDXL_REFINER_KEY in state:
        raise ModelError(f"{source} is an SDXL refiner; refiners are not supported")
    if _SD2_KEY in state:
        family = "sd2-v" if v_marked else "sd2"
        return Detection(family, v_marked, "OpenCLIP text encoder (SD 2.x)")
    if _SD1_KEY in state:
        return Detection("sd1", True, "CLIP ViT-L text encoder (SD 1.x)")
    if _ATTN2_K in state:  # UNet-only file: the cross-attention width tells
        width = int(state[_ATTN2_K].shape[1])
        if width == 768:
            return Detection("sd1", True, "UNet cross-attention width 768")
        if width == 1024:
            return Detection("sd2-v" if v_marked else "sd2", v_marked, "UNet cross-attention 1024")
    if any(k.startswith("model.diffusion_model.label_emb.") for k in state):
        return Detection("sdxl", True, "SDXL UNet (label_emb)")
    raise ModelError(
        f"{source} is not a Stable Diffusion 1.x/2.x/SDXL checkpoint (no known UNet or text keys)",
        hint="check model.base; LoRA files and other model types cannot be trained on",
    )


def resolve_family(requested: str, detection: Detection, *, source: str) -> str:
    """Combine the recipe's ``model.family`` with what was detected.

    Returns:
        The family to use: the detected one for ``auto``; the requested one when it agrees
        (``sd2``/``sd2-v`` agree when the model does not say which it is).

    Raises:
        ModelError: when the recipe names a different family than the model is.
    """
    if requested == "auto" or requested == detection.family:
        return detection.family
    sd2_pair = {requested, detection.family} == {"sd2", "sd2-v"}
    if sd2_pair and not detection.prediction_known:
        return requested
    if requested not in FAMILIES:
        raise ModelError(f"unknown model family {requested!r}", hint=f"use one of {FAMILIES}")
    raise ModelError(
        f"{source}: the recipe says model.family {requested} but the model is "
        f"{detection.family} ({detection.evidence})",
        hint=f"set model.family: {detection.family} (or auto), or point model.base at a "
        f"{requested} model",
    )
