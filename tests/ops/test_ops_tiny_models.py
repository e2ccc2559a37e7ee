"""End to end on the tiny models: merging equals the LoRA forward, extract recovers the LoRA.

The reference is independent of loraforge.ops: LoRA names come from loraforge.models.naming on
the loaded diffusers modules, the LoRA is applied as kohya's forward (``y + ratio · scale ·
up(down(x))``) through hooks, and merged checkpoints are loaded back through diffusers'
single-file converters (loraforge.models.loading).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from loraforge.models.loading import load_model
from loraforge.models.naming import lora_targets


def _targets(model, family: str) -> dict[str, torch.nn.Module]:
    return lora_targets(family, model.unet, model.text_encoders, conv=True)


def _hook(
    targets: dict[str, torch.nn.Module], tensors: dict[str, torch.Tensor], ratio: float
) -> list:
    handles = []
    for name, module in targets.items():
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        scale = ratio * float(tensors[f"{name}.alpha"]) / down.shape[0]

        def forward_hook(mod, args, output, down=down, up=up, scale=scale):
            x = args[0]
            if isinstance(mod, torch.nn.Conv2d):
                hidden = F.conv2d(x, down, None, mod.stride, mod.padding, mod.dilation, mod.groups)
                return output + scale * F.conv2d(hidden, up)
            return output + scale * F.linear(F.linear(x, down), up)

        handles.append(module.register_forward_hook(forward_hook))
    return handles


def _outputs(model, family: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (1, 77), generator=g)
    with torch.no_grad():
        hidden = [
            te(ids, output_hidden_states=True).hidden_states[-2] for te in model.text_encoders
        ]
        context = torch.cat(hidden, dim=-1)
        sample = torch.randn(1, 4, 16, 16, generator=g)
        extra = {}
        if family == "sdxl":
            pooled = model.text_encoders[1](ids).text_embeds
            extra["added_cond_kwargs"] = {
                "text_embeds": pooled,
                "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]]),
            }
        noise = model.unet(sample, torch.tensor([500]), context, **extra).sample
    return [*hidden, noise]


def _lora_for(model, family: str, synth, *, seed: int = 0) -> dict[str, torch.Tensor]:
    weights = {name: module.weight for name, module in _targets(model, family).items()}
    return synth.for_weights(weights, 2, alpha=1.0, seed=seed, up_scale=0.2)


def _assert_same(
    got: list[torch.Tensor], want: list[torch.Tensor], before: list[torch.Tensor]
) -> None:
    for g, w, b in zip(got, want, before, strict=True):
        assert not torch.allclose(w, b, atol=1e-4), "the LoRA must change the output"
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


_VERSIONS = {"sd1": "sd_v1", "sd2-v": "sd_v2_v", "sdxl": "sdxl_base_v1-0"}


@pytest.mark.parametrize("family", ["sd1", "sd2-v", "sdxl"])
def test_merge_into_folder_and_single_file_equals_lora_forward(
    family, synth, cli, tmp_path, request
) -> None:
    # SD 2.x single files fuse the text encoder's q/k/v (OpenCLIP in_proj): rows are merged.
    folder = request.getfixturevalue(f"tiny_{family.replace('-', '')}_dir")
    single = request.getfixturevalue(f"tiny_{family.replace('-', '')}_file")
    original = load_model(str(folder))
    lora = _lora_for(original, family, synth)
    version = _VERSIONS[family]
    lora_path = synth.save(tmp_path / "lora.safetensors", lora, {"ss_base_model_version": version})
    before = _outputs(original, family)
    handles = _hook(_targets(original, family), lora, 0.7)
    want = _outputs(original, family)
    for handle in handles:
        handle.remove()

    result = cli("merge", "--base", folder, "--lora", f"{lora_path}:0.7", "-o", tmp_path / "merged")
    assert result.code == 0, result.err
    _assert_same(_outputs(load_model(str(tmp_path / "merged")), family), want, before)
    assert (tmp_path / "merged" / "vae").is_dir() and (tmp_path / "merged" / "tokenizer").is_dir()

    result = cli(
        "merge",
        "--base",
        single,
        "--lora",
        f"{lora_path}:0.7",
        "-o",
        tmp_path / "merged.safetensors",
        "-f",
        "json",
    )
    assert result.code == 0, result.err
    assert json.loads(result.out)["family"] == family.removesuffix("-v")
    _assert_same(_outputs(load_model(str(tmp_path / "merged.safetensors")), family), want, before)


def test_extract_recovers_the_merged_lora(synth, cli, tmp_path, tiny_sd1_dir) -> None:
    original = load_model(str(tiny_sd1_dir))
    lora = _lora_for(original, "sd1", synth, seed=3)
    lora_path = synth.save(tmp_path / "lora.safetensors", lora, {"ss_base_model_version": "sd_v1"})
    assert cli("merge", "-b", tiny_sd1_dir, "-l", lora_path, "-o", tmp_path / "tuned").code == 0
    out = tmp_path / "extracted.safetensors"
    result = cli(
        "merge",
        "--extract",
        "--base",
        tiny_sd1_dir,
        "--tuned",
        tmp_path / "tuned",
        "--rank",
        "2",
        "--conv-rank",
        "2",
        "--save-precision",
        "fp32",
        "-o",
        out,
    )
    assert result.code == 0, result.err
    from loraforge.ops.lora_file import read_lora_file

    extracted = read_lora_file(out)
    names = {k.split(".")[0] for k in lora}
    assert {k.split(".")[0] for k in extracted.tensors} == names
    for name in names:
        torch.testing.assert_close(
            synth.delta(extracted.tensors, name), synth.delta(lora, name), rtol=1e-3, atol=1e-4
        )
    assert extracted.metadata["ss_network_module"] == "networks.lora"
    assert extracted.metadata["ss_base_model_version"] == "sd_v1"


def test_family_mismatch_and_unknown_layers_are_refused(
    synth, cli, tmp_path, tiny_sd1_dir, tiny_sdxl_file
) -> None:
    sd1 = load_model(str(tiny_sd1_dir))
    lora = _lora_for(sd1, "sd1", synth)
    sd1_lora = synth.save(tmp_path / "sd1.safetensors", lora, {"ss_base_model_version": "sd_v1"})
    result = cli(
        "merge", "--base", tiny_sdxl_file, "--lora", sd1_lora, "-o", tmp_path / "x.safetensors"
    )
    assert result.code == 2
    assert "is an SD 1.x LoRA but" in result.err and "SDXL model" in result.err
    assert not (tmp_path / "x.safetensors").exists()
    # without metadata the family is unknown; the names then do not match the SDXL layers
    bare = synth.save(tmp_path / "bare.safetensors", lora)
    result = cli(
        "merge", "--base", tiny_sdxl_file, "--lora", bare, "-o", tmp_path / "x.safetensors"
    )
    assert result.code == 2 and "none of its" in result.err and "has a matching layer" in result.err
    assert "Traceback" not in result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.safetensors", "sd1.safetensors"]


def test_merge_into_copied_folder_with_force_replaces_it(
    synth, cli, tmp_path, tiny_sd1_dir
) -> None:
    sd1 = load_model(str(tiny_sd1_dir))
    lora_path = synth.save(
        tmp_path / "l.safetensors", _lora_for(sd1, "sd1", synth), {"ss_base_model_version": "sd_v1"}
    )
    out = tmp_path / "out"
    shutil.copytree(tiny_sd1_dir, out)
    assert cli("merge", "-b", tiny_sd1_dir, "-l", lora_path, "-o", out).code == 2
    assert cli("merge", "-b", tiny_sd1_dir, "-l", lora_path, "-o", out, "--force").code == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert (
        cli("merge", "-b", tiny_sd1_dir, "-l", lora_path, "-o", tmp_path / "x.safetensors").code
        == 2
    )


def test_merge_into_skips_modules_the_model_lacks_with_a_warning(
    synth, cli, tmp_path, tiny_sd1_dir
) -> None:
    # SD 1.x's CLIPTextModel has no text projection: that module is skipped, the rest merged.
    original = load_model(str(tiny_sd1_dir))
    lora = _lora_for(original, "sd1", synth)
    stray = "lora_te_text_projection"
    lora_path = synth.save(
        tmp_path / "lora.safetensors",
        {**lora, **synth.lora(stray, 32, 32, 2)},
        {"ss_base_model_version": "sd_v1"},
    )
    before = _outputs(original, "sd1")
    handles = _hook(_targets(original, "sd1"), lora, 1.0)
    want = _outputs(original, "sd1")
    for handle in handles:
        handle.remove()

    result = cli("merge", "-b", tiny_sd1_dir, "-l", lora_path, "-o", tmp_path / "m", "-f", "json")
    assert result.code == 0, result.err
    assert "1 module(s) have no matching layer" in result.err and stray in result.err
    assert json.loads(result.out)["loras"][0]["skipped_modules"] == [stray]
    _assert_same(_outputs(load_model(str(tmp_path / "m")), "sd1"), want, before)
