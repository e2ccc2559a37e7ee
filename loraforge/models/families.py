"""Model families (sd1, sd2, sd2-v, sdxl, sd3, flux): what each one is, and telling them apart.

Detection reads a diffusers folder's configs or a single-file checkpoint's keys. A checkpoint's
keys tell SD1 from SD2 from SDXL but not, in general, epsilon from v-prediction; for SD 2.x files
the recipe's ``sd2``/``sd2-v`` is trusted then (as sd-scripts trusts ``--v_parameterization``).

The flow-matching families ``sd3`` (SD3 Medium, SD3.5 Medium / Large / Large Turbo) and ``flux``
(FLUX.1 dev / schnell) also have a *variant*, read from the transformer's keys or config the way
sd-scripts reads it (``flux_utils.analyze_checkpoint_state``, ``sd3_utils.analyze_state_dict_state``):
it decides ``ss_base_model_version`` and ``modelspec.architecture``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from loraforge.errors import ModelError
from loraforge.models.configs import architecture_config_dir

__all__ = [
    "FAMILIES",
    "FLOW_FAMILIES",
    "Detection",
    "FamilySpec",
    "architecture_config_dir",
    "detect_family_from_configs",
    "detect_family_from_keys",
    "family_spec",
    "flow_base_model_version",
    "flow_modelspec_architecture",
    "resolve_family",
]

FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl", "sd3", "flux")
#: rectified-flow transformer families (trained with flow-matching targets, not DDPM noise)
FLOW_FAMILIES = ("sd3", "flux")
#: the variants of each flow family, as sd-scripts names them; the first is the default
FLOW_VARIANTS = {"flux": ("dev", "schnell"), "sd3": ("5-large", "5-medium", "medium")}


@dataclass(frozen=True)
class FamilySpec:
    """Facts about one family.

    Args:
        name: ``sd1`` | ``sd2`` | ``sd2-v`` | ``sdxl`` | ``sd3`` | ``flux``.
        v_prediction: trained to predict v rather than noise.
        num_text_encoders: 1, 2 for SDXL (CLIP-L, CLIP-G) and FLUX (CLIP-L, T5-XXL), 3 for SD3
            (CLIP-L, CLIP-G, T5-XXL).
        resolution: native training resolution (pixels, square).
        base_model_version: sd-scripts' ``ss_base_model_version`` value (for ``sd3`` it depends
            on the variant: see :func:`flow_base_model_version`).
        flow_matching: a rectified-flow transformer (``sd3``, ``flux``).
        latent_channels: channels of the VAE latents (16 for the flow families).
    """

    name: str
    v_prediction: bool
    num_text_encoders: int
    resolution: int
    base_model_version: str
    flow_matching: bool = False
    latent_channels: int = 4


_SPECS = {
    "sd1": FamilySpec("sd1", False, 1, 512, "sd_v1"),
    "sd2": FamilySpec("sd2", False, 1, 512, "sd_v2"),
    "sd2-v": FamilySpec("sd2-v", True, 1, 768, "sd_v2"),
    "sdxl": FamilySpec("sdxl", False, 2, 1024, "sdxl_base_v1-0"),
    "sd3": FamilySpec("sd3", False, 3, 1024, "5-large", flow_matching=True, latent_channels=16),
    "flux": FamilySpec("flux", False, 2, 1024, "flux1", flow_matching=True, latent_channels=16),
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
        variant: flow families: ``dev``/``schnell`` (flux), ``medium``/``5-medium``/``5-large``
            (sd3, sd-scripts' model types); ``None`` for the UNet families.
    """

    family: str
    prediction_known: bool
    evidence: str
    variant: str | None = None


def flow_base_model_version(family: str, variant: str | None) -> str:
    """sd-scripts' ``ss_base_model_version`` of a flow family: ``flux1`` for FLUX.1 (dev and
    schnell); SD3's model type (``medium``, ``5-medium``, ``5-large``)."""
    if family == "flux":
        return "flux1"
    return variant or FLOW_VARIANTS["sd3"][0]


def flow_modelspec_architecture(family: str, variant: str | None) -> str:
    """sd-scripts' ``modelspec.architecture`` of a flow model (``/lora`` is appended for LoRAs):
    ``flux-1-dev``, ``flux-1-schnell``, ``stable-diffusion-3-medium``,
    ``stable-diffusion-3-5-large`` …"""
    if family == "flux":
        return f"flux-1-{variant}" if variant in FLOW_VARIANTS["flux"] else "flux-1"
    return f"stable-diffusion-3-{variant or FLOW_VARIANTS['sd3'][0]}"


