"""The kohya layer names of the published FLUX.1 / SD3 architectures (for ``check LORA``).

``all``: every Linear of the transformer under sd-scripts' names (blocks, ``in_dims`` /
``emb_dims`` layers and FLUX's final layer, which ComfyUI maps too), and the text encoders'
Linear and norm layers (CLIP-L ``lora_te1_``, SD3's CLIP-G ``lora_te2_``, T5-XXL ``lora_te3_``).
``attn``/``conv``: sd-scripts' default targets (transformer blocks and the CLIP encoders).
SD3 is the union of SD3 Medium, SD3.5 Medium and SD3.5 Large.
"""

from __future__ import annotations

from loraforge.models.transformer_naming import (
    UNET_PREFIX,
    TransformerLoraOptions,
    text_encoder_lora_name,
    text_encoder_targets,
    transformer_targets,
)

_VARIANTS = {"flux": ("flux-dev",), "sd3": ("sd3-medium", "sd35-medium", "sd35-large")}
_FLUX_FINAL = ("final_layer_linear", "final_layer_adaLN_modulation_1")


def build_flow_name_tables(family: str) -> dict[str, frozenset[str]]:
    """``{"all", "attn", "conv"}`` name sets of ``family`` (``flux`` or ``sd3``), built on the
    meta device from the shipped configs."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from loraforge.models.configs import architecture_config_dir

    cls = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
    every: set[str] = set()
    defaults: set[str] = set()
    extra = TransformerLoraOptions(extra_dims=(1,) * (5 if family == "flux" else 6))
    for variant in _VARIANTS[family]:
        config = cls.load_config(architecture_config_dir(variant) / "transformer")
        every.update(t.name for t in transformer_targets(family, config, extra))
        defaults.update(t.name for t in transformer_targets(family, config))
    if family == "flux":
        every.update(UNET_PREFIX + n for n in _FLUX_FINAL)
    encoders = _meta_text_encoders(family, architecture_config_dir(_VARIANTS[family][-1]))
    defaults.update(text_encoder_targets(family, encoders, train_t5xxl=False))
    every.update(defaults)
    for index, encoder in enumerate(encoders):
        for path, module in encoder.named_modules():
            if type(module).__name__ in ("Linear", "LayerNorm", "T5LayerNorm"):
                every.add(text_encoder_lora_name(family, index, path))
    names = frozenset(defaults)
    return {"all": frozenset(every), "attn": names, "conv": names}


def _meta_text_encoders(family: str, folder) -> list:
    from accelerate import init_empty_weights
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    with init_empty_weights():
        if family == "flux":
            clip_l = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
            return [clip_l, T5EncoderModel(T5Config.from_pretrained(folder / "text_encoder_2"))]
        return [
            CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
            CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2")),
            T5EncoderModel(T5Config.from_pretrained(folder / "text_encoder_3")),
        ]
