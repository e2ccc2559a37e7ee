"""Built-in tiny SD1-, SD2- and SDXL-architecture models for tests and the demo presets.

Each tiny model is the real architecture config (shipped under ``configs/``) with small widths:
the same block types, level layout, layers per block, cross-attention, linear/conv projections,
text-time embedding, two text encoders with a projection (SDXL), the GELU OpenCLIP-style text
encoder and v-prediction scheduler (SD2), VAE down-sampling factor 8 and 77-token text encoders.
Weights are random but seeded, so the same ``seed`` writes the same model. A training step
(forward + backward) takes a few tens of milliseconds on a CPU.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

from loraforge.models.clip_tokenizer import tiny_clip_token_ids, write_tiny_tokenizer
from loraforge.models.configs import architecture_config_dir
from loraforge.models.quiet import no_hf_progress_bars

TinyFamily = Literal["sd1", "sd2", "sd2-v", "sdxl"]

_TINY_FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl")

_TINY_VAE = {
    "block_out_channels": [16, 16, 32, 32],  # four levels: the real factor-8 down-sampling
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}
_TINY_UNET = {
    "sd1": {
        "block_out_channels": [32, 32, 64, 64],
        "attention_head_dim": 2,
        "cross_attention_dim": 32,
        "norm_num_groups": 16,
        "sample_size": 8,
    },
    "sd2": {  # the real config's linear projections and per-level head counts, narrower
        "block_out_channels": [32, 32, 64, 64],
        "attention_head_dim": [1, 1, 2, 2],
        "cross_attention_dim": 32,
        "norm_num_groups": 16,
        "sample_size": 8,
    },
    "sdxl": {
        "block_out_channels": [32, 32, 64],
        "attention_head_dim": [2, 2, 4],
        "transformer_layers_per_block": [1, 1, 2],
        "cross_attention_dim": 32 + 48,  # text encoder 1 + text encoder 2 hidden sizes
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 32 + 6 * 8,  # pooled (projection) + 6 time ids
        "addition_embed_type_num_heads": 2,
        "norm_num_groups": 16,
        "sample_size": 8,
    },
}
_TINY_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_hidden_layers": 4,
    "projection_dim": 32,
}
# the second encoder is wider, as bigG is wider than ViT-L: converters tell them apart by width
_TINY_TEXT_2 = {**_TINY_TEXT, "hidden_size": 48, "intermediate_size": 96}


def _read(folder: Path, name: str) -> dict[str, Any]:
    return json.loads((folder / name).read_text("utf-8"))


def tiny_component_configs(family: TinyFamily) -> dict[str, dict[str, Any]]:
    """The tiny model's configs by component folder (``unet``, ``vae``, ``text_encoder``, …).

    Also ``model_index`` and ``scheduler``. Text-encoder configs carry the tiny tokenizer's
    special-token ids and vocabulary size.

    Raises:
        ValueError: for a family without a tiny model.
    """
    if family not in _TINY_FAMILIES:
        raise ValueError(f"no tiny model for family {family!r}; use one of {_TINY_FAMILIES}")
    src = architecture_config_dir(family)
    ids = tiny_clip_token_ids()
    configs: dict[str, dict[str, Any]] = {
        "model_index": _read(src, "model_index.json"),
        "scheduler": _read(src, "scheduler/scheduler_config.json"),
        "unet": {**_read(src, "unet/config.json"), **_TINY_UNET[family.removesuffix("-v")]},
        "vae": {**_read(src, "vae/config.json"), **_TINY_VAE},
    }
    encoders = ("text_encoder", "text_encoder_2") if family == "sdxl" else ("text_encoder",)
    for name in encoders:
        sizes = _TINY_TEXT_2 if name == "text_encoder_2" else _TINY_TEXT
        config = {**_read(src, f"{name}/config.json"), **sizes, **ids}
        config.pop("_name_or_path", None)
        configs[name] = config
    return copy.deepcopy(configs)


def build_tiny_components(family: TinyFamily, *, seed: int = 0) -> dict[str, Any]:
    """Instantiate the tiny UNet, VAE and text encoder(s) with seeded random weights (fp32, CPU)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = tiny_component_configs(family)
    components: dict[str, Any] = {}
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        components["unet"] = UNet2DConditionModel.from_config(_model_kwargs(configs["unet"]))
        components["vae"] = AutoencoderKL.from_config(_model_kwargs(configs["vae"]))
        for name in ("text_encoder", "text_encoder_2"):
            if name in configs:
                text_config = CLIPTextConfig(**_model_kwargs(configs[name]))
                cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
                components[name] = cls(text_config)
    finally:
        torch.random.set_rng_state(generator_state)  # leave the caller's RNG as it was
    for module in components.values():
        module.eval()
    return components


