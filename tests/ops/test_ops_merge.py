"""Merging: LoRAs into one (concat, exact) and into a state dict, with independent references."""

from __future__ import annotations

import math

import pytest
import torch

from loraforge.errors import LoraFileError
from loraforge.ops.family import detect_family
from loraforge.ops.merge import (
    ExactSpec,
    WeightedLora,
    check_lora_families,
    merge_loras_concat,
    merge_loras_exact,
)
from loraforge.ops.merge_into import TargetRef, check_base_family, merge_into_state_dict
from loraforge.ops.modules import parse_lora

A = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
B = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k"
C = "lora_unet_down_blocks_1_resnets_0_conv2"


def _weighted(tensors, ratio: float, metadata=None, label="x.safetensors") -> WeightedLora:
    parsed = parse_lora(tensors, label)
    return WeightedLora(parsed, ratio, detect_family(parsed.modules, metadata or {}))


def _inputs(synth):
    first = {
        **synth.lora(A, 24, 16, 4, alpha=2, seed=1),
        **synth.lora(C, 24, 8, 4, kernel=3, alpha=4, seed=2),
    }
    second = {**synth.lora(A, 24, 16, 6, alpha=3, seed=3), **synth.lora(B, 24, 16, 2, seed=4)}
    return first, second


def test_concat_is_lossless_and_ratios_may_be_negative(synth) -> None:
    first, second = _inputs(synth)
    result = merge_loras_concat([_weighted(first, 0.8), _weighted(second, -0.5)], torch.float32)
    expected_a = 0.8 * synth.delta(first, A) - 0.5 * synth.delta(second, A)
    torch.testing.assert_close(synth.delta(result.tensors, A), expected_a)
    torch.testing.assert_close(synth.delta(result.tensors, B), -0.5 * synth.delta(second, B))
    torch.testing.assert_close(synth.delta(result.tensors, C), 0.8 * synth.delta(first, C))
    assert result.tensors[f"{A}.lora_down.weight"].shape[0] == 10
    assert float(result.tensors[f"{A}.alpha"]) == 10.0


def test_exact_merge_is_the_best_approximation_of_the_sum(synth) -> None:
    first, second = _inputs(synth)
    result = merge_loras_exact(
        [_weighted(first, 1.0), _weighted(second, 0.7)], ExactSpec(rank=3), torch.float32
    )
    total = synth.delta(first, A) + 0.7 * synth.delta(second, A)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    torch.testing.assert_close(
        synth.delta(result.tensors, A), (u[:, :3] * s[:3]) @ vh[:3], rtol=1e-4, atol=1e-4
    )
    row = next(r for r in result.rows if r.name == A)
    assert row.old_rank == 10 and row.new_rank == 3
    assert math.isclose(row.retained_fro, float(s[:3].norm() / s.norm()), rel_tol=1e-5)
    assert math.isclose(row.largest_discarded, float(s[3]), rel_tol=1e-4)
    # a conv 3x3 module keeps its layout
    assert result.tensors[f"{C}.lora_down.weight"].shape == (3, 8, 3, 3)


def test_exact_merge_sums_lycoris_deltas_densely(synth) -> None:
    w1a, w1b, w2a, w2b = (
        torch.randn(24, 2),
        torch.randn(2, 16),
        torch.randn(24, 2),
        torch.randn(2, 16),
    )
    loha = {
        f"{A}.hada_w1_a": w1a,
        f"{A}.hada_w1_b": w1b,
        f"{A}.hada_w2_a": w2a,
        f"{A}.hada_w2_b": w2b,
        f"{A}.alpha": torch.tensor(1.0),
    }
    lora = synth.lora(A, 24, 16, 4, alpha=4)
    result = merge_loras_exact(
        [_weighted(loha, 1.0), _weighted(lora, -1.0)], ExactSpec(rank=16), torch.float32
    )
    expected = ((w1a @ w1b) * (w2a @ w2b) * 0.5).double() - synth.delta(lora, A)
    torch.testing.assert_close(synth.delta(result.tensors, A), expected, rtol=1e-4, atol=1e-4)


def test_weight_dependent_modules_cannot_become_a_lora(synth) -> None:
    dora = {**synth.lora(A, 24, 16, 4, alpha=4), f"{A}.dora_scale": torch.ones(24, 1)}
    with pytest.raises(LoraFileError, match="depends on the base weights"):
        merge_loras_exact([_weighted(dora, 1.0)], ExactSpec(rank=4), torch.float32)
    loha = {
        f"{A}.hada_w1_a": torch.randn(24, 2),
        f"{A}.hada_w1_b": torch.randn(2, 16),
        f"{A}.hada_w2_a": torch.randn(24, 2),
        f"{A}.hada_w2_b": torch.randn(2, 16),
    }
    with pytest.raises(LoraFileError, match="--mode exact"):
        merge_loras_concat([_weighted(loha, 1.0)], torch.float32)


