"""FLUX/SD3 LoRA files of the native backend, checked against independent arithmetic and diffusers.

* The hooked forward of the network equals the transformer with merged weights.
* The merged weights equal sd-scripts' semantics computed here by hand: a fused original layer
  (``qkv``, ``linear1``) gets ``up @ down * alpha / rank`` and diffusers' layers take its row
  chunks in order; SD3's pre-only context modulation takes them through diffusers' own
  ``swap_scale_shift`` (the layouts order shift/scale differently).
* diffusers' ``FluxPipeline.load_lora_weights`` reads the file (its kohya converter) and
  ``fuse_lora`` changes the weights exactly as that merge. Its converter hard-codes FLUX's full
  width for ``single_blocks.N.linear1``, so the check with single blocks uses FLUX at its
  published width with one double and one single block (bf16, the ``full_width_flux`` fixture);
  the tiny FLUX without single blocks covers the fp32 and text-encoder checks.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from loraforge.backends.kohya import KohyaBackend
from loraforge.recipe import section_defaults

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def tiny_flux(single_layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=single_layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    ).eval()


def tiny_sd3() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=16,
        pooled_projection_dim=24,
        out_channels=4,
        pos_embed_max_size=8,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    ).eval()


def tiny_clip() -> torch.nn.Module:
    torch.manual_seed(1)
    config = transformers.CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=1000,
        projection_dim=32,
    )
    return transformers.CLIPTextModel(config).eval()


def _network(family: str, transformer, encoders, alpha: float = 2.0, **args):
    config = replace(section_defaults("network"), backend="kohya", dim=4, alpha=alpha, args=args)
    network = KohyaBackend().create(config, family, transformer, encoders)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return network


def _flux_inputs(model) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(3), indexing="ij"), -1)
    img_ids = torch.cat([torch.zeros(6, 1), ids.reshape(6, 2).float()], 1)
    return {
        "hidden_states": torch.randn(1, 6, 16, generator=g),
        "encoder_hidden_states": torch.randn(1, 5, 32, generator=g),
        "pooled_projections": torch.randn(1, 32, generator=g),
        "timestep": torch.tensor([0.4]),
        "guidance": torch.tensor([3.5]),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(5, 3),
    }


def _sd3_inputs(model) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, 4, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(1, 5, 32, generator=g),
        "pooled_projections": torch.randn(1, 24, generator=g),
        "timestep": torch.tensor([400.0]),
    }


def _run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _hand_delta(tensors: dict, name: str) -> torch.Tensor:
    down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
    return up.flatten(1) @ down.flatten(1) * (tensors[f"{name}.alpha"] / down.shape[0])


def _flux_deltas(tensors: dict, n_double: int, n_single: int, h: int):
    """(diffusers layer, delta) pairs by sd-scripts' rules on BFL's fused layers, one fused
    layer's delta computed at a time (at full width all of them together take gigabytes)."""
    for i in range(n_double):
        d, k = f"transformer_blocks.{i}.", f"lora_unet_double_blocks_{i}_"
        for s, norm, qkv, proj, ff in (
            ("img", "norm1", ("to_q", "to_k", "to_v"), "to_out.0", "ff"),
            ("txt", "norm1_context", ("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out", "ff_context"),
        ):  # fmt: skip
            yield d + norm + ".linear", _hand_delta(tensors, k + s + "_mod_lin")
            chunks = _hand_delta(tensors, k + s + "_attn_qkv").chunk(3)
            for layer, chunk in zip(qkv, chunks, strict=True):
                yield d + "attn." + layer, chunk
            yield d + "attn." + proj, _hand_delta(tensors, k + s + "_attn_proj")
            yield d + ff + ".net.0.proj", _hand_delta(tensors, k + s + "_mlp_0")
            yield d + ff + ".net.2", _hand_delta(tensors, k + s + "_mlp_2")
    for i in range(n_single):
        d, k = f"single_transformer_blocks.{i}.", f"lora_unet_single_blocks_{i}_"
        parts = _hand_delta(tensors, k + "linear1").split([h, h, h, 4 * h])
        for layer, chunk in zip(
            ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), parts, strict=True
        ):
            yield d + layer, chunk
        yield d + "proj_out", _hand_delta(tensors, k + "linear2")
        yield d + "norm.linear", _hand_delta(tensors, k + "modulation_lin")


def _flux_expected(tensors: dict, n_double: int, n_single: int, h: int) -> dict[str, torch.Tensor]:
    """diffusers layer -> delta, by sd-scripts' rules on BFL's fused layers."""
    return dict(_flux_deltas(tensors, n_double, n_single, h))


