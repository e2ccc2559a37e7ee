"""Block swap and the flow recipe rules: which blocks sd-scripts swaps, that swapping changes
no number, and the findings `check` reports for SD3 / FLUX recipes."""

from __future__ import annotations

import torch

from loraforge.vram.flow_structure import swap_indices


def test_swapped_blocks_follow_sd_scripts() -> None:
    # FLUX.1: 19 double + 38 single blocks; n=8 swaps the last 4 double and last 8 single ones
    assert swap_indices("flux", 19, 57, 8) == (*range(15, 19), *range(49, 57))
    # n=35 (sd-scripts' maximum): 17 double, 36 single
    swapped = swap_indices("flux", 19, 57, 35)
    assert sum(i < 19 for i in swapped) == 17 and sum(i >= 19 for i in swapped) == 36
    assert swap_indices("sd3", 38, 38, 3) == (35, 36, 37)
    assert swap_indices("sd3", 38, 38, 0) == ()


def test_block_swap_moves_blocks_around_their_forward_and_changes_nothing(monkeypatch) -> None:
    from loraforge.models.tiny_flow import build_tiny_flow_components
    from loraforge.training import block_swap

    transformer = build_tiny_flow_components("flux")["transformer"]
    x = torch.randn(1, 16, 4, 4)
    embeds = _embeds(transformer)
    before = _run(transformer, x, embeds)
    moves: list[tuple[int, str]] = []
    real_move = block_swap._move

    def record(module, device) -> None:
        moves.append((id(module), str(device)))
        real_move(module, device)

    monkeypatch.setattr(block_swap, "_move", record)
    swapped = block_swap.enable_block_swap(transformer, "flux", 2, torch.device("cpu"))
    blocks, _ = block_swap.transformer_blocks(transformer)
    assert swapped == [0, 1, 2]  # 1 double block (the only one) and 2 single blocks
    after = _run(transformer, x, embeds)
    assert torch.equal(before, after)
    expected = [(id(blocks[i]), device) for i in swapped for device in ("cpu", "cpu")]
    assert sorted(moves) == sorted(expected)


def _embeds(transformer):
    from loraforge.models.prompts import PromptEmbeds

    width = transformer.config.joint_attention_dim
    pooled = transformer.config.pooled_projection_dim
    return PromptEmbeds(torch.randn(1, 5, width), torch.randn(1, pooled))


def _run(transformer, x, embeds) -> torch.Tensor:
    from loraforge.models.flow_transformer import denoise

    with torch.no_grad():
        t = torch.tensor([500.0])
        return denoise(transformer, "flux", x, t, embeds, guidance=1.0, dtype=torch.float32)


def _codes(family: str, training: dict | None = None, model: dict | None = None) -> set:
    """``(severity, path)`` of the flow findings `check` reports for a recipe."""
    import yaml

    from loraforge.recipe import validate_recipe_text

    data = {
        "model": {"base": "m", "family": family, **(model or {})},
        "dataset": {"subsets": [{"dir": "d"}]},
        "training": training or {},
    }
    problems = validate_recipe_text(yaml.safe_dump(data)).problems
    flow = ("blocks_to_swap", "v_parameterization", "min_snr_gamma", "clip_g", "t5xxl",
            "timestep_sampling", "guidance_scale")  # fmt: skip
    return {(p.severity, p.path) for p in problems if p.path.endswith(flow)}


def test_flow_rules() -> None:
    found = _codes("flux", {"blocks_to_swap": 40, "min_snr_gamma": 5, "v_parameterization": True},
                   {"clip_g": "g.safetensors"})  # fmt: skip
    assert ("error", "training.blocks_to_swap") in found  # over 35, and no checkpointing
    assert ("error", "training.v_parameterization") in found
    assert ("warning", "training.min_snr_gamma") in found
    assert ("error", "model.clip_g") in found
    assert _codes("flux", {"blocks_to_swap": 8, "gradient_checkpointing": True}) == set()
    elsewhere = _codes("sdxl", {"timestep_sampling": "shift"}, {"t5xxl": "t5.safetensors"})
    assert elsewhere == {("warning", "training.timestep_sampling"), ("warning", "model.t5xxl")}
    from loraforge.recipe import validate_recipe_text

    text = "model: {base: m, family: flux}\ndataset: {subsets: [{dir: d}]}\n"
    text += "training: {mixed_precision: fp16}\n"
    messages = [p.message for p in validate_recipe_text(text).problems]
    assert any("overflows in fp16" in m for m in messages)
    sd3 = _codes("sd3", {"guidance_scale": 3.5})
    assert sd3 == {("warning", "training.guidance_scale")}


def test_sd_scripts_flux_and_sd3_options_convert(tmp_path) -> None:
    from loraforge.recipe.kohya_convert import convert_kohya

    flux = {
        "pretrained_model_name_or_path": "/m/flux1-dev.safetensors",
        "clip_l": "/m/clip_l.safetensors",
        "t5xxl": "/m/t5xxl_fp16.safetensors",
        "ae": "/m/ae.safetensors",
        "t5xxl_max_token_length": 256,
        "timestep_sampling": "shift",
        "discrete_flow_shift": 3.1582,
        "model_prediction_type": "raw",
        "guidance_scale": 1.0,
        "blocks_to_swap": 8,
    }
    recipe = convert_kohya(flux, tmp_path).recipe
    assert recipe["model"]["vae"] == "/m/ae.safetensors"
    assert recipe["model"]["t5xxl_max_token_length"] == 256
    assert recipe["training"]["blocks_to_swap"] == 8
    assert recipe["training"]["timestep_sampling"] == "shift"
    sd3 = convert_kohya({"training_shift": 3.0, "weighting_scheme": "logit_normal"}, tmp_path)
    assert sd3.recipe["training"]["discrete_flow_shift"] == 3.0
    assert sd3.recipe["training"]["weighting_scheme"] == "logit_normal"


def test_cpu_offload_checkpointing_changes_no_number(monkeypatch) -> None:
    from loraforge.models.tiny_flow import build_tiny_flow_components
    from loraforge.training import offload_checkpointing
    from loraforge.training.precision import enable_gradient_checkpointing

    transformer = build_tiny_flow_components("flux")["transformer"]
    enable_gradient_checkpointing(transformer, [])
    embeds = _embeds(transformer)

    def output_and_grad() -> tuple[torch.Tensor, torch.Tensor]:
        from loraforge.models.flow_transformer import denoise

        x = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0)).requires_grad_()
        t = torch.tensor([500.0])
        out = denoise(transformer, "flux", x, t, embeds, guidance=1.0, dtype=torch.float32)
        out.square().mean().backward()
        return out.detach(), x.grad

    before = output_and_grad()
    calls: list[int] = []
    real = offload_checkpointing._moves

    def every_tensor(value, storage) -> bool:  # on a CPU machine: take the moving path anyway
        calls.append(1)
        return (isinstance(value, torch.Tensor) and value.is_floating_point()) or real(
            value, storage
        )

    monkeypatch.setattr(offload_checkpointing, "_moves", every_tensor)
    offload_checkpointing.enable_cpu_offload_checkpointing(transformer)
    after = output_and_grad()
    assert calls  # every block call went through the offloading wrapper
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
