"""FLUX.1 / SD3 LoRA files in the file operations: family detection, ``check LORA``, resize,
merge between LoRAs and into an original-layout (SAI) single file.

The merge-into proof goes through the other layout: a random SAI-layout MMDiT state dict is
converted with diffusers' own single-file converter (``convert_sd3_transformer_checkpoint_to_
diffusers``, which also swaps the pre-only modulation's shift/scale) into a tiny
``SD3Transformer2DModel``; the LoRA our backend trains on that diffusers model, merged into the
SAI weights by name and converted again, must equal the diffusers model with the network merged.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from loraforge.ops.family import detect_family
from loraforge.ops.load_lora import load_lora

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backends"))
from test_backends_transformer_interop import _network, tiny_flux, tiny_sd3

diffusers = pytest.importorskip("diffusers")
H, HEAD_DIM, DEPTH = 16, 8, 3


def _save(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or {})
    return path


def _sai_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random SAI-layout MMDiT for :func:`tiny_sd3` (written from SAI's module tree)."""
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple] = {
        "pos_embed": (1, 64, H),
        "x_embedder.proj.weight": (H, 4, 2, 2),
        "x_embedder.proj.bias": (H,),
        "context_embedder.weight": (H, 32),
        "context_embedder.bias": (H,),
        "final_layer.linear.weight": (16, H),
        "final_layer.linear.bias": (16,),
        "final_layer.adaLN_modulation.1.weight": (2 * H, H),
        "final_layer.adaLN_modulation.1.bias": (2 * H,),
    }
    for name, n_in in (("t_embedder", 256), ("y_embedder", 24)):
        shapes |= {f"{name}.mlp.0.weight": (H, n_in), f"{name}.mlp.0.bias": (H,)}
        shapes |= {f"{name}.mlp.2.weight": (H, H), f"{name}.mlp.2.bias": (H,)}

    def linear(key: str, n_out: int, n_in: int) -> None:
        shapes[key + ".weight"], shapes[key + ".bias"] = (n_out, n_in), (n_out,)

    for i in range(DEPTH):
        last, dual = i == DEPTH - 1, i == 0
        for side in ("context_block", "x_block"):
            b = f"joint_blocks.{i}.{side}."
            attns = ["attn", "attn2"] if side == "x_block" and dual else ["attn"]
            for attn in attns:
                linear(b + attn + ".qkv", 3 * H, H)
                shapes[b + attn + ".ln_q.weight"] = shapes[b + attn + ".ln_k.weight"] = (HEAD_DIM,)
                if not (last and side == "context_block"):
                    linear(b + attn + ".proj", H, H)
            if not (last and side == "context_block"):
                linear(b + "mlp.fc1", 4 * H, H)
                linear(b + "mlp.fc2", H, 4 * H)
            mods = 2 if last and side == "context_block" else 9 if side == "x_block" and dual else 6
            linear(b + "adaLN_modulation.1", mods * H, H)
    return {k: torch.randn(s, generator=g) * 0.3 for k, s in shapes.items()}


def _to_diffusers(sai: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    return convert_sd3_transformer_checkpoint_to_diffusers({k: v.clone() for k, v in sai.items()})


def test_lora_merged_into_a_sai_file_equals_the_network_merged_into_diffusers(tmp_path) -> None:
    from loraforge.ops.base_model import load_base, resolver
    from loraforge.ops.merge import WeightedLora
    from loraforge.ops.merge_into import merge_into_state_dict

    sai = _sai_state()
    model = tiny_sd3()
    model.load_state_dict(_to_diffusers(sai), strict=True)
    network = _network("sd3", model, [], emb_dims="[2,2,2,2,2,2]")
    lora = _save(tmp_path / "sd3.safetensors", network.state_dict_for_save(torch.float32))
    base_file = _save(tmp_path / "sai.safetensors", sai)
    network.apply_to()
    network.merge_into_base()
    want = model.state_dict()

    base = load_base(base_file)
    assert base.family == "sd3"
    report = merge_into_state_dict(
        base.state, [WeightedLora(load_lora(lora).parsed, 1.0)], resolver(base)
    )
    assert report.skipped == ((),)
    got = _to_diffusers(base.state)
    assert set(got) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-4, msg=key)


def _flux_file(tmp_path: Path, **args) -> Path:
    tensors = _network("flux", tiny_flux(), [], **args).state_dict_for_save(torch.float16)
    return _save(tmp_path / "flux.safetensors", tensors, {"ss_base_model_version": "flux1"})


