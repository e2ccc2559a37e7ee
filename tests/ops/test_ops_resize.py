"""Resize: Eckart–Young optimality, the dynamic rank rules, alpha and metadata."""

from __future__ import annotations

import json
import math

import pytest
import torch

from loraforge.errors import LoraFileError
from loraforge.ops.modules import parse_lora
from loraforge.ops.resize import ResizeSpec, resize_lora, resized_metadata
from loraforge.ops.svd import choose_rank

LIN = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2"
CONV = "lora_unet_up_blocks_1_resnets_0_conv1"
PW = "lora_unet_up_blocks_1_attentions_0_proj_in"


def _svd(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(delta.reshape(delta.shape[0], -1).double(), full_matrices=False)


@pytest.mark.parametrize(("name", "kernel"), [(LIN, None), (CONV, 3), (PW, 1)])
def test_resized_delta_is_the_best_rank_k_approximation(
    synth, name: str, kernel: int | None
) -> None:
    tensors = synth.lora(name, 40, 24, 16, kernel=kernel, alpha=4.0)
    original = synth.delta(tensors, name)
    result = resize_lora(parse_lora(tensors), ResizeSpec(rank=5))
    resized = synth.delta(result.tensors, name)
    assert resized.shape == original.shape
    u, s, vh = _svd(original)
    best = (u[:, :5] * s[:5]) @ vh[:5]
    torch.testing.assert_close(resized.reshape(best.shape), best, rtol=0, atol=1e-4 * float(s[0]))
    error = (original - resized).reshape(best.shape)
    # Eckart–Young: spectral error = sigma_6, Frobenius error = sqrt(sum of the dropped sigma^2)
    assert math.isclose(float(torch.linalg.matrix_norm(error, 2)), float(s[5]), rel_tol=1e-4)
    assert math.isclose(float(error.norm()), float(s[5:].norm()), rel_tol=1e-4)
    row = result.rows[0]
    assert (row.old_rank, row.new_rank, row.new_alpha) == (16, 5, 4.0 / 16 * 5)
    assert math.isclose(row.largest_discarded, float(s[5]), rel_tol=1e-4)
    assert math.isclose(row.retained_fro, float(s[:5].norm() / s.norm()), rel_tol=1e-6)
    assert result.tensors[f"{name}.lora_up.weight"].shape[1] == 5


def test_lora_mid_is_resized_to_a_plain_locon(synth) -> None:
    g = torch.Generator().manual_seed(3)
    tensors = {
        f"{CONV}.lora_down.weight": torch.randn(6, 8, 1, 1, generator=g),
        f"{CONV}.lora_mid.weight": torch.randn(6, 6, 3, 3, generator=g),
        f"{CONV}.lora_up.weight": torch.randn(10, 6, 1, 1, generator=g),
        f"{CONV}.alpha": torch.tensor(3.0),
    }
    mid, down, up = (
        tensors[f"{CONV}.{k}"].double()
        for k in ("lora_mid.weight", "lora_down.weight", "lora_up.weight")
    )
    original = torch.einsum("mnhw,ni,om->oihw", mid, down[:, :, 0, 0], up[:, :, 0, 0]) * 0.5
    result = resize_lora(parse_lora(tensors), ResizeSpec(rank=6))
    assert result.tensors[f"{CONV}.lora_down.weight"].shape == (6, 8, 3, 3)
    torch.testing.assert_close(synth.delta(result.tensors, CONV), original, rtol=1e-4, atol=1e-4)


def _reference_rank(s: list[float], method: str, p: float, cap: int) -> int:
    """The cut-off rules written as plain loops over the singular values."""
    if method == "sv_ratio":
        k = sum(1 for x in s if x >= s[0] / p)
    else:
        values = [x * x for x in s] if method == "sv_fro" else list(s)
        target = (p * p if method == "sv_fro" else p) * sum(values)
        k, acc = 0, 0.0
        while k < len(values) and acc < target * (1 - 1e-12):
            acc += values[k]
            k += 1
    return max(1, min(k, cap))


@pytest.mark.parametrize("method", ["sv_ratio", "sv_fro", "sv_cumulative"])
@pytest.mark.parametrize("seed", range(4))
def test_dynamic_rank_matches_an_independent_cut_off(synth, method: str, seed: int) -> None:
    params = {
        "sv_ratio": [1.5, 4.0, 20.0],
        "sv_fro": [0.5, 0.9, 0.99],
        "sv_cumulative": [0.3, 0.7, 0.95],
    }
    tensors = synth.lora(LIN, 48, 32, 24, alpha=8, seed=seed)
    s = _svd(synth.delta(tensors, LIN))[1][:24].tolist()
    for p in params[method]:
        result = resize_lora(parse_lora(tensors), ResizeSpec(rank=20, method=method, param=p))
        assert result.rows[0].new_rank == _reference_rank(s, method, p, 20), (method, p)


def _sd_scripts_sv_fro_rank(s: torch.Tensor, target: float) -> int:
    """networks/resize_lora.py: index_sv_fro, then rank_resize's extra ``+ 1``."""
    squared = s.pow(2)
    cumulative = torch.cumsum(squared, dim=0) / float(torch.sum(squared))
    index = int(torch.searchsorted(cumulative, target**2)) + 1
    index = max(1, min(index, len(s) - 1))
    return index + 1


def test_sd_scripts_off_by_one_is_fixed() -> None:
    # sv_fro 0.9: the first two values already hold 0.9² of the squared norm
    s = torch.tensor([3.0, 1.5, 0.2, 0.1])
    assert (9 + 2.25) / (9 + 2.25 + 0.04 + 0.01) >= 0.81
    assert _sd_scripts_sv_fro_rank(s, 0.9) == 3
    assert choose_rank(s, "sv_fro", 0.9, 8) == 2
    assert choose_rank(s, "sv_cumulative", (3 + 1.5) / 4.8, 8) == 2
    assert choose_rank(s, "sv_ratio", 2.0, 8) == 2  # keeps 3.0 and 1.5 (= 3.0 / 2)
    assert choose_rank(s, "sv_fro", 1.0, 8) == 4 and choose_rank(s, "sv_fro", 0.1, 8) == 1
    assert choose_rank(torch.zeros(4), "sv_fro", 0.9, 8) == 1


def test_dynamic_result_is_capped_and_metadata_says_dynamic(synth) -> None:
    tensors = {
        **synth.lora(LIN, 48, 32, 16, alpha=8),
        **synth.lora(PW, 48, 32, 16, alpha=8, seed=5),
    }
    tensors[f"{PW}.lora_up.weight"][:, 3:] = 0.0  # a rank-3 module
    spec = ResizeSpec(rank=6, method="sv_fro", param=0.999)
    result = resize_lora(parse_lora(tensors), spec)
    ranks = {r.name: r.new_rank for r in result.rows}
    assert ranks == {LIN: 6, PW: 3}
    meta = resized_metadata({"ss_training_comment": "mine", "loraforge_recipe": "{}"}, result, spec)
    assert meta["ss_network_dim"] == meta["ss_network_alpha"] == "Dynamic"
    assert meta["ss_training_comment"].startswith("Dynamic resize with sv_fro: 0.999 from 16")
    assert meta["ss_training_comment"].endswith("; mine") and meta["loraforge_recipe"] == "{}"


def test_fixed_resize_metadata_and_conv_rank(synth) -> None:
    tensors = {
        **synth.lora(LIN, 40, 24, 16, alpha=16),
        **synth.lora(CONV, 40, 24, 16, kernel=3, alpha=8),
    }
    spec = ResizeSpec(rank=8, conv_rank=4)
    result = resize_lora(parse_lora(tensors), spec)
    meta = resized_metadata(
        {"ss_network_args": json.dumps({"conv_dim": "16", "algo": "x"})}, result, spec
    )
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("8", "8.0")
    assert json.loads(meta["ss_network_args"]) == {
        "conv_dim": "4",
        "conv_alpha": "2.0",
        "algo": "x",
    }
    assert meta["ss_training_comment"] == "dimension is resized from 16 to 8 (conv: 4) by loraforge"


def test_fp16_output_keeps_the_effective_scale(synth) -> None:
    tensors = synth.lora(LIN, 32, 32, 12, alpha=7.0, dtype=torch.float16, up_scale=0.01)
    # alpha' = 7/12 * 5 is not representable in fp16: up absorbs the rounding
    result = resize_lora(parse_lora(tensors), ResizeSpec(rank=5))
    assert result.tensors[f"{LIN}.alpha"].dtype == torch.float16
    resized = synth.delta(result.tensors, LIN)
    u, s, vh = _svd(synth.delta(tensors, LIN))
    best = (u[:, :5] * s[:5]) @ vh[:5]
    assert float((resized - best).norm() / best.norm()) < 2e-3


def test_batched_and_one_at_a_time_agree(synth) -> None:
    tensors = {}
    for i in range(5):
        tensors.update(synth.lora(f"{LIN}{i}", 24, 16, 8, alpha=4, seed=i))
    parsed = parse_lora(tensors)
    a = resize_lora(parsed, ResizeSpec(rank=3))
    b = resize_lora(parsed, ResizeSpec(rank=3, batched=False))
    for i in range(5):
        torch.testing.assert_close(
            synth.delta(a.tensors, f"{LIN}{i}"), synth.delta(b.tensors, f"{LIN}{i}")
        )


def test_resize_refuses_lycoris_algorithms(synth) -> None:
    tensors = {
        f"{LIN}.hada_w1_a": torch.randn(8, 2),
        f"{LIN}.hada_w1_b": torch.randn(2, 8),
        f"{LIN}.hada_w2_a": torch.randn(8, 2),
        f"{LIN}.hada_w2_b": torch.randn(2, 8),
    }
    with pytest.raises(LoraFileError, match=r"LoRA/LoCon only.*loha") as info:
        resize_lora(parse_lora(tensors), ResizeSpec(rank=2))
    assert "--extract" in str(info.value)


def test_all_zero_module_becomes_rank_one_zero(synth) -> None:
    tensors = synth.lora(LIN, 16, 16, 8, alpha=8)
    tensors[f"{LIN}.lora_up.weight"].zero_()
    result = resize_lora(parse_lora(tensors), ResizeSpec(rank=4, method="sv_fro", param=0.9))
    assert result.rows[0].new_rank == 1 and result.rows[0].retained_fro == 1.0
    assert not synth.delta(result.tensors, LIN).any()


def test_resize_of_a_trained_file_does_not_append_its_none_comment(synth) -> None:
    """sd-scripts and loraforge's training write ``ss_training_comment: "None"`` for no comment."""
    result = resize_lora(parse_lora(synth.lora(LIN, 40, 24, 16, alpha=16)), ResizeSpec(rank=8))
    meta = resized_metadata({"ss_training_comment": "None"}, result, ResizeSpec(rank=8))
    assert meta["ss_training_comment"] == "dimension is resized from 16 to 8 by loraforge"
