"""merge --base applies everything a full or train_norm file holds: ``diff`` and ``diff_b`` of full
modules (bias included), ``w_norm``/``b_norm`` of norm modules, and the report counts them.

The reference is computed here, on the loaded diffusers modules: ``W + ratio · diff``,
``b + ratio · diff_b``, ``γ + ratio · w_norm``, ``β + ratio · b_norm`` (ComfyUI's ``diff`` patches,
A1111's ``network_full``/``network_norm``), with the layers named by loraforge.models.naming.
"""

from __future__ import annotations

import json

import pytest
import torch

from loraforge.models.loading import load_model
from loraforge.models.naming import text_encoder_lora_name, unet_lora_name

RATIO = 0.7
_VERSIONS = {"sd1": "sd_v1", "sd2-v": "sd_v2_v", "sdxl": "sdxl_base_v1-0"}


def _lycoris_file(model, family: str) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
    """Norm modules on every UNet GroupNorm/LayerNorm, full modules (with diff_b) on the
    feed-forward outputs and on the first text-encoder layer's q_proj (fused rows in an SD 2.x
    single file). Returns the tensors and ``{name: (root, path, weight delta, bias delta)}``."""
    g = torch.Generator().manual_seed(4)
    config = dict(model.unet.config) if family == "sdxl" else None
    tensors: dict[str, torch.Tensor] = {}
    expected: dict[str, tuple] = {}
    for path, module in model.unet.named_modules():
        if isinstance(module, torch.nn.GroupNorm | torch.nn.LayerNorm):
            name = unet_lora_name(family, path, unet_config=config)
            w, b = (torch.randn(module.weight.shape, generator=g) * 0.1 for _ in range(2))
            tensors |= {f"{name}.w_norm": w, f"{name}.b_norm": b}
            expected[name] = ("unet", path, w, b)
        elif path.endswith("ff.net.2"):
            name = unet_lora_name(family, path, unet_config=config)
            d = torch.randn(module.weight.shape, generator=g) * 0.1
            db = torch.randn(module.bias.shape, generator=g) * 0.1
            tensors |= {f"{name}.diff": d, f"{name}.diff_b": db}
            expected[name] = ("unet", path, d, db)
    encoder = model.text_encoders[-1]
    index = len(model.text_encoders) - 1
    path = next(p for p, _ in encoder.named_modules() if p.endswith("layers.0.self_attn.q_proj"))
    layer = encoder.get_submodule(path)
    name = text_encoder_lora_name(family, index, path)
    d = torch.randn(layer.weight.shape, generator=g) * 0.1
    db = torch.randn(layer.bias.shape, generator=g) * 0.1
    tensors |= {f"{name}.diff": d, f"{name}.diff_b": db}
    expected[name] = (index, path, d, db)
    return tensors, expected


def _module(model, root, path: str) -> torch.nn.Module:
    owner = model.unet if root == "unet" else model.text_encoders[root]
    return owner.get_submodule(path)


@pytest.mark.parametrize("family", ["sd1", "sd2-v", "sdxl"])
def test_full_and_norm_modules_merge_with_their_biases(
    family, synth, cli, tmp_path, request
) -> None:
    key = family.replace("-", "")
    folder = request.getfixturevalue(f"tiny_{key}_dir")
    single = request.getfixturevalue(f"tiny_{key}_file")
    original = load_model(str(folder))
    tensors, expected = _lycoris_file(original, family)
    norms = sum(1 for n in expected if f"{n}.w_norm" in tensors)
    assert norms > 10  # GroupNorms of the ResNets and transformers, LayerNorms of the blocks
    lora = synth.save(
        tmp_path / "lyco.safetensors", tensors, {"ss_base_model_version": _VERSIONS[family]}
    )
    for base, out in ((folder, tmp_path / "merged"), (single, tmp_path / "merged.safetensors")):
        result = cli("merge", "-b", base, "-l", f"{lora}:{RATIO}", "-o", out, "-f", "json")
        assert result.code == 0, result.err
        row = json.loads(result.out)["loras"][0]
        assert (row["modules"], row["bias_deltas"]) == (len(expected), len(expected))
        assert row["skipped_modules"] == [] and row["unused_tensors"] == []
        assert "norm" in row["algorithm"] and "full" in row["algorithm"]
        merged = load_model(str(out))
        for name, (root, path, weight_delta, bias_delta) in expected.items():
            before, after = _module(original, root, path), _module(merged, root, path)
            torch.testing.assert_close(
                after.weight, before.weight + RATIO * weight_delta, rtol=0, atol=1e-5, msg=name
            )
            torch.testing.assert_close(
                after.bias, before.bias + RATIO * bias_delta, rtol=0, atol=1e-5, msg=name
            )