def test_family_from_names_and_metadata(tmp_path) -> None:
    flux = load_lora(_flux_file(tmp_path))
    sd3 = _network("sd3", tiny_sd3(), []).state_dict_for_save(torch.float32)
    sd3_file = load_lora(_save(tmp_path / "sd3.safetensors", sd3))
    assert detect_family(flux.parsed.modules, {}).family == "flux"
    assert detect_family(sd3_file.parsed.modules, {}).family == "sd3"
    te = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": flux.parsed.modules[
            next(iter(flux.parsed.modules))
        ]
    }
    assert detect_family(te, {"ss_base_model_version": "flux1"}).family == "flux"
    assert detect_family(te, {}).family == "sdxl"  # lora_te1_ alone reads as SDXL
    t5 = {"lora_te3_encoder_block_0_layer_0_SelfAttention_q": te[next(iter(te))]}
    assert detect_family(t5, {}).family is None
    assert (
        detect_family(t5, {"modelspec.architecture": "stable-diffusion-3-5-large/lora"}).family
        == "sd3"
    )
    guess = detect_family(flux.parsed.modules, {"ss_base_model_version": "sdxl_base_v1-0"})
    assert guess.family == "flux" and "SDXL" in guess.conflict


@pytest.mark.slow
def test_check_lora_knows_flux_and_sd3_names(cli, tmp_path) -> None:
    good = _flux_file(tmp_path)
    result = cli("check", good, "--format", "json")
    doc = json.loads(result.out)[0]
    assert doc["family"] == "flux" and doc["ok"], doc
    support = {s["ui"]: s for s in doc["ui_support"]}
    assert support["A1111"]["status"] == "none" and support["ComfyUI"]["status"] == "loads"
    tensors = dict(_network("sd3", tiny_sd3(), []).state_dict_for_save(torch.float32))
    down = tensors["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"]
    tensors["lora_unet_joint_blocks_99_x_block_attn_qkv.lora_down.weight"] = down.clone()
    tensors["lora_unet_joint_blocks_99_x_block_attn_qkv.lora_up.weight"] = down.T.clone()
    bad = _save(tmp_path / "bad.safetensors", tensors)
    doc = json.loads(cli("check", bad, "--format", "json").out)[0]
    assert doc["family"] == "sd3" and not doc["ok"]
    assert "joint_blocks_99" in json.dumps(doc["problems"])


def test_resize_and_merge_between_flux_loras(cli, tmp_path, synth) -> None:
    from safetensors.torch import load_file

    first = _flux_file(tmp_path)
    resized = tmp_path / "r.safetensors"
    assert cli("resize", first, "--rank", "2", "-o", resized).code == 0
    small, big = load_file(str(resized)), load_file(str(first))
    name = "lora_unet_single_blocks_0_linear1"
    assert small[f"{name}.lora_down.weight"].shape == (2, 16)
    assert small[f"{name}.lora_up.weight"].shape == (7 * 16, 2)
    assert {k.split(".")[0] for k in small} == {k.split(".")[0] for k in big}
    merged = tmp_path / "m.safetensors"
    code = cli("merge", "--lora", first, "--lora", resized, "--mode", "concat", "-o", merged).code
    assert code == 0
    out = load_file(str(merged))
    want = synth.delta(big, name) + synth.delta(small, name)
    torch.testing.assert_close(synth.delta(out, name), want, atol=2e-2, rtol=2e-2)


def _write_folder(model, family: str, folder: Path) -> Path:
    """A diffusers folder holding only the transformer (enough for merge and extract)."""
    model.save_pretrained(folder / "transformer")
    pipeline = "FluxPipeline" if family == "flux" else "StableDiffusion3Pipeline"
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    return folder


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_merge_into_and_extract_from_diffusers_folders(cli, tmp_path, family, synth) -> None:
    from safetensors.torch import load_file

    model = tiny_flux() if family == "flux" else tiny_sd3()
    base = _write_folder(model, family, tmp_path / "base")
    network = _network(family, model, [])
    tensors = network.state_dict_for_save(torch.float32)
    lora = _save(tmp_path / "l.safetensors", tensors)
    network.apply_to()
    network.merge_into_base()
    want = model.state_dict()
    merged = tmp_path / "merged"
    result = cli("merge", "--base", base, "--lora", lora, "-o", merged)
    assert result.code == 0, result.err
    got = load_file(str(merged / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert set(got) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-4, msg=key)
    extracted = tmp_path / "x.safetensors"
    args = ("--extract", "--base", base, "--tuned", merged, "--rank", "4", "-o", extracted)
    assert cli("merge", *args).code == 0
    out = load_file(str(extracted))
    names = {k.split(".")[0] for k in out}
    assert names == {k.split(".")[0] for k in tensors}
    for name in (
        "lora_unet_single_blocks_0_linear1",
        "lora_unet_joint_blocks_2_context_block_adaLN_modulation_1",
    ):
        if name in names:  # fused / swapped: the original layer's delta comes back
            torch.testing.assert_close(
                synth.delta(out, name), synth.delta(tensors, name), atol=1e-4, rtol=1e-3
            )
