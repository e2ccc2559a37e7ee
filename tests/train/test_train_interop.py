"""Interop proof: a trained file loads with diffusers ``load_lora_weights`` and changes the tiny
pipeline's UNet and text encoders exactly as merging ``W + up @ down * alpha / rank`` does.

Everything on the reference side is computed here, independently of loraforge: the expected
modules come from walking the diffusers/transformers models the way sd-scripts picks targets
(Linear and 1x1 Conv2d layers inside Transformer2DModel, CLIPAttention and CLIPMLP), kohya names
are built by hand (with a hand-written SGM table for SDXL), and the merge is plain arithmetic.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from loraforge.recipe import load_recipe
from loraforge.training.run import run_training

pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft")

UNET_TARGETS = ("Transformer2DModel",)
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")  # LoCon adds these
TEXT_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")


def _train(folder: Path, make_recipe, model: Path, network: dict | None = None) -> Path:
    path = make_recipe(
        folder,
        {
            # alpha != dim: a reader that ignores alpha gets a different model
            "network": network or {"dim": 4, "alpha": 2},
            "training": {"max_train_steps": 3, "learning_rate": 2e-2},
            "output": {"save_precision": "fp16"},
        },
        model=model,
        out=folder / "out",
    )
    return run_training(load_recipe(path)).final_path


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory, make_recipe, tiny_sd1_dir) -> Path:
    return _train(tmp_path_factory.mktemp("sd1"), make_recipe, tiny_sd1_dir)


@pytest.fixture(scope="module")
def sd1_locon_file(tmp_path_factory, make_recipe, tiny_sd1_dir) -> Path:
    locon = {"algorithm": "locon", "dim": 4, "alpha": 2, "conv_dim": 2, "conv_alpha": 1}
    return _train(tmp_path_factory.mktemp("sd1-locon"), make_recipe, tiny_sd1_dir, locon)


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory, make_recipe, tiny_sdxl_dir) -> Path:
    return _train(tmp_path_factory.mktemp("sdxl"), make_recipe, tiny_sdxl_dir)


@pytest.fixture(scope="module")
def sd2v_file(tmp_path_factory, make_recipe, tiny_sd2v_file) -> Path:
    # trained from the single-file checkpoint: loading, v-prediction and naming end to end
    return _train(tmp_path_factory.mktemp("sd2v"), make_recipe, tiny_sd2v_file)


def _is_target_layer(module: nn.Module, conv: bool) -> bool:
    return isinstance(module, nn.Linear) or (
        isinstance(module, nn.Conv2d) and (conv or tuple(module.kernel_size) == (1, 1))
    )


def _targets(
    model: nn.Module, classes: tuple[str, ...], conv: bool = False
) -> dict[str, nn.Module]:
    """diffusers/transformers module path -> layer, for every layer sd-scripts adapts."""
    found = {}
    for path, module in model.named_modules():
        if type(module).__name__ in classes:
            for sub, child in module.named_modules():
                if sub and _is_target_layer(child, conv):
                    found[f"{path}.{sub}"] = child
    return found


def _sgm(path: str) -> str:
    """diffusers SDXL UNet path -> the SGM path sd-scripts names modules by."""
    path = re.sub(
        r"^down_blocks\.(\d)\.attentions\.(\d)",
        lambda m: f"input_blocks.{3 * int(m[1]) + int(m[2]) + 1}.1",
        path,
    )
    path = re.sub(r"^mid_block\.attentions\.0", "middle_block.1", path)
    return re.sub(
        r"^up_blocks\.(\d)\.attentions\.(\d)",
        lambda m: f"output_blocks.{3 * int(m[1]) + int(m[2])}.1",
        path,
    )


def _kohya(prefix: str, path: str) -> str:
    return prefix + path.replace(".", "_")


def _text_path(path: str) -> str:
    """The canonical CLIP path: transformers 5 dropped the ``text_model.`` wrapper."""
    return path if path.startswith("text_model.") else f"text_model.{path}"


def _expected(
    unet: nn.Module, encoders: list[tuple[str, nn.Module]], sdxl: bool, locon: bool = False
) -> dict[str, nn.Module]:
    unet_layers = _targets(unet, UNET_TARGETS)
    if locon:
        unet_layers |= _targets(unet, UNET_CONV_TARGETS, conv=True)
    names = {_kohya("lora_unet_", _sgm(p) if sdxl else p): m for p, m in unet_layers.items()}
    for prefix, encoder in encoders:
        for p, m in _targets(encoder, TEXT_TARGETS).items():
            names[_kohya(prefix, _text_path(p))] = m
    return names


@torch.no_grad()
def _merge(tensors: dict[str, torch.Tensor], targets: dict[str, nn.Module]) -> None:
    for name, layer in targets.items():
        down = tensors[f"{name}.lora_down.weight"].float()
        up = tensors[f"{name}.lora_up.weight"].float()
        alpha = float(tensors[f"{name}.alpha"])
        delta = (up.flatten(1) @ down.flatten(1)) * alpha / down.shape[0]
        layer.weight += delta.reshape(layer.weight.shape)


def _load_pipeline(model_dir: Path, sdxl: bool):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    return cls.from_pretrained(model_dir)


def _encoders(pipe, sdxl: bool) -> list[tuple[str, nn.Module]]:
    if sdxl:
        return [("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)]
    return [("lora_te_", pipe.text_encoder)]


def _unet_out(unet: nn.Module, sdxl: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=gen)
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen)
    kwargs = {}
    if sdxl:
        pooled = torch.randn(
            1, unet.config.projection_class_embeddings_input_dim - 48, generator=gen
        )
        ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": ids}
    return unet(latents, 500, hidden, **kwargs).sample


def _text_out(encoder: nn.Module) -> torch.Tensor:
    ids = torch.tensor([[0, 5, 9, 12, 40, 1] + [1] * 71])
    return encoder(ids, output_hidden_states=True).hidden_states[-2]


def _check(model_dir: Path, file: Path, sdxl: bool, locon: bool = False) -> None:
    tensors = load_file(str(file))
    loaded = _load_pipeline(model_dir, sdxl)
    base = _load_pipeline(model_dir, sdxl)
    reference = _load_pipeline(model_dir, sdxl)
    targets = _expected(reference.unet, _encoders(reference, sdxl), sdxl, locon)
    in_file = {key.split(".", 1)[0] for key in tensors}  # fmt: skip
    assert in_file == set(targets), sorted(in_file ^ set(targets))[:5]
    _merge(tensors, targets)
    loaded.load_lora_weights(str(file))
    injected = sum(hasattr(m, "lora_A") for m in loaded.unet.modules())
    assert injected == sum(n.startswith("lora_unet_") for n in targets)
    with torch.no_grad():
        got, want = _unet_out(loaded.unet, sdxl), _unet_out(reference.unet, sdxl)
        assert not torch.allclose(want, _unet_out(base.unet, sdxl), atol=1e-4)  # it changed
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        for (_, mine), (_, ref), (_, raw) in zip(
            _encoders(loaded, sdxl), _encoders(reference, sdxl), _encoders(base, sdxl), strict=True
        ):
            assert not torch.allclose(_text_out(ref), _text_out(raw), atol=1e-4)
            torch.testing.assert_close(_text_out(mine), _text_out(ref), atol=2e-5, rtol=1e-4)


def test_sd1_file_loads_in_diffusers_and_equals_the_merged_weights(sd1_file, tiny_sd1_dir) -> None:
    _check(tiny_sd1_dir, sd1_file, sdxl=False)


@pytest.mark.slow
def test_sdxl_file_loads_in_diffusers_and_equals_the_merged_weights(
    sdxl_file, tiny_sdxl_dir
) -> None:
    _check(tiny_sdxl_dir, sdxl_file, sdxl=True)


def test_sd1_locon_file_loads_in_diffusers_and_equals_the_merged_weights(
    sd1_locon_file, tiny_sd1_dir
) -> None:
    tensors = load_file(str(sd1_locon_file))
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert tensors[f"{conv}.lora_down.weight"].shape[1:] == (32, 3, 3)
    assert float(tensors[f"{conv}.alpha"]) == 1.0  # conv_alpha, not alpha
    _check(tiny_sd1_dir, sd1_locon_file, sdxl=False, locon=True)


def test_sd2v_file_loads_in_diffusers_and_equals_the_merged_weights(
    sd2v_file, tiny_sd2v_dir
) -> None:
    _check(tiny_sd2v_dir, sd2v_file, sdxl=False)


def test_sd2v_metadata_says_v_prediction(sd2v_file) -> None:
    from loraforge.ops.lora_file import read_lora_file

    meta = read_lora_file(sd2v_file).metadata
    assert (meta["ss_v2"], meta["ss_base_model_version"]) == ("True", "sd_v2_v")
    assert meta["ss_sd_model_name"] == "tiny-sd2v.safetensors"
    assert meta["modelspec.prediction_type"] == "v"
    assert meta["modelspec.architecture"].startswith("stable-diffusion-v2-768-v")


def test_file_metadata_is_sd_scripts_like(sd1_file) -> None:
    from loraforge.ops.lora_file import read_lora_file

    meta = read_lora_file(sd1_file).metadata
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_steps"] == "3" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_dataset_dirs"] == '{"3_lfdemo shape": {"n_repeats": 3, "img_count": 6}}'
    assert len(meta["sshs_model_hash"]) == 64 and "loraforge_recipe" in meta