def test_unused_tensors_are_named_not_dropped_silently(synth, cli, tmp_path, tiny_sd1_dir) -> None:
    original = load_model(str(tiny_sd1_dir))
    tensors, _ = _lycoris_file(original, "sd1")
    name = next(k.split(".")[0] for k in tensors if k.endswith(".diff"))
    tensors[f"{name}.mystery"] = torch.ones(3)
    tensors["emb_params.clip_l"] = torch.ones(2, 3)  # e.g. an embedding bundled by sd-scripts
    lora = synth.save(tmp_path / "l.safetensors", tensors, {"ss_base_model_version": "sd_v1"})
    result = cli("merge", "-b", tiny_sd1_dir, "-l", lora, "-o", tmp_path / "m", "-f", "json")
    assert result.code == 0, result.err
    assert "2 tensor(s) were not merged" in result.err
    unused = json.loads(result.out)["loras"][0]["unused_tensors"]
    assert sorted(unused) == sorted([f"{name}.mystery", "emb_params.clip_l"])


def test_a_bias_delta_for_a_layer_without_bias_is_refused(
    synth, cli, tmp_path, tiny_sd1_dir
) -> None:
    original = load_model(str(tiny_sd1_dir))
    path = next(p for p, _ in original.unet.named_modules() if p.endswith("attn1.to_q"))
    layer = original.unet.get_submodule(path)
    assert layer.bias is None
    name = unet_lora_name("sd1", path)
    tensors = {f"{name}.diff": torch.zeros_like(layer.weight), f"{name}.diff_b": torch.ones(3)}
    lora = synth.save(tmp_path / "l.safetensors", tensors, {"ss_base_model_version": "sd_v1"})
    result = cli("merge", "-b", tiny_sd1_dir, "-l", lora, "-o", tmp_path / "m")
    assert result.code == 2 and "has no bias" in result.err and name in result.err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("version", "names"),
    [
        (
            "sd_v1",
            (
                "lora_unet_down_blocks_0_attentions_0_norm",
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_norm1",
                "lora_unet_up_blocks_3_resnets_2_norm2",
            ),
        ),
        pytest.param(
            "sdxl_base_v1-0",
            (
                "lora_unet_input_blocks_4_1_norm",
                "lora_unet_input_blocks_4_1_transformer_blocks_1_norm3",
                "lora_unet_output_blocks_8_0_in_layers_0",
            ),
            marks=pytest.mark.slow,
        ),
    ],
)
def test_check_knows_the_norm_layers_of_the_full_architectures(
    version, names, synth, cli, tmp_path
) -> None:
    """train_norm modules are layers of the published SD 1.5 / SDXL architectures, not errors."""
    tensors = {}
    for name in names:
        tensors |= {f"{name}.w_norm": torch.zeros(320), f"{name}.b_norm": torch.zeros(320)}
    path = synth.save(tmp_path / "norms.safetensors", tensors, {"ss_base_model_version": version})
    result = cli("check", path, "-f", "json")
    (report,) = json.loads(result.out)
    assert result.code == 0 and report["ok"], report["problems"]
    assert report["algorithm"] == "norm"
    assert not [p for p in report["problems"] if "match no layer" in p["message"]]