def _model_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"}


def write_tiny_model(
    family: TinyFamily, out_dir: Path, *, seed: int = 0, pretrained: bool = False
) -> Path:
    """Write a tiny model as a diffusers folder (``model_index.json``, ``unet/``, ``vae/``, …).

    Args:
        family: ``"sd1"``, ``"sd2"``, ``"sd2-v"`` or ``"sdxl"``.
        out_dir: the folder to create (must not hold another model).
        seed: weight seed; the same seed writes the same weights.
        pretrained: SD1 only: the demo's pretrained weights
            (:mod:`loraforge.models.pretrained`) instead of seeded random ones.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: ``pretrained`` for a family without pretrained weights.
    """
    out_dir = Path(out_dir)
    configs = tiny_component_configs(family)
    components = build_tiny_components(family, seed=seed)
    if pretrained:
        if family != "sd1":
            raise ValueError(f"no pretrained tiny model for family {family!r}; only sd1")
        from loraforge.models.pretrained import load_demo_weights

        load_demo_weights(components)
    out_dir.mkdir(parents=True, exist_ok=True)
    with no_hf_progress_bars():
        for name, module in components.items():
            module.save_pretrained(out_dir / name, safe_serialization=True)
    for name, pad in _tokenizer_pads(family).items():
        write_tiny_tokenizer(out_dir / name, pad_token=pad)
    (out_dir / "scheduler").mkdir(exist_ok=True)
    _write_json(out_dir / "scheduler" / "scheduler_config.json", configs["scheduler"])
    _write_json(out_dir / "model_index.json", configs["model_index"])
    return out_dir


def write_tiny_single_file(family: TinyFamily, out_file: Path, *, seed: int = 0) -> Path:
    """Write a tiny model as one original-layout (LDM/SGM) ``.safetensors`` checkpoint.

    Keys are those of the original SD/SDXL checkpoints (``model.diffusion_model.…``,
    ``first_stage_model.…``, ``cond_stage_model.transformer.…`` or ``conditioner.embedders.N.…``),
    so diffusers' single-file converters read them. Because the tiny architecture differs from
    the published ones, the file's metadata also carries the component configs and tokenizer
    (key :data:`loraforge.models.single_file.EMBEDDED_CONFIG_KEY`).

    Returns:
        ``out_file``.
    """
    from safetensors.torch import save_file

    from loraforge.models.single_file import EMBEDDED_CONFIG_KEY, diffusers_to_ldm_state_dict

    out_file = Path(out_file)
    configs = tiny_component_configs(family)
    components = build_tiny_components(family, seed=seed)
    state = diffusers_to_ldm_state_dict(family, components, unet_config=configs["unet"])
    embedded = {"family": family, "configs": configs, "tokenizers": _tokenizer_files(family)}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(out_file),
        metadata={EMBEDDED_CONFIG_KEY: json.dumps(embedded)},
    )
    return out_file


def _tokenizer_files(family: TinyFamily) -> dict[str, dict[str, str]]:
    """``{tokenizer folder: {file name: text}}`` of the tiny tokenizer(s)."""
    import tempfile

    files: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, pad in _tokenizer_pads(family).items():
            folder = write_tiny_tokenizer(Path(tmp) / name, pad_token=pad)
            files[name] = {p.name: p.read_text("utf-8") for p in folder.iterdir()}
    return files


def _tokenizer_pads(family: TinyFamily) -> dict[str, str]:
    """``{tokenizer folder: pad token}``: OpenCLIP tokenizers (SD2, SDXL's second) pad with "!"."""
    if family == "sdxl":
        return {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}
    return {"tokenizer": "!" if family.startswith("sd2") else "<|endoftext|>"}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", "utf-8")
