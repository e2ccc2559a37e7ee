"""Where a file will not load (as trained) in A1111, ComfyUI or Forge: `check LORA` lists it per
UI, and `check RECIPE` warns before training, naming the UI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from loraforge.commands.check import check_recipe

UNET = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
SD_UNET = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"


def _attention(prefix: str, layer: int, projections: str) -> list[str]:
    return [f"{prefix}_text_model_encoder_layers_{layer}_self_attn_{p}_proj" for p in projections]


def _lora(names: list[str], dim: int = 16) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in names:
        tensors[f"{name}.lora_down.weight"] = torch.randn(2, dim)
        tensors[f"{name}.lora_up.weight"] = torch.randn(dim, 2)
        tensors[f"{name}.alpha"] = torch.tensor(1.0)
    return tensors


def _support(cli, synth, tmp_path: Path, tensors, metadata=None) -> dict[str, dict]:
    path = synth.save(tmp_path / "f.safetensors", tensors, metadata)
    result = cli("check", path, "-f", "json")
    (report,) = json.loads(result.out)
    return {s["ui"]: s for s in report["ui_support"]}


def test_a_plain_lora_loads_everywhere(cli, synth, tmp_path) -> None:
    tensors = _lora([SD_UNET, *_attention("lora_te", 0, "kv")])  # SD 1.x: CLIP-L, no fused MHA
    support = _support(cli, synth, tmp_path, tensors, {"ss_base_model_version": "sd_v1"})
    assert {ui: s["status"] for ui, s in support.items()} == dict.fromkeys(
        ("A1111", "ComfyUI", "Forge"), "loads"
    )


def test_ia3_is_loaded_by_a1111_only(cli, synth, tmp_path) -> None:
    tensors = {f"{SD_UNET}.weight": torch.rand(16), f"{SD_UNET}_2.weight": torch.rand(16)}
    support = _support(cli, synth, tmp_path, tensors)
    assert support["A1111"]["status"] == "loads"
    assert support["ComfyUI"]["status"] == support["Forge"]["status"] == "none"
    assert support["ComfyUI"]["applied"] == 0 and support["ComfyUI"]["modules"] == 2
    assert "IA3" in support["ComfyUI"]["gaps"][0]["reason"]


@pytest.mark.parametrize(
    ("prefix", "version"), [("lora_te2", "sdxl_base_v1-0"), ("lora_te", "sd_v2")]
)
def test_a1111_skips_openclip_layers_without_all_of_qkv_out(
    prefix, version, cli, synth, tmp_path
) -> None:
    complete = _attention(prefix, 0, ("q", "k", "v", "out"))
    partial = _attention(prefix, 1, "kv")
    unet = UNET if prefix == "lora_te2" else SD_UNET
    tensors = _lora([unet, *complete, *partial])
    support = _support(cli, synth, tmp_path, tensors, {"ss_base_model_version": version})
    a1111 = support["A1111"]
    assert (a1111["status"], a1111["applied"], a1111["modules"]) == ("partial", 5, 7)
    assert "q, k, v and out" in a1111["gaps"][0]["reason"]
    assert support["ComfyUI"]["status"] == support["Forge"]["status"] == "loads"


def test_oft_is_skipped_by_forge_and_glora_fails_in_a1111(cli, synth, tmp_path) -> None:
    oft = {f"{SD_UNET}.oft_blocks": torch.zeros(4, 4, 4), f"{SD_UNET}.alpha": torch.tensor(0.0)}
    support = _support(cli, synth, tmp_path, oft)
    assert support["Forge"]["status"] == "none" and support["A1111"]["status"] == "loads"
    name = SD_UNET
    glora = {  # lycoris-lora 2+ layout: a1 (in, r), a2 (r, in), b1 (out, r), b2 (r, in)
        f"{name}.a1.weight": torch.randn(12, 2),
        f"{name}.a2.weight": torch.randn(2, 12),
        f"{name}.b1.weight": torch.randn(16, 2),
        f"{name}.b2.weight": torch.randn(2, 12),
        f"{name}.alpha": torch.tensor(1.0),
    }
    support = _support(cli, synth, tmp_path, glora)
    assert support["A1111"]["status"] == "none"
    assert support["A1111"]["gaps"][0]["effect"] == "fails"
    assert support["ComfyUI"]["status"] == support["Forge"]["status"] == "loads"


def test_dora_on_the_output_axis_renders_differently_everywhere(cli, synth, tmp_path) -> None:
    tensors = _lora([SD_UNET])
    tensors[f"{SD_UNET}.dora_scale"] = torch.rand(1, 16)  # input axis: loads as trained
    support = _support(cli, synth, tmp_path, tensors)
    assert {s["status"] for s in support.values()} == {"loads"}
    tensors[f"{SD_UNET}.dora_scale"] = torch.rand(16, 1)
    path = synth.save(tmp_path / "out.safetensors", tensors)
    result = cli("check", path)
    assert result.code == 0  # a warning, not an error
    for ui in ("A1111", "ComfyUI", "Forge"):
        assert f"in {ui}" in result.out and f"{ui} applies other numbers" in result.out
    assert cli("check", path, "--strict").code == 1


def _recipe(tmp_path: Path, network: dict, family: str = "sd1", **model) -> Path:
    doc = {
        "model": {"base": "example/model", "family": family, **model},
        "dataset": {"subsets": [{"dir": "images"}]},
        "network": {"backend": "lycoris", "dim": 16, "alpha": 8, **network},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _loader_warnings(tmp_path: Path, network: dict, family: str = "sd1") -> dict[str, str]:
    report = check_recipe(_recipe(tmp_path, network, family), data=False)  # no images here
    assert not [p for p in report.problems if p.severity == "error"], report.problems
    return {p.path: p.message for p in report.problems if p.path.startswith("network")}


@pytest.mark.parametrize(
    ("network", "field", "names"),
    [
        ({"algorithm": "ia3"}, "network.algorithm", ("ComfyUI and Forge",)),
        ({"algorithm": "diag-oft"}, "network.algorithm", ("Forge",)),
        ({"algorithm": "boft"}, "network.algorithm", ("Forge",)),
        ({"algorithm": "glora"}, "network.algorithm", ("A1111",)),
        (
            {"algorithm": "lora", "args": {"dora_wd": True, "wd_on_output": True}},
            "network.args.wd_on_output",
            ("A1111", "ComfyUI", "Forge"),
        ),
    ],
)
def test_check_warns_when_a_ui_will_not_apply_the_file(tmp_path, network, field, names) -> None:
    warnings = _loader_warnings(tmp_path, network)
    assert list(warnings) == [field]
    assert all(name in warnings[field] for name in names)


def test_check_warns_about_partial_text_encoder_attention_on_openclip(tmp_path) -> None:
    network = {"algorithm": "lora", "args": {"preset": "ia3"}}
    warning = _loader_warnings(tmp_path, network, "sdxl")["network.args.preset"]
    assert "A1111" in warning and "q, k, v and out" in warning
    assert "network.args.preset" not in _loader_warnings(tmp_path, network, "sd1")
    no_te = {**network, "train_text_encoder": False}
    assert "network.args.preset" not in _loader_warnings(tmp_path, no_te, "sdxl")


@pytest.mark.parametrize(
    "network",
    [
        {"backend": "kohya", "algorithm": "locon", "conv_dim": 4},
        {"algorithm": "lora", "args": {"dora_wd": True}},
        {"algorithm": "loha", "args": {"dora_wd": True}},
        {"algorithm": "lokr", "args": {"train_norm": True}},
        {"algorithm": "full"},
    ],
)
def test_files_every_ui_loads_get_no_warning(tmp_path, network) -> None:
    assert _loader_warnings(tmp_path, network) == {}


def test_check_catches_boft_block_sizes_from_the_architecture(tmp_path, cli) -> None:
    path = _recipe(tmp_path, {"algorithm": "boft", "dim": 8, "alpha": None})
    result = cli("check", path, "--no-data", "-f", "json")
    assert result.code == 1
    (report,) = json.loads(result.out)
    (error,) = [p for p in report["problems"] if p["severity"] == "error"]
    dim_line = path.read_text().splitlines().index("  dim: 8") + 1
    assert error["path"] == "network.dim" and error["line"] == dim_line
    assert "width 320" in error["message"] and "10 or more" in error["message"]
    fixed = _recipe(tmp_path, {"algorithm": "boft", "dim": 16, "alpha": None}, family="sdxl")
    report = check_recipe(fixed, data=False)
    assert not [p for p in report.problems if p.severity == "error"]