def detect_family_from_configs(
    model_index: Mapping[str, Any],
    unet_config: Mapping[str, Any],
    scheduler_config: Mapping[str, Any] | None,
) -> Detection:
    """Detect the family of a diffusers model from its ``model_index.json`` and configs.

    SDXL has a second text encoder (or a ``text_time`` added embedding); SD 2.x uses linear
    projections in its transformers / 1024-wide cross-attention, SD 1.x neither;
    v-prediction comes from the scheduler's ``prediction_type``. A folder with a
    ``transformer`` is a flow family: see :func:`detect_transformer_family`.
    """
    if "transformer" in model_index:
        return detect_transformer_family(model_index, unet_config)
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


def detect_transformer_family(
    model_index: Mapping[str, Any], transformer_config: Mapping[str, Any]
) -> Detection:
    """The family and variant of a diffusers FLUX / SD3 folder from its transformer config.

    Raises:
        ModelError: a transformer that is neither FLUX nor SD3 (MMDiT).
    """
    cls = str(transformer_config.get("_class_name", ""))
    pipeline = str(model_index.get("_class_name", ""))
    if cls.startswith("Flux") or pipeline.startswith("Flux"):
        variant = _flux(bool(transformer_config.get("guidance_embeds")))
        return Detection("flux", True, f"{cls or pipeline} ({variant})", variant)
    if cls.startswith("SD3") or pipeline.startswith("StableDiffusion3"):
        variant = _sd3_variant_from_config(transformer_config)
        return Detection("sd3", True, f"{cls or pipeline} ({variant})", variant)
    raise ModelError(
        f"unsupported transformer model ({cls or pipeline or 'unknown class'})",
        hint="loraforge trains SD 1.x/2.x/XL UNets and the SD3 / FLUX.1 transformers",
    )


def _sd3_variant_from_config(config: Mapping[str, Any]) -> str:
    if not config.get("qk_norm"):
        return "medium"
    return "5-medium" if config.get("dual_attention_layers") else "5-large"


def _strip_prefix(keys: set[str]) -> set[str]:
    prefix = "model.diffusion_model."
    return {k.removeprefix(prefix) for k in keys}


def detect_flow_family_from_keys(state: Mapping[str, Any]) -> Detection | None:
    """FLUX (BFL or diffusers layout) or SD3 (SAI MMDiT or diffusers layout) from a transformer
    or full checkpoint's keys; ``None`` when it is neither."""
    keys = _strip_prefix(set(state))
    guided = "guidance_in.in_layer.weight" in keys or any(
        k.startswith("time_text_embed.guidance_embedder.") for k in keys
    )
    if "double_blocks.0.img_attn.qkv.weight" in keys:
        return Detection("flux", True, "FLUX.1 transformer (BFL layout)", _flux(guided))
    if any(k.startswith("single_transformer_blocks.") for k in keys):
        return Detection("flux", True, "FLUX.1 transformer (diffusers layout)", _flux(guided))
    if "joint_blocks.0.context_block.attn.qkv.weight" in keys:
        variant = _sd3_variant(
            keys, "joint_blocks.0.context_block.attn.ln_k.weight", ".x_block.attn2."
        )
        return Detection("sd3", True, "SD3 MMDiT (SAI layout)", variant)
    if "transformer_blocks.0.attn.add_k_proj.weight" in keys and "pos_embed.proj.weight" in keys:
        variant = _sd3_variant(keys, "transformer_blocks.0.attn.norm_q.weight", ".attn2.to_q.")
        return Detection("sd3", True, "SD3 transformer (diffusers layout)", variant)
    return None


def _sd3_variant(keys: Collection[str], qk_norm_key: str, dual_attention: str) -> str:
    """SD3 Medium has no q/k norms; SD3.5 Medium has a second attention (MMDiT-X) in its first
    blocks; SD3.5 Large has neither."""
    if qk_norm_key not in keys:
        return "medium"
    return "5-medium" if any(dual_attention in k for k in keys) else "5-large"


def _flux(guided: bool) -> str:
    return "dev" if guided else "schnell"


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
    flow = detect_flow_family_from_keys(state)
    if flow is not None:
        return flow
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
        f"{source} is not a Stable Diffusion 1.x/2.x/XL/3 or FLUX.1 checkpoint "
        "(no known UNet, transformer or text keys)",
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
