"""Max-norm regularisation against NumPy computations of the LoRA delta norm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loraforge.training.maxnorm import apply_max_norm_regularization, lora_delta


def lora(
    prefix: str, down: torch.Tensor, up: torch.Tensor, alpha: float
) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.lora_down.weight": down,
        f"{prefix}.lora_up.weight": up,
        f"{prefix}.alpha": torch.tensor(alpha),
    }


def delta_norm_linear(down: np.ndarray, up: np.ndarray, alpha: float) -> float:
    return float(np.linalg.norm(up @ down * alpha / down.shape[0]))


def test_only_modules_over_the_limit_are_scaled_to_the_limit():
    gen = torch.Generator().manual_seed(0)
    big_down, big_up = torch.randn(4, 6, generator=gen), torch.randn(5, 4, generator=gen)
    small_down, small_up = big_down * 0.01, big_up * 0.01
    weights = {
        **lora("lora_unet_a", big_down, big_up, 2.0),
        **lora("lora_unet_b", small_down, small_up, 2.0),
    }
    big_norm = delta_norm_linear(big_down.double().numpy(), big_up.double().numpy(), 2.0)
    small_norm = delta_norm_linear(small_down.double().numpy(), small_up.double().numpy(), 2.0)
    limit = big_norm / 3
    assert small_norm < limit / 2
    original_small = small_down.clone()
    original_down, original_up = big_down.clone(), big_up.clone()

    stats = apply_max_norm_regularization(weights, limit)

    after = delta_norm_linear(big_down.double().numpy(), big_up.double().numpy(), 2.0)
    assert after == pytest.approx(limit, rel=1e-5)
    # in place, both factors scaled by the same sqrt(limit / norm)
    assert weights["lora_unet_a.lora_down.weight"] is big_down
    factor = (limit / big_norm) ** 0.5
    np.testing.assert_allclose(big_down.numpy(), original_down.numpy() * factor, rtol=1e-5)
    np.testing.assert_allclose(big_up.numpy(), original_up.numpy() * factor, rtol=1e-5)
    assert torch.equal(small_down, original_small)
    assert stats.keys_scaled == 1
    assert stats.max_norm == pytest.approx(limit, rel=1e-5)
    assert stats.mean_norm == pytest.approx((limit + small_norm) / 2, rel=1e-5)


def test_scaling_factor_is_split_evenly():
    down = torch.full((2, 3), 1.0)
    up = torch.full((3, 2), 1.0)
    # delta = up @ down * 1 = 2 everywhere: norm = 2 * 3 = 6
    stats = apply_max_norm_regularization(lora("m", down, up, 2.0), 1.5)
    ratio = 1.5 / 6
    assert down[0, 0].item() == pytest.approx(ratio**0.5)
    assert up[0, 0].item() == pytest.approx(ratio**0.5)
    assert stats.keys_scaled == 1 and stats.max_norm == pytest.approx(1.5)


def test_conv_deltas_match_an_einsum():
    gen = torch.Generator().manual_seed(1)
    down3 = torch.randn(4, 3, 3, 3, generator=gen)
    up1 = torch.randn(6, 4, 1, 1, generator=gen)
    expected = (
        np.einsum("or,rikl->oikl", up1[:, :, 0, 0].double().numpy(), down3.double().numpy()) * 0.5
    )
    np.testing.assert_allclose(lora_delta(down3, up1, 0.5).numpy(), expected, rtol=1e-5, atol=1e-6)
    down1 = torch.randn(4, 3, 1, 1, generator=gen)
    expected1 = (up1[:, :, 0, 0] @ down1[:, :, 0, 0]).numpy()[:, :, None, None] * 2.0
    np.testing.assert_allclose(lora_delta(down1, up1, 2.0).numpy(), expected1, rtol=1e-5, atol=1e-6)


def test_no_lora_modules_gives_zero_stats():
    stats = apply_max_norm_regularization({"other.weight": torch.ones(2)}, 1.0)
    assert (stats.keys_scaled, stats.mean_norm, stats.max_norm) == (0, 0.0, 0.0)