@pytest.mark.parametrize(
    ("extra", "what"),
    [
        ({f"{C}_norm1.w_norm": torch.ones(8), f"{C}_norm1.b_norm": torch.ones(8)}, "a norm layer"),
        ({f"{B}.diff": torch.ones(24, 16), f"{B}.diff_b": torch.ones(24)}, r"a bias \(diff_b\)"),
    ],
)
def test_norm_and_bias_deltas_cannot_become_a_lora(synth, extra, what) -> None:
    """A LoRA file holds matrix deltas only: exact merging must not drop them silently."""
    tensors = {**synth.lora(A, 24, 16, 4, alpha=4), **extra}
    with pytest.raises(LoraFileError, match=f"changes {what}.*cannot be merged into a LoRA"):
        merge_loras_exact([_weighted(tensors, 1.0)], ExactSpec(rank=4), torch.float32)


def test_shape_and_family_mismatches_name_both_files(synth) -> None:
    small = _weighted(synth.lora(A, 24, 16, 4, alpha=4), 1.0, label="a.safetensors")
    wide = _weighted(synth.lora(A, 24, 32, 4, alpha=4), 1.0, label="b.safetensors")
    with pytest.raises(
        LoraFileError, match=r"a.safetensors: \(24, 16\); b.safetensors: \(24, 32\)"
    ):
        merge_loras_concat([small, wide], torch.float32)
    sd1 = _weighted(
        synth.lora(A, 8, 8, 2, alpha=1), 1.0, {"ss_base_model_version": "sd_v1"}, "sd1.safetensors"
    )
    xl_name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    xl = _weighted(synth.lora(xl_name, 8, 8, 2, alpha=1), 1.0, {}, "xl.safetensors")
    with pytest.raises(
        LoraFileError,
        match=r"xl\.safetensors is an SDXL LoRA but sd1\.safetensors is an SD 1\.x LoRA",
    ):
        check_lora_families([sd1, xl])
    with pytest.raises(
        LoraFileError,
        match=r"xl\.safetensors is an SDXL LoRA but base\.safetensors is an SD 1\.x model",
    ):
        check_base_family(xl, "sd1", "base.safetensors")


def test_merge_into_state_dict_equals_w_plus_ratio_delta(synth) -> None:
    first, second = _inputs(synth)
    state = {
        "a.weight": torch.randn(24, 16, dtype=torch.float16),
        "qkv.weight": torch.randn(72, 16),
        "c.weight": torch.randn(24, 8, 3, 3),
        "untouched": torch.randn(3),
    }
    original = {k: v.clone() for k, v in state.items()}
    refs = {
        A: TargetRef("a.weight"),
        B: TargetRef("qkv.weight", (24, 48)),
        C: TargetRef("c.weight"),
    }
    report = merge_into_state_dict(
        state, [_weighted(first, 0.8), _weighted(second, -0.5)], refs.get
    )
    assert report.merged == (("x.safetensors", 2), ("x.safetensors", 2))
    assert report.skipped == ((), ())
    expected_a = (
        original["a.weight"].double() + 0.8 * synth.delta(first, A) - 0.5 * synth.delta(second, A)
    )
    assert state["a.weight"].dtype == torch.float16
    torch.testing.assert_close(state["a.weight"].double(), expected_a, rtol=2e-3, atol=2e-3)
    expected_qkv = original["qkv.weight"].double().clone()
    expected_qkv[24:48] -= 0.5 * synth.delta(second, B)
    torch.testing.assert_close(state["qkv.weight"].double(), expected_qkv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        state["c.weight"].double(),
        original["c.weight"].double() + 0.8 * synth.delta(first, C),
        rtol=1e-5,
        atol=1e-5,
    )
    assert torch.equal(state["untouched"], original["untouched"])


def test_merge_into_state_dict_skips_modules_the_model_lacks(synth) -> None:
    first, _ = _inputs(synth)  # modules A and C
    state = {"a.weight": torch.randn(24, 16)}
    original = state["a.weight"].clone()
    report = merge_into_state_dict(state, [_weighted(first, 1.0)], {A: TargetRef("a.weight")}.get)
    assert report.merged == (("x.safetensors", 1),)
    assert report.skipped == ((C,),)
    assert report.keys == ("a.weight",)
    torch.testing.assert_close(
        state["a.weight"].double(), original.double() + synth.delta(first, A), rtol=1e-5, atol=1e-5
    )


def test_merge_into_state_dict_refuses_unknown_modules_and_bad_shapes(synth) -> None:
    state = {"a.weight": torch.randn(24, 16)}
    with pytest.raises(LoraFileError, match="none of its 1 modules has a matching layer"):
        merge_into_state_dict(
            state, [_weighted(synth.lora(B, 24, 16, 2), 1.0)], {A: TargetRef("a.weight")}.get
        )
    with pytest.raises(LoraFileError, match=r"does not fit a.weight \(24, 16\)"):
        merge_into_state_dict(
            state, [_weighted(synth.lora(A, 24, 32, 2), 1.0)], {A: TargetRef("a.weight")}.get
        )
