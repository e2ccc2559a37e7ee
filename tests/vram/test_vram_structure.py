"""The config walk counts what diffusers / transformers / the network backend actually build."""

from __future__ import annotations

import json

import pytest
import torch

from loraforge.models.configs import architecture_config_dir
from loraforge.vram.network_size import network_size
from loraforge.vram.structure import text_structure, unet_structure, vae_params

from .conftest import recipe_from, tiny_architecture


def _kwargs(config):
    return {k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"}


def _configs(family: str) -> dict:
    if family.startswith("tiny-"):
        return dict(tiny_architecture(family[5:]).configs)
    folder = architecture_config_dir(family)
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    return {
        n: json.loads((folder / n / "config.json").read_text())
        for n in names
        if (folder / n / "config.json").is_file()
    }


def _meta_models(configs: dict):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_kwargs(configs["unet"]))
        vae = AutoencoderKL.from_config(_kwargs(configs["vae"]))
        texts = [
            (CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel)(
                CLIPTextConfig(**_kwargs(configs[name]))
            )
            for name in ("text_encoder", "text_encoder_2")
            if name in configs
        ]
    return unet, vae, texts


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl", "tiny-sd1", "tiny-sdxl"])
def test_parameter_counts_match_the_instantiated_models(family):
    configs = _configs(family)
    unet, vae, texts = _meta_models(configs)
    structure = unet_structure(configs["unet"])
    assert structure.params == _count(unet)
    assert vae_params(configs["vae"]) == _count(vae)
    for name, model in zip(("text_encoder", "text_encoder_2"), texts, strict=False):
        assert text_structure(configs[name], projection=name == "text_encoder_2").params == _count(
            model
        )
    # every walked layer exists with that shape, and fp8_base's share is the Linear/Conv2d one
    modules = dict(unet.named_modules())
    for layer in structure.layers:
        weight = modules[layer.path].weight
        kernel = (layer.kernel, layer.kernel) if layer.kernel else ()
        assert tuple(weight.shape) == (layer.out_features, layer.in_features, *kernel)
    layered = sum(
        _count(m) for m in unet.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
    )
    assert structure.layer_params == layered


def test_published_sizes_are_the_known_ones():
    # SD 1.5 UNet 859.5M, SDXL UNet 2.567B, CLIP ViT-L 123M, OpenCLIP bigG 695M
    assert unet_structure(_configs("sd1")["unet"]).params == 859_520_964
    assert unet_structure(_configs("sdxl")["unet"]).params == 2_567_463_684
    sdxl = _configs("sdxl")
    assert text_structure(sdxl["text_encoder_2"], projection=True).params == 694_659_840


@pytest.mark.parametrize(
    ("family", "network"),
    [
        ("sd1", {"dim": 16, "alpha": 8}),
        ("sd1", {"algorithm": "locon", "dim": 8, "conv_dim": 4}),
        ("sd1", {"dim": 8, "train_text_encoder": False}),
        ("sdxl", {"algorithm": "lora-fa", "dim": 8}),
        (
            "sdxl",
            {
                "dim": 4,
                "conv_dim": 2,
                "down_lr_weight": [1, 1, 0, 1, 1, 1, 1, 1, 1],
                "block_dims": [2] * 22 + [8],
            },
        ),
        ("tiny-sdxl", {"algorithm": "dylora", "dim": 8, "args": {"unit": 4}}),
    ],
)
def test_network_size_matches_the_kohya_backend(family, network):
    from loraforge.backends import create_network

    configs = _configs(family)
    name = family.removeprefix("tiny-")
    recipe = recipe_from({"network": network}, family=name)
    unet, _, texts = _meta_models(configs)
    built = create_network(recipe.network, name, unet, texts)
    trainable = sum(p.numel() for g in built.param_groups(1e-4, 1e-4) for p in g["params"])
    text_structures = [
        text_structure(configs[n], projection=n == "text_encoder_2")
        for n in ("text_encoder", "text_encoder_2")
        if n in configs
    ]
    size = network_size(
        recipe.network, name, unet_structure(configs["unet"]), text_structures, configs["unet"]
    )
    assert size.total == _count(built)
    assert size.trainable == trainable
    assert size.unet_modules + size.text_modules == len(list(built.adapters()))


def test_block_sizes_follow_the_latents():
    structure = unet_structure(_configs("sdxl")["unet"], (128, 96))
    tokens = {b.tokens for b in structure.blocks if b.kind == "transformer"}
    assert tokens == {64 * 48, 32 * 24}  # SDXL's attention levels: 1/2 and 1/4 of the latents
    odd = unet_structure(_configs("sd1")["unet"], (9, 7))
    assert min(b.tokens for b in odd.blocks) == 2 * 1  # ceil-halving 9x7 -> 5x4 -> 3x2 -> 2x1
