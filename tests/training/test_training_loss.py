"""Loss types, huber schedules and SNR weightings against numbers worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from loraforge.training.loss import (
    LossOptions,
    add_v_prediction_like_loss,
    apply_debiased_estimation,
    apply_snr_weight,
    conditional_loss,
    huber_threshold,
    per_sample_mean,
    sample_loss_weights,
    scale_v_prediction_loss_like_noise_prediction,
    training_loss,
    weight_per_sample_loss,
)

# A hand-made SNR table: index = timestep.
SNR = torch.tensor([0.5, 1.0, 4.0, 10.0, 2000.0])
T = torch.tensor([0, 1, 2, 3, 4])
LOSS = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])


def test_l2_and_l1_elementwise():
    pred = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert conditional_loss(pred, target, "l2").tolist() == [[1.0, 4.0], [4.0, 4.0]]
    assert conditional_loss(pred, target, "l1").tolist() == [[1.0, 2.0], [2.0, 2.0]]
    assert conditional_loss(pred, target, "l2", "mean").item() == pytest.approx(13 / 4)
    assert conditional_loss(pred, target, "l1", "sum").item() == pytest.approx(7.0)


def test_huber_and_smooth_l1_with_per_sample_c():
    pred = torch.tensor([[2.0, 0.0], [0.1, 3.0]])
    target = torch.zeros(2, 2)
    c = torch.tensor([0.5, 1.0])
    # huber: 2c(sqrt(d^2 + c^2) - c); smooth_l1: 2(sqrt(d^2 + c^2) - c)
    huber = [
        [2 * 0.5 * (math.sqrt(4 + 0.25) - 0.5), 0.0],
        [2 * 1.0 * (math.sqrt(0.01 + 1) - 1), 2 * 1.0 * (math.sqrt(9 + 1) - 1)],
    ]
    smooth = [
        [2 * (math.sqrt(4.25) - 0.5), 0.0],
        [2 * (math.sqrt(1.01) - 1), 2 * (math.sqrt(10) - 1)],
    ]
    np.testing.assert_allclose(
        conditional_loss(pred, target, "huber", huber_c=c).numpy(), huber, rtol=1e-4
    )
    np.testing.assert_allclose(
        conditional_loss(pred, target, "smooth_l1", huber_c=c).numpy(), smooth, rtol=1e-4
    )
    expected_mean = np.mean(huber)
    assert conditional_loss(pred, target, "huber", "mean", c).item() == pytest.approx(expected_mean)


def test_huber_needs_c_and_unknown_types_fail():
    with pytest.raises(ValueError, match="huber_c"):
        conditional_loss(torch.zeros(1, 1), torch.zeros(1, 1), "huber")
    with pytest.raises(ValueError, match="unknown loss type"):
        conditional_loss(torch.zeros(1, 1), torch.zeros(1, 1), "l3")


def test_huber_threshold_schedules(sd_acp):
    acp = torch.tensor(sd_acp, dtype=torch.float32)
    t = torch.tensor([0, 500, 1000 - 1])
    constant = huber_threshold(
        LossOptions("huber", "constant", huber_c=0.2, huber_scale=3.0), t, acp, 1000
    )
    assert constant.tolist() == pytest.approx([0.6, 0.6, 0.6])
    # exponential: exp(ln(c) * t / T) * scale -> scale at 0, sqrt(c) * scale at T/2
    expo = huber_threshold(
        LossOptions("smooth_l1", "exponential", huber_c=0.01, huber_scale=2.0), t, acp, 1000
    )
    assert expo.tolist() == pytest.approx([2.0, 2.0 * 0.1, 2.0 * 0.01 ** (999 / 1000)], rel=1e-5)
    snr = huber_threshold(LossOptions("huber", "snr", huber_c=0.1), t, acp, 1000)
    expected = [(1 - 0.1) / (1 + math.sqrt((1 - a) / a)) ** 2 + 0.1 for a in sd_acp[[0, 500, 999]]]
    assert snr.tolist() == pytest.approx(expected, rel=1e-4)
    assert huber_threshold(LossOptions("l2"), t, acp, 1000) is None


def test_per_sample_mean_and_prior_loss_weights():
    loss = torch.arange(12, dtype=torch.float32).view(3, 2, 2)
    assert per_sample_mean(loss).tolist() == [1.5, 5.5, 9.5]
    weights = sample_loss_weights([False, True, False], prior_loss_weight=0.25)
    assert weights.tolist() == [1.0, 0.25, 1.0]


def test_min_snr_gamma_epsilon_and_v_prediction():
    gamma = 5.0
    eps = apply_snr_weight(LOSS, T, SNR, gamma, v_prediction=False)
    v = apply_snr_weight(LOSS, T, SNR, gamma, v_prediction=True)
    snr = [0.5, 1.0, 4.0, 10.0, 2000.0]
    expected_eps = [x * min(s, gamma) / s for x, s in zip(LOSS.tolist(), snr, strict=True)]
    expected_v = [x * min(s, gamma) / (s + 1) for x, s in zip(LOSS.tolist(), snr, strict=True)]
    assert eps.tolist() == pytest.approx(expected_eps)  # [1, 2, 3, 2, 0.0125]
    assert v.tolist() == pytest.approx(expected_v)


def test_scale_v_pred_like_noise_pred_caps_snr_at_1000():
    out = scale_v_prediction_loss_like_noise_prediction(LOSS, T, SNR)
    capped = [0.5, 1.0, 4.0, 10.0, 1000.0]
    assert out.tolist() == pytest.approx(
        [x * s / (s + 1) for x, s in zip(LOSS.tolist(), capped, strict=True)]
    )


def test_v_pred_like_loss_adds_the_inverse_scale():
    out = add_v_prediction_like_loss(LOSS, T, SNR, 0.2)
    capped = [0.5, 1.0, 4.0, 10.0, 1000.0]
    assert out.tolist() == pytest.approx(
        [x + x * (s + 1) / s * 0.2 for x, s in zip(LOSS.tolist(), capped, strict=True)]
    )


def test_debiased_estimation_epsilon_and_v():
    capped = [0.5, 1.0, 4.0, 10.0, 1000.0]
    eps = apply_debiased_estimation(LOSS, T, SNR, v_prediction=False)
    v = apply_debiased_estimation(LOSS, T, SNR, v_prediction=True)
    assert eps.tolist() == pytest.approx(
        [x / math.sqrt(s) for x, s in zip(LOSS.tolist(), capped, strict=True)]
    )
    assert v.tolist() == pytest.approx(
        [x / (s + 1) for x, s in zip(LOSS.tolist(), capped, strict=True)]
    )


def test_weightings_compose_in_sd_scripts_order():
    options = LossOptions(min_snr_gamma=5.0, debiased_estimation_loss=True)
    out = weight_per_sample_loss(LOSS, T, SNR, options)
    snr = [0.5, 1.0, 4.0, 10.0, 2000.0]
    expected = [
        x * min(s, 5.0) / s / math.sqrt(min(s, 1000.0))
        for x, s in zip(LOSS.tolist(), snr, strict=True)
    ]
    assert out.tolist() == pytest.approx(expected)
    assert torch.equal(weight_per_sample_loss(LOSS, T, SNR, LossOptions()), LOSS)


def test_training_loss_end_to_end_by_hand(schedule, sd_acp):
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 4, 3, 3, generator=gen)
    target = torch.randn(2, 4, 3, 3, generator=gen)
    t = torch.tensor([10, 700])
    weights = torch.tensor([1.0, 0.5])
    options = LossOptions(min_snr_gamma=5.0, v_prediction=True)
    loss = training_loss(pred, target, t, weights, schedule, options)
    mse = ((pred.double() - target.double()) ** 2).mean(dim=(1, 2, 3)).numpy()
    snr = sd_acp[[10, 700]] / (1 - sd_acp[[10, 700]])
    expected = np.mean(mse * weights.numpy() * np.minimum(snr, 5.0) / (snr + 1))
    assert loss.ndim == 0 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_training_loss_with_snr_huber(schedule, sd_acp):
    pred = torch.full((1, 1, 2, 2), 2.0)
    target = torch.zeros(1, 1, 2, 2)
    t = torch.tensor([500])
    options = LossOptions(loss_type="huber", huber_schedule="snr", huber_c=0.1)
    a = sd_acp[500]
    c = 0.9 / (1 + math.sqrt((1 - a) / a)) ** 2 + 0.1
    expected = 2 * c * (math.sqrt(4 + c * c) - c)
    loss = training_loss(pred, target, t, torch.ones(1), schedule, options)
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_options_from_the_recipe_training_section():
    from loraforge.recipe import parse_recipe_text

    recipe = parse_recipe_text(
        "model: {base: m.safetensors}\ndataset: {subsets: [{dir: d}]}\n"
        "training: {loss_type: huber, huber_c: 0.2, min_snr_gamma: 5}\n"
    )
    options = LossOptions.from_training(recipe.training, v_prediction=True)
    assert options == LossOptions("huber", "snr", 0.2, 1.0, 5.0, True)
