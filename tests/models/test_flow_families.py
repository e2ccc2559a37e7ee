"""Detection of the flow-matching families (sd3, flux) and their sd-scripts metadata values."""

from __future__ import annotations

import pytest

from loraforge.errors import ModelError
from loraforge.models.families import (
    FAMILIES,
    detect_family_from_configs,
    detect_family_from_keys,
    family_spec,
    flow_base_model_version,
    flow_modelspec_architecture,
    resolve_family,
)


def _keys(*names: str) -> dict[str, None]:
    return dict.fromkeys(names)


@pytest.mark.parametrize(
    ("keys", "family", "variant"),
    [
        # BFL layout, as the flux1-dev.safetensors / flux1-schnell.safetensors files
        (
            _keys("double_blocks.0.img_attn.qkv.weight", "guidance_in.in_layer.weight"),
            "flux",
            "dev",
        ),
        (_keys("double_blocks.0.img_attn.qkv.weight", "img_in.weight"), "flux", "schnell"),
        # a full ComfyUI-style checkpoint prefixes the transformer
        (
            _keys(
                "model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
                "model.diffusion_model.guidance_in.in_layer.weight",
            ),
            "flux",
            "dev",
        ),
        # diffusers layout transformer file
        (
            _keys(
                "single_transformer_blocks.0.attn.to_k.weight",
                "time_text_embed.guidance_embedder.linear_1.weight",
            ),
            "flux",
            "dev",
        ),
        # SAI MMDiT: SD3 medium (no qk norm), SD3.5 large (qk norm), SD3.5 medium (x_block attn2)
        (
            _keys("model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight"),
            "sd3",
            "medium",
        ),
        (
            _keys(
                "model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight",
                "model.diffusion_model.joint_blocks.0.context_block.attn.ln_k.weight",
            ),
            "sd3",
            "5-large",
        ),
        (
            _keys(
                "joint_blocks.0.context_block.attn.qkv.weight",
                "joint_blocks.0.context_block.attn.ln_k.weight",
                "joint_blocks.3.x_block.attn2.qkv.weight",
            ),
            "sd3",
            "5-medium",
        ),
        (
            _keys(
                "transformer_blocks.0.attn.add_k_proj.weight",
                "pos_embed.proj.weight",
                "transformer_blocks.0.attn.norm_q.weight",
            ),
            "sd3",
            "5-large",
        ),
    ],
)
def test_flow_families_detected_from_keys(keys: dict, family: str, variant: str) -> None:
    detection = detect_family_from_keys(keys)
    assert (detection.family, detection.variant) == (family, variant)
    assert resolve_family("auto", detection, source="x") == family
    assert resolve_family(family, detection, source="x") == family


def test_flow_families_detected_from_diffusers_configs() -> None:
    flux = detect_family_from_configs(
        {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]},
        {"_class_name": "FluxTransformer2DModel", "guidance_embeds": False},
        None,
    )
    assert (flux.family, flux.variant) == ("flux", "schnell")
    sd35m = detect_family_from_configs(
        {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "x"]},
        {
            "_class_name": "SD3Transformer2DModel",
            "qk_norm": "rms_norm",
            "dual_attention_layers": [0, 1],
        },
        None,
    )
    assert (sd35m.family, sd35m.variant) == ("sd3", "5-medium")
    with pytest.raises(ModelError, match="unsupported transformer"):
        detect_family_from_configs(
            {"transformer": []}, {"_class_name": "PixArtTransformer2DModel"}, None
        )


def test_a_flux_file_is_not_an_sd3_recipe() -> None:
    detection = detect_family_from_keys(_keys("double_blocks.0.img_attn.qkv.weight"))
    with pytest.raises(ModelError, match=r"model\.family sd3"):
        resolve_family("sd3", detection, source="flux1-dev.safetensors")


def test_sd_scripts_metadata_values() -> None:
    # sd-scripts: flux_utils.MODEL_VERSION_FLUX_V1; sd3 writes its MMDiT model_type;
    # sai_model_spec ARCH_FLUX_1_DEV / ARCH_SD3_M + "-" + model_type
    assert flow_base_model_version("flux", "schnell") == "flux1"
    assert flow_base_model_version("sd3", "5-large") == "5-large"
    assert flow_modelspec_architecture("flux", "dev") == "flux-1-dev"
    assert flow_modelspec_architecture("flux", "schnell") == "flux-1-schnell"
    assert flow_modelspec_architecture("sd3", "medium") == "stable-diffusion-3-medium"
    assert flow_modelspec_architecture("sd3", "5-medium") == "stable-diffusion-3-5-medium"
    assert {"sd3", "flux"} <= set(FAMILIES)
    assert family_spec("flux").num_text_encoders == 2 and family_spec("sd3").num_text_encoders == 3
    assert family_spec("flux").flow_matching and family_spec("flux").latent_channels == 16
