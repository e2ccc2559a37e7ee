"""Which architecture an estimate uses: local models' own configs, else the published ones."""

from __future__ import annotations

import json
import shutil

import pytest

from loraforge.errors import ModelError, RecipeError
from loraforge.vram import estimate_vram, resolve_architecture
from loraforge.vram.structure import unet_structure

from .conftest import recipe_from


def test_hub_model_uses_the_published_configs():
    arch = resolve_architecture("stabilityai/stable-diffusion-xl-base-1.0", "sdxl")
    assert arch.family == "sdxl"
    assert arch.text_encoder_names == ("text_encoder", "text_encoder_2")
    assert "published" in arch.source


def test_auto_family_needs_a_local_model():
    with pytest.raises(RecipeError) as info:
        estimate_vram(recipe_from({"model": {"family": "auto"}}))
    assert "model.family" in info.value.hint


def test_local_diffusers_folder_is_detected_and_used(tiny_sd1_dir):
    arch = resolve_architecture(str(tiny_sd1_dir), "auto")
    assert arch.family == "sd1"
    tiny_unet = json.loads((tiny_sd1_dir / "unet" / "config.json").read_text())
    assert arch.configs["unet"]["block_out_channels"] == tiny_unet["block_out_channels"]
    estimate = estimate_vram(recipe_from({"model": {"base": str(tiny_sd1_dir), "family": "auto"}}))
    assert estimate.architecture == str(tiny_sd1_dir)
    assert estimate.tensor_bytes < 200 * 2**20  # a tiny model, not SD 1.5


def test_single_file_checkpoint_uses_its_embedded_configs(tiny_sdxl_file):
    arch = resolve_architecture(str(tiny_sdxl_file), "auto")
    assert arch.family == "sdxl"
    assert unet_structure(arch.configs["unet"]).params < 10_000_000


def test_family_mismatch_is_reported(tiny_sd1_dir):
    with pytest.raises(ModelError, match="sdxl"):
        resolve_architecture(str(tiny_sd1_dir), "sdxl")


def test_vae_folder_override_replaces_the_vae_config(tiny_sd1_dir, tmp_path):
    vae = shutil.copytree(tiny_sd1_dir / "vae", tmp_path / "vae")
    config = json.loads((vae / "config.json").read_text())
    config["block_out_channels"] = [8, 8, 16, 16]
    (vae / "config.json").write_text(json.dumps(config))
    arch = resolve_architecture(str(tiny_sd1_dir), "sd1", vae=str(vae))
    assert arch.configs["vae"]["block_out_channels"] == [8, 8, 16, 16]


def test_not_a_safetensors_file_is_a_model_error(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\xff" * 16)
    with pytest.raises(ModelError):
        resolve_architecture(str(bad), "auto")
