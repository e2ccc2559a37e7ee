"""Extract (LoRA from a weight difference) and inspect (what `check` reports about a file)."""

from __future__ import annotations

import json

import pytest
import torch

from loraforge.errors import LoraFileError
from loraforge.ops.extract import ExtractSpec, extract_lora
from loraforge.ops.inspect import inspect_lora
from loraforge.ops.lora_file import LoraFile, read_lora_file, write_lora_file

LIN = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v"
CONV = "lora_unet_mid_block_resnets_0_conv1"
TE = "lora_te_text_model_encoder_layers_0_mlp_fc1"


def _low_rank(out: int, inn: int, rank: int, seed: int, kernel: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(out, rank, generator=g) @ torch.randn(
        rank, inn * (kernel or 1) ** 2, generator=g
    )
    return delta.reshape(out, inn, kernel, kernel) if kernel else delta


def test_extract_recovers_a_known_low_rank_difference(synth) -> None:
    base = {LIN: torch.randn(32, 24), CONV: torch.randn(16, 8, 3, 3), TE: torch.randn(20, 12)}
    delta = {
        LIN: _low_rank(32, 24, 3, 1),
        CONV: _low_rank(16, 8, 2, 2, kernel=3),
        TE: _low_rank(20, 12, 4, 3) * 0.1,
    }
    pairs = {n: (w, w + delta[n]) for n, w in base.items()}
    result = extract_lora(pairs, ExtractSpec(rank=4, conv_rank=2, save_dtype=torch.float32))
    for name in base:
        torch.testing.assert_close(
            synth.delta(result.tensors, name), delta[name].double(), rtol=1e-4, atol=1e-4
        )
        assert (
            float(result.tensors[f"{name}.alpha"])
            == result.tensors[f"{name}.lora_down.weight"].shape[0]
        )
    assert {r.name: r.new_rank for r in result.rows} == {LIN: 4, CONV: 2, TE: 4}
    assert next(r for r in result.rows if r.name == LIN).retained_fro == pytest.approx(1.0)


def test_extract_skips_convs_without_conv_rank_and_unchanged_text_encoders() -> None:
    base = {LIN: torch.randn(32, 24), CONV: torch.randn(16, 8, 3, 3), TE: torch.randn(20, 12)}
    tuned = {LIN: base[LIN] + _low_rank(32, 24, 3, 1), CONV: base[CONV] + 1.0, TE: base[TE] + 1e-4}
    result = extract_lora({n: (base[n], tuned[n]) for n in base}, ExtractSpec(rank=4))
    assert [r.name for r in result.rows] == [LIN]
    assert result.skipped == (("lora_te", "text encoder unchanged (max |ΔW| <= 0.01)"),)
    with pytest.raises(LoraFileError, match="nothing to extract"):
        extract_lora({LIN: (base[LIN], base[LIN].clone())}, ExtractSpec(rank=4))
    with pytest.raises(LoraFileError, match="base weight is"):
        extract_lora({LIN: (base[LIN], torch.randn(32, 20))}, ExtractSpec(rank=4))


def test_extract_clamp_quantile_bounds_the_factors() -> None:
    base = torch.zeros(64, 64)
    tuned = _low_rank(64, 64, 4, 7)
    result = extract_lora(
        {LIN: (base, tuned)}, ExtractSpec(rank=4, clamp_quantile=0.9, save_dtype=torch.float32)
    )
    up = result.tensors[f"{LIN}.lora_up.weight"]
    u, s, vh = torch.linalg.svd(tuned)
    us, vh = u[:, :4] * s[:4], vh[:4]
    # sd-scripts' rule: clamp both factors to the quantile of their values taken together
    high = float(torch.quantile(torch.cat([us.flatten(), vh.flatten()]), 0.9))
    assert float(up.abs().max()) == pytest.approx(high, rel=1e-4)
    assert float(us.abs().max()) > high


def _file(tensors, metadata=None) -> LoraFile:
    return LoraFile(dict(tensors), dict(metadata or {}), None)


def test_inspect_flags_nan_and_zero_tensors(synth) -> None:
    tensors = {
        **synth.lora(LIN, 8, 8, 2, alpha=1),
        **synth.lora(CONV, 8, 8, 2, kernel=3, alpha=1),
        **synth.lora(TE, 8, 8, 2, alpha=1),
    }
    tensors[f"{LIN}.lora_down.weight"][0, 0] = float("nan")
    tensors[f"{TE}.lora_up.weight"].zero_()
    report = inspect_lora(_file(tensors))
    assert report.broken
    errors = [p for p in report.problems if p.severity == "error"]
    assert [(p.module, p.message) for p in errors] == [(LIN, "has NaN or infinite values")]
    assert any("all-zero factor" in p.message for p in report.warnings)
    stats = {s.name: s for s in report.modules}
    assert stats[LIN].norm is None and stats[TE].zero and stats[CONV].kind == "conv3x3"
    assert report.algorithm == "locon"


def test_last_text_encoder_layer_zero_is_expected_with_clip_skip_2(synth) -> None:
    tensors = {}
    for layer in range(3):
        for proj in ("q_proj", "k_proj"):
            name = f"lora_te_text_model_encoder_layers_{layer}_self_attn_{proj}"
            tensors.update(synth.lora(name, 8, 8, 2, alpha=1, seed=layer))
            if layer == 2:
                tensors[f"{name}.lora_up.weight"].zero_()
    report = inspect_lora(_file(tensors, {"ss_clip_skip": "2"}))
    assert not report.warnings and not report.broken
    assert "expected with clip_skip 2" in report.notes[0]
    report = inspect_lora(_file(tensors, {"ss_clip_skip": "1"}))
    assert any("all-zero" in p.message for p in report.warnings)


def test_inspect_names_modules_readers_will_not_load(synth) -> None:
    tensors = {
        **synth.lora(LIN, 8, 8, 2, alpha=1),
        **synth.lora("lora_te_encoder_layers_0_mlp_fc1", 8, 8, 2, alpha=1),
    }
    report = inspect_lora(_file(tensors, {"ss_base_model_version": "sd_v1"}))
    assert any(
        "without 'text_model'" in p.message for p in report.problems if p.severity == "error"
    )
    known = {LIN, TE}
    report = inspect_lora(
        _file(
            {
                **synth.lora(LIN, 8, 8, 2, alpha=1),
                **synth.lora("lora_unet_bogus", 8, 8, 2, alpha=1),
            },
            {"ss_base_model_version": "sd_v1"},
        ),
        lambda family, conv: (known, {LIN, TE}),
    )
    assert any(
        "match no layer" in p.message and "lora_unet_bogus" in p.message for p in report.problems
    )
    assert report.coverage == (("unet", 2, 1), ("te", 0, 1))


def test_metadata_summary_and_hash_check(tmp_path, synth) -> None:
    tensors = synth.lora(LIN, 8, 8, 2, alpha=1)
    frequency = {"10_sks dog": {"sks dog": 10, "grass": 4}, "2_cat": {"grass": 3, "sky": 1}}
    meta = {
        "ss_tag_frequency": json.dumps(frequency),
        "ss_dataset_dirs": json.dumps({"10_sks dog": {"n_repeats": 10}, "2_cat": {"n_repeats": 2}}),
        "ss_steps": "1200",
        "ss_network_dim": "2",
        "loraforge_recipe": "{}",
    }
    write_lora_file(tmp_path / "a.safetensors", tensors, meta)
    report = inspect_lora(read_lora_file(tmp_path / "a.safetensors"))
    m = report.metadata
    assert m.top_tags == (("sks dog", 10), ("grass", 7), ("sky", 1))
    assert (m.trigger_phrase, m.trigger_source) == ("sks dog, cat", "dataset folder names")
    assert m.steps == "1200" and m.recipe_embedded and m.hash_ok is True
    edited = read_lora_file(tmp_path / "a.safetensors")
    edited.tensors[f"{LIN}.alpha"] = torch.tensor(2.0)
    assert any("sshs_model_hash" in p.message for p in inspect_lora(edited).warnings)
    with_trigger = inspect_lora(_file(tensors, {"modelspec.trigger_phrase": "ohwx"})).metadata
    assert (with_trigger.trigger_phrase, with_trigger.trigger_source) == (
        "ohwx",
        "modelspec.trigger_phrase",
    )


def test_metadata_summary_has_no_none_comment_and_one_resolution_format(synth) -> None:
    tensors = synth.lora(LIN, 8, 8, 2, alpha=1)
    trained = {"ss_training_comment": "None", "ss_resolution": "(96, 96)"}
    m = inspect_lora(_file(tensors, trained)).metadata
    assert m.comment is None and m.resolution == "96x96"
    m = inspect_lora(_file(tensors, {"modelspec.resolution": "1024x768"})).metadata
    assert m.resolution == "1024x768"
    m = inspect_lora(_file(tensors, {"ss_training_comment": "my notes"})).metadata
    assert m.comment == "my notes"
