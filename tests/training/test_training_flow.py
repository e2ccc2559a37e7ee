"""Rectified-flow training math (SD3 / FLUX), checked against diffusers' own implementations and
closed forms rather than against the code under test."""

from __future__ import annotations

import math

import pytest
import torch

from loraforge.models.flow_transformer import image_ids, pack_latents, unpack_latents
from loraforge.training.flow import (
    FlowOptions,
    loss_weighting,
    noisy_flow_input,
    prediction_and_target,
    sample_sigmas,
)


def test_packing_matches_diffusers_flux_pipeline() -> None:
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 6, 10)
    expected = FluxPipeline._pack_latents(latents, 2, 16, 6, 10)
    assert torch.equal(pack_latents(latents), expected)
    # the pipeline unpacks from pixel sizes (vae_scale_factor 8: latents = pixels / 8)
    back = FluxPipeline._unpack_latents(expected, 48, 80, 8)
    assert torch.equal(unpack_latents(expected, 6, 10), back)
    assert torch.equal(back, latents)
    ids = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    assert torch.equal(image_ids(6, 10, torch.device("cpu"), torch.float32), ids)


def test_noisy_input_matches_the_flow_match_scheduler() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    latents = torch.randn(4, 16, 4, 4)
    options = FlowOptions(timestep_sampling="uniform")
    draw = noisy_flow_input(latents, options, torch.Generator().manual_seed(3))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    for i in range(4):
        # scale_noise: sigma * noise + (1 - sigma) * sample at the scheduler's timestep
        scheduler.set_timesteps(sigmas=[float(draw.sigmas[i])], device="cpu")
        t = scheduler.timesteps[:1]
        expected = scheduler.scale_noise(latents[i : i + 1], t, draw.noise[i : i + 1])
        torch.testing.assert_close(draw.noisy[i : i + 1], expected, rtol=1e-5, atol=1e-5)
        assert float(draw.timesteps[i]) == pytest.approx(float(t[0]), rel=1e-5)


def _median(options: FlowOptions, latent_hw: tuple[int, int] = (64, 64)) -> float:
    sigmas = sample_sigmas(options, 20001, latent_hw, torch.Generator().manual_seed(0))
    assert float(sigmas.min()) >= 0.0 and float(sigmas.max()) <= 1.0
    return float(sigmas.median())


def test_timestep_sampling_distributions() -> None:
    # sigmoid(N(0, 1)) has median 0.5; shift s maps it to s * 0.5 / (1 + (s - 1) * 0.5)
    assert _median(FlowOptions(timestep_sampling="sigmoid")) == pytest.approx(0.5, abs=0.01)
    shifted = _median(FlowOptions(timestep_sampling="shift", discrete_flow_shift=3.0))
    assert shifted == pytest.approx(0.75, abs=0.01)
    # flux_shift at 1024x1024 pixels: 64x64 latents, 1024 packed tokens,
    # mu = 0.5 + (1.15 - 0.5) * (1024 - 256) / (4096 - 256); median exp(mu) / (exp(mu) + 1)
    mu = 0.5 + 0.65 * 768 / 3840
    expected = math.exp(mu) / (math.exp(mu) + 1)
    assert _median(FlowOptions(timestep_sampling="flux_shift")) == pytest.approx(expected, abs=0.01)
    assert _median(FlowOptions(timestep_sampling="uniform")) == pytest.approx(0.5, abs=0.01)
    # sigma with a logit-normal density (SD3 paper's rf/lognorm(0, 1)) then shift 1: median 0.5,
    # quantised to whole timesteps
    options = FlowOptions(timestep_sampling="sigma", weighting_scheme="logit_normal")
    sigmas = sample_sigmas(options, 1000, (8, 8), torch.Generator().manual_seed(0))
    torch.testing.assert_close(sigmas * 1000, (sigmas * 1000).round())
    assert _median(FlowOptions(timestep_sampling="logit_normal")) == pytest.approx(0.5, abs=0.02)


def test_sigma_sampling_respects_the_timestep_range() -> None:
    options = FlowOptions(timestep_sampling="sigma", min_timestep=200, max_timestep=300)
    sigmas = sample_sigmas(options, 500, (8, 8), torch.Generator().manual_seed(1))
    assert float(sigmas.min()) >= 0.2 and float(sigmas.max()) < 0.3


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap", "none", "uniform"])
def test_loss_weighting_matches_diffusers(scheme: str) -> None:
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sigmas = torch.rand(8, 1, 1, 1) * 0.9 + 0.05
    expected = compute_loss_weighting_for_sd3(scheme, sigmas)
    torch.testing.assert_close(loss_weighting(scheme, sigmas), expected)


def test_targets_a_perfect_velocity_meets() -> None:
    latents = torch.randn(3, 16, 4, 4)
    draw = noisy_flow_input(latents, FlowOptions(), torch.Generator().manual_seed(2))
    velocity = draw.noise - latents
    pred, target, weighting = prediction_and_target(velocity, latents, draw, FlowOptions())
    assert weighting is None and torch.equal(pred, target)
    # SD3's preconditioning: -sigma * v + x_t recovers the clean latents exactly
    scaled = FlowOptions(model_prediction_type="sigma_scaled", weighting_scheme="cosmap")
    pred, target, weighting = prediction_and_target(velocity, latents, draw, scaled)
    torch.testing.assert_close(pred, latents, rtol=1e-5, atol=1e-5)
    assert torch.equal(target, latents) and weighting is not None
    # additive: output + x_t compared with the velocity
    additive = FlowOptions(model_prediction_type="additive")
    pred, target, _ = prediction_and_target(velocity - draw.noisy, latents, draw, additive)
    torch.testing.assert_close(pred, target)


def test_draws_replay_from_the_same_seed() -> None:
    latents = torch.randn(2, 16, 4, 4)
    options = FlowOptions(timestep_sampling="shift", ip_noise_gamma=0.1)
    first = noisy_flow_input(latents, options, torch.Generator().manual_seed(9))
    again = noisy_flow_input(latents, options, torch.Generator().manual_seed(9))
    assert torch.equal(first.noisy, again.noisy) and torch.equal(first.sigmas, again.sigmas)


def test_flux_reads_the_density_descending_like_sd_scripts() -> None:
    # a logit-normal centred at +2 puts SD3's noise levels high and FLUX's low (sd-scripts' FLUX
    # trainer indexes the scheduler's descending timesteps with u)
    common = {"timestep_sampling": "sigma", "weighting_scheme": "logit_normal", "logit_mean": 2.0}
    assert _median(FlowOptions(**common)) > 0.8
    assert _median(FlowOptions(**common, descending_density=True)) < 0.2