def _sd3_expected(tensors: dict, depth: int, h: int) -> dict[str, torch.Tensor]:
    from diffusers.loaders.lora_conversion_utils import swap_scale_shift

    out = {}
    for i in range(depth):
        d, k = f"transformer_blocks.{i}.", f"lora_unet_joint_blocks_{i}_"
        ctx = _hand_delta(tensors, k + "context_block_attn_qkv").chunk(3)
        for layer, chunk in zip(("add_q_proj", "add_k_proj", "add_v_proj"), ctx, strict=True):
            out[d + "attn." + layer] = chunk
        mod = _hand_delta(tensors, k + "context_block_adaLN_modulation_1")
        if i == depth - 1:
            out[d + "norm1_context.linear"] = swap_scale_shift(mod)
        else:
            out[d + "norm1_context.linear"] = mod
            out[d + "attn.to_add_out"] = _hand_delta(tensors, k + "context_block_attn_proj")
            out[d + "ff_context.net.0.proj"] = _hand_delta(tensors, k + "context_block_mlp_fc1")
            out[d + "ff_context.net.2"] = _hand_delta(tensors, k + "context_block_mlp_fc2")
        attns = [("attn", "attn")] + ([("attn2", "attn2")] if i == 0 else [])
        for orig, diff in attns:
            qkv = _hand_delta(tensors, f"{k}x_block_{orig}_qkv").chunk(3)
            for layer, chunk in zip(("to_q", "to_k", "to_v"), qkv, strict=True):
                out[f"{d}{diff}.{layer}"] = chunk
            out[f"{d}{diff}.to_out.0"] = _hand_delta(tensors, f"{k}x_block_{orig}_proj")
        out[d + "ff.net.0.proj"] = _hand_delta(tensors, k + "x_block_mlp_fc1")
        out[d + "ff.net.2"] = _hand_delta(tensors, k + "x_block_mlp_fc2")
        out[d + "norm1.linear"] = _hand_delta(tensors, k + "x_block_adaLN_modulation_1")
    return out


def _check_merge(model, network, expected: dict[str, torch.Tensor], inputs) -> None:
    base = {k: v.clone() for k, v in model.state_dict().items()}
    network.apply_to()
    hooked = _run(model, inputs)
    # diffusers hands the fused layers one tensor: one shared adapter output, let go after use
    assert all(m._shared is None for m in network.adapters())
    network.merge_into_base()
    merged = _run(model, inputs)
    torch.testing.assert_close(hooked, merged, atol=1e-5, rtol=1e-4)
    state = model.state_dict()
    changed = {k.removesuffix(".weight") for k in state if not torch.equal(state[k], base[k])}
    assert changed == set(expected), sorted(changed ^ set(expected))[:5]
    for layer, delta in expected.items():
        key = layer + ".weight"
        torch.testing.assert_close(state[key], base[key] + delta, atol=1e-6, rtol=1e-5)
    network.restore()  # idempotent after a merge


def test_flux_hooked_forward_equals_hand_merged_weights() -> None:
    model = tiny_flux()
    inputs = _flux_inputs(model)
    network = _network("flux", model, [])
    tensors = network.state_dict_for_save(torch.float32)
    assert tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (7 * 16, 4)
    assert not torch.allclose(_run(model, inputs), _run(tiny_flux(), inputs) * 0)
    _check_merge(model, network, _flux_expected(tensors, 2, 2, 16), inputs)


def test_sd3_hooked_forward_equals_hand_merged_weights() -> None:
    model = tiny_sd3()
    inputs = _sd3_inputs(model)
    network = _network("sd3", model, [])
    tensors = network.state_dict_for_save(torch.float32)
    _check_merge(model, network, _sd3_expected(tensors, 3, 16), inputs)


def test_fused_layers_share_one_dropout_draw() -> None:
    model = tiny_flux()
    network = _network("flux", model, [])
    module = dict(network.named_children())["lora_unet_single_blocks_0_linear1"]
    module.module_dropout = 0.5
    network.apply_to()
    network.train()
    block = model.single_transformer_blocks[0]
    x = torch.randn(1, 3, 16)
    for _ in range(8):  # a module-dropout draw skips all four layers or none
        hooked = [block.attn.to_q(x), block.attn.to_k(x), block.attn.to_v(x), block.proj_mlp(x)]
        network.restore()
        plain = [block.attn.to_q(x), block.attn.to_k(x), block.attn.to_v(x), block.proj_mlp(x)]
        network.apply_to()
        same = [torch.equal(a, b) for a, b in zip(hooked, plain, strict=True)]
        assert len(set(same)) == 1
    assert module._shared is None  # nothing kept after the last layer read it


