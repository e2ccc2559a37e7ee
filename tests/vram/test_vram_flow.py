"""The SD3 / FLUX VRAM estimate: structure counts against the real modules (meta device), the
presets against their header budgets, block swap and fp8 in the estimate, and the suggestions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loraforge.models.configs import architecture_config_dir
from loraforge.presets import list_presets
from loraforge.recipe.load import parse_recipe_text
from loraforge.vram import estimate_vram, header_budget, parse_size
from loraforge.vram.flow_structure import flow_structure, t5_params


@pytest.mark.parametrize(
    "variant", ["flux-dev", "flux-schnell", "sd3-medium", "sd35-medium", "sd35-large"]
)
def test_structure_counts_match_the_real_transformers(variant: str) -> None:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    config = json.loads(
        (architecture_config_dir(variant) / "transformer" / "config.json").read_text()
    )
    cls = FluxTransformer2DModel if variant.startswith("flux") else SD3Transformer2DModel
    with torch.device("meta"):
        model = cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    linears = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and "transformer_blocks." in name
    }
    structure = flow_structure(config)
    assert structure.params == sum(p.numel() for p in model.parameters())
    assert {layer.path for layer in structure.layers} == set(linears)
    for layer in structure.layers:
        module = linears[layer.path]
        assert (layer.in_features, layer.out_features) == (module.in_features, module.out_features)


def test_t5_count_matches_the_real_encoder() -> None:
    from transformers import T5Config, T5EncoderModel

    config = json.loads(
        (architecture_config_dir("flux-dev") / "text_encoder_2" / "config.json").read_text()
    )
    with torch.device("meta"):
        model = T5EncoderModel(
            T5Config(**{k: v for k, v in config.items() if not k.startswith("_")})
        )
    assert t5_params(config)[0] == sum(p.numel() for p in model.parameters())


FLOW_PRESETS = ["flux-char-12gb", "flux-char-16gb", "flux-char-24gb", "flux-style-24gb",
                "sd35m-char-12gb", "sd35l-char-24gb"]  # fmt: skip


@pytest.mark.parametrize("name", FLOW_PRESETS)
def test_flow_presets_fit_their_header_budget(name: str) -> None:
    preset = next(p for p in list_presets() if p.name == name)
    from loraforge.recipe import load_recipe

    budget = header_budget(preset.path)
    estimate = estimate_vram(load_recipe(preset.path), budget_bytes=budget)
    assert preset.family in ("flux", "sd3") and estimate.family == preset.family
    assert estimate.fits, (estimate.total_bytes, budget)
    assert budget == parse_size(preset.vram.replace(" ", ""))


def _flux(training: str) -> object:
    text = (
        "model: {base: flux1-dev.safetensors, family: flux}\n"
        "dataset: {resolution: 1024, subsets: [{dir: d}]}\n"
        "cache: {latents: disk, text_encoder_outputs: disk}\n"
        "network: {dim: 16, train_text_encoder: false}\n"
        f"training: {{mixed_precision: bf16, {training}}}\n"
    )
    return parse_recipe_text(text, base_dir=Path("/nonexistent"))


def _row(estimate, start: str) -> int:
    return next(r.bytes for r in estimate.rows if r.component.startswith(start))


def test_fp8_block_swap_and_checkpointing_lower_the_estimate() -> None:
    plain = estimate_vram(_flux("gradient_checkpointing: true"))
    fp8 = estimate_vram(_flux("gradient_checkpointing: true, fp8_base: true"))
    swapped = estimate_vram(
        _flux("gradient_checkpointing: true, fp8_base: true, blocks_to_swap: 8")
    )
    # 11.9B params: 2 bytes each in bf16; fp8 stores the 11.84B Linear-layer params in 1 byte
    assert _row(plain, "transformer weights") == 11_901_408_320 * 2
    assert _row(fp8, "transformer weights") < 0.51 * _row(plain, "transformer weights")
    assert _row(swapped, "transformer weights") < _row(fp8, "transformer weights") - 2 * 2**30
    no_gc = estimate_vram(_flux("fp8_base: true"))
    assert _row(no_gc, "transformer activations") > 5 * _row(fp8, "transformer activations")


def test_suggestions_name_fp8_and_block_swap() -> None:
    estimate = estimate_vram(_flux("gradient_checkpointing: true"), budget_bytes=parse_size("12GB"))
    settings = {key for s in estimate.suggestions for key in s.settings}
    assert {"training.fp8_base", "training.blocks_to_swap"} <= settings


@pytest.mark.slow
def test_traced_flow_step_agrees_with_the_analytic_estimate() -> None:
    text = (
        "model: {base: sd3.5_medium.safetensors, family: sd3}\n"
        "dataset: {resolution: 512, subsets: [{dir: d}]}\n"
        "cache: {latents: disk, text_encoder_outputs: disk}\n"
        "network: {dim: 8, train_text_encoder: false}\n"
        "training: {mixed_precision: bf16, fp8_base: true, gradient_checkpointing: true, "
        "blocks_to_swap: 4}\n"
    )
    recipe = parse_recipe_text(text, base_dir=Path("/nonexistent"))
    analytic = estimate_vram(recipe)
    traced = estimate_vram(recipe, method="traced")
    assert traced.family == "sd3" and traced.method == "traced"
    # the same weights on the GPU: fp8 Linear weights, 3 of the 4 swapped blocks in CPU memory
    assert _row(traced, "transformer weights") == pytest.approx(
        _row(analytic, "transformer weights"), rel=0.02
    )
    assert _row(traced, "network weights") == pytest.approx(
        _row(analytic, "network weights"), rel=0.02
    )
    assert traced.total_bytes == pytest.approx(analytic.total_bytes, rel=0.15)


def test_cpu_offload_checkpointing_lowers_the_activations() -> None:
    plain = estimate_vram(_flux("gradient_checkpointing: true, fp8_base: true"))
    offload = estimate_vram(
        _flux("gradient_checkpointing: true, fp8_base: true, cpu_offload_checkpointing: true")
    )
    # FLUX at 1024: 57 blocks keep a (4096 + 512) x 3072 bf16 input each; offloaded, one does
    saved = 56 * (4096 + 512) * 3072 * 2
    drop = _row(plain, "transformer activations") - _row(offload, "transformer activations")
    assert drop == saved
