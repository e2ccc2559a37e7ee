"""Built-in tiny FLUX.1- and SD3-architecture models for tests and the demo-flux/demo-sd3 presets.

Each is the published config (shipped under ``configs/flux-dev`` and ``configs/sd35-large``) with
small widths: the FLUX transformer keeps its double and single blocks, 2x2 latent packing
(``in_channels`` 64), rotary axes and guidance embedding; the SD3.5 transformer its joint blocks
and RMS qk-norm; both the 16-channel VAE with its scaling and shift factors, CLIP text encoders and
a T5 encoder with a small word-level tokenizer. Weights are random but seeded.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from loraforge.models.clip_tokenizer import tiny_clip_token_ids, tiny_vocab, write_tiny_tokenizer
from loraforge.models.configs import architecture_config_dir
from loraforge.models.quiet import no_hf_progress_bars

TINY_FLOW_FAMILIES = ("flux", "sd3")
_SOURCE = {"flux": "flux-dev", "sd3": "sd35-large"}
_T5_WIDTH = 96  # wider than CLIP-L + CLIP-G (32 + 48), which SD3 pads to the T5 width

_TINY_VAE = {
    "block_out_channels": [16, 16, 32, 32],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}
_TINY_TRANSFORMER = {
    "flux": {
        "num_layers": 1,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": _T5_WIDTH,
        "pooled_projection_dim": 32,  # CLIP-L's pooled output
        "axes_dims_rope": [4, 6, 6],  # sums to attention_head_dim
    },
    "sd3": {
        "sample_size": 16,
        "num_layers": 2,
        "attention_head_dim": 8,
        "num_attention_heads": 2,
        "joint_attention_dim": _T5_WIDTH,
        "caption_projection_dim": 16,
        "pooled_projection_dim": 32 + 48,  # CLIP-L + CLIP-G projections
        "pos_embed_max_size": 16,
    },
}
_TINY_CLIP = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 3,
    "projection_dim": 32,
}
_TINY_CLIP_G = {**_TINY_CLIP, "hidden_size": 48, "intermediate_size": 96, "projection_dim": 48}
_TINY_T5 = {
    "d_model": _T5_WIDTH,
    "d_kv": 16,
    "d_ff": 64,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "num_heads": 2,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 32,
}
T5_SPECIALS = ("<pad>", "</s>", "<unk>")
# words of the demo captions ("red lfdemo, white background") and letters, so they are not <unk>
_T5_EXTRA = (
    *"abcdefghijklmnopqrstuvwxyz",
    *(",", ".", "lfdemo", "background", "cross", "circle", "square", "triangle", "ring"),
    *("diamond", "star", "red", "green", "blue", "yellow", "white", "black", "grey", "photo"),
)


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text("utf-8"))


def t5_tiny_words() -> list[str]:
    """The tiny T5 vocabulary after the specials: the tiny CLIP vocabulary's words and letters."""
    words = {token.removesuffix("</w>") for token in tiny_vocab() if token.isascii()}
    words = {w for w in words if w and w.isalnum() and w.islower()}
    return sorted(words | set(_T5_EXTRA))


def tiny_flow_configs(family: str) -> dict[str, dict[str, Any]]:
    """The tiny model's configs by component folder, plus ``model_index`` and ``scheduler``.

    Raises:
        ValueError: ``family`` is not ``flux`` or ``sd3``.
    """
    if family not in TINY_FLOW_FAMILIES:
        raise ValueError(f"no tiny flow model for {family!r}; use one of {TINY_FLOW_FAMILIES}")
    src = architecture_config_dir(_SOURCE[family])
    clip_ids = tiny_clip_token_ids()
    t5_name = "text_encoder_2" if family == "flux" else "text_encoder_3"
    t5 = {**_read(src / t5_name / "config.json"), **_TINY_T5}
    t5["vocab_size"] = len(T5_SPECIALS) + len(t5_tiny_words())
    configs: dict[str, dict[str, Any]] = {
        "scheduler": _read(src / "scheduler" / "scheduler_config.json"),
        "transformer": {
            **_read(src / "transformer" / "config.json"),
            **_TINY_TRANSFORMER[family],
        },
        "vae": {**_read(src / "vae" / "config.json"), **_TINY_VAE},
        "text_encoder": {**_read(src / "text_encoder" / "config.json"), **_TINY_CLIP, **clip_ids},
        t5_name: t5,
    }
    if family == "sd3":
        g = {**_read(src / "text_encoder_2" / "config.json"), **_TINY_CLIP_G, **clip_ids}
        configs["text_encoder_2"] = g
    configs["model_index"] = _model_index(family)
    for config in configs.values():
        config.pop("_name_or_path", None)
    return copy.deepcopy(configs)


def _model_index(family: str) -> dict[str, Any]:
    if family == "flux":
        return {
            "_class_name": "FluxPipeline",
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "FluxTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
    return {
        "_class_name": "StableDiffusion3Pipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _kwargs(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"}


def build_tiny_flow_components(family: str, *, seed: int = 0) -> dict[str, Any]:
    """The tiny transformer, VAE and text encoders with seeded random weights (fp32, CPU)."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    configs = tiny_flow_configs(family)
    state = torch.random.get_rng_state()
    components: dict[str, Any] = {}
    try:
        torch.manual_seed(seed)
        cls = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
        components["transformer"] = cls.from_config(_kwargs(configs["transformer"]))
        components["vae"] = AutoencoderKL.from_config(_kwargs(configs["vae"]))
        clip_cls = CLIPTextModel if family == "flux" else CLIPTextModelWithProjection
        components["text_encoder"] = clip_cls(CLIPTextConfig(**_kwargs(configs["text_encoder"])))
        if family == "sd3":
            g = CLIPTextConfig(**_kwargs(configs["text_encoder_2"]))
            components["text_encoder_2"] = CLIPTextModelWithProjection(g)
        t5_name = "text_encoder_2" if family == "flux" else "text_encoder_3"
        components[t5_name] = T5EncoderModel(T5Config(**_kwargs(configs[t5_name])))
    finally:
        torch.random.set_rng_state(state)
    for module in components.values():
        module.eval()
    return components


def write_tiny_t5_tokenizer(out_dir: Path) -> Path:
    """A word-level T5-style tokenizer (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, EOS appended) as
    ``tokenizer.json`` + ``tokenizer_config.json``, loadable with ``T5TokenizerFast``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate([*T5_SPECIALS, *t5_tiny_words()])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.model_max_length = 512
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return out_dir


def write_tiny_flow_model(family: str, out_dir: Path, *, seed: int = 0) -> Path:
    """Write a tiny FLUX.1 (``flux``) or SD3.5 (``sd3``) model as a diffusers folder.

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    configs = tiny_flow_configs(family)
    components = build_tiny_flow_components(family, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    with no_hf_progress_bars():
        for name, module in components.items():
            module.save_pretrained(out_dir / name, safe_serialization=True)
    write_tiny_tokenizer(out_dir / "tokenizer")
    if family == "sd3":
        write_tiny_tokenizer(out_dir / "tokenizer_2", pad_token="!")
    write_tiny_t5_tokenizer(out_dir / ("tokenizer_2" if family == "flux" else "tokenizer_3"))
    (out_dir / "scheduler").mkdir(exist_ok=True)
    for path, data in (
        (out_dir / "scheduler" / "scheduler_config.json", configs["scheduler"]),
        (out_dir / "model_index.json", configs["model_index"]),
    ):
        path.write_text(json.dumps(data, indent=2) + "\n", "utf-8")
    return out_dir