def _flux_pipeline(model, clip):
    return diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=clip,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=model,
    )


def test_flux_file_loads_in_diffusers_and_equals_the_merged_weights() -> None:
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft")
    model = tiny_flux(single_layers=0)
    tensors = _network("flux", model, []).state_dict_for_save(torch.float32)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    pipe = _flux_pipeline(model, tiny_clip())
    pipe.load_lora_weights(dict(tensors))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    state = model.state_dict()
    expected = _flux_expected(tensors, 2, 0, 16)
    changed = {k.removesuffix(".weight") for k in state if not torch.equal(state[k], base[k])}
    assert changed == set(expected), sorted(changed ^ set(expected))[:5]
    for layer, delta in expected.items():
        key = layer + ".weight"
        torch.testing.assert_close(state[key], base[key] + delta, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_full_width_flux_file_with_single_blocks_loads_in_diffusers(full_width_flux, tmp_path):
    """A file our backend writes for FLUX at full width (double and single blocks, fused
    ``qkv`` / ``linear1`` rows included) loads with ``FluxPipeline.load_lora_weights`` and
    ``fuse_lora`` adds to every layer what the hand merge says: bf16 weights, so within one bf16
    rounding of ``W + delta`` (the deltas are ~100x that)."""
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft")
    from loraforge.ops.lora_file import write_lora_file

    model = full_width_flux()
    network = _network("flux", model, [])
    with torch.no_grad():  # diffusers casts the factors to bf16: give it bf16-exact ones
        for p in network.parameters():
            p.copy_(p.to(torch.bfloat16))
    path = tmp_path / "flux.safetensors"
    write_lora_file(path, network.state_dict_for_save(torch.float32), network.metadata())
    tensors = load_file(str(path))
    assert tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (21504, 4)
    del network
    base = {k: v.clone() for k, v in model.state_dict().items()}
    pipe = _flux_pipeline(model, tiny_clip())
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    state = model.state_dict()
    changed = {k.removesuffix(".weight") for k in state if not torch.equal(state[k], base[k])}
    checked = set()
    for layer, delta in _flux_deltas(tensors, 1, 1, 3072):
        key = layer + ".weight"
        assert delta.abs().mean() > 0.01
        torch.testing.assert_close(state[key].float(), base[key].float() + delta,
                                   atol=2e-4, rtol=2**-7)  # fmt: skip
        checked.add(layer)
    assert {
        "single_transformer_blocks.0.proj_mlp",
        "single_transformer_blocks.0.proj_out",
    } < checked
    assert changed == checked, sorted(changed ^ checked)[:5]


def test_flux_clip_l_lora_loads_in_diffusers() -> None:
    """``lora_te1_`` keys (CLIP-L). diffusers 0.42 drops alpha on FLUX's text-encoder keys
    (it applies ``up @ down``), so this file has alpha = rank, where every reader agrees."""
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft")
    model, clip = tiny_flux(single_layers=0), tiny_clip()
    tensors = _network("flux", model, [clip, None], alpha=4.0).state_dict_for_save(torch.float32)
    clip_base = {k: v.clone() for k, v in clip.state_dict().items()}
    pipe = _flux_pipeline(model, clip)
    pipe.load_lora_weights(dict(tensors))
    pipe.fuse_lora(components=["transformer", "text_encoder"])
    pipe.unload_lora_weights()
    te_names = {k.split(".")[0] for k in tensors if k.startswith("lora_te1_")}
    assert len(te_names) == 2 * 6  # per layer: q, k, v, out_proj, fc1, fc2
    for key, tensor in clip.state_dict().items():
        path = "text_model." + key.removeprefix("text_model.").removesuffix(".weight")
        name = "lora_te1_" + path.replace(".", "_")
        want = clip_base[key] + _hand_delta(tensors, name) if name in te_names else clip_base[key]
        torch.testing.assert_close(tensor, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("algorithm", "args"), [("dylora", {"unit": 2}), ("lora-fa", {})])
def test_fused_targets_with_dylora_and_lora_fa(algorithm: str, args: dict) -> None:
    model = tiny_flux()
    config = replace(
        section_defaults("network"), backend="kohya", algorithm=algorithm, dim=4, args=args
    )
    network = KohyaBackend().create(config, "flux", model, []).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    inputs = _flux_inputs(model)
    network.apply_to()
    hooked = _run(model, inputs)
    network.merge_into_base()
    torch.testing.assert_close(hooked, _run(model, inputs), atol=1e-5, rtol=1e-4)
    saved = network.state_dict_for_save(torch.float32)
    assert saved["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (7 * 16, 4)
