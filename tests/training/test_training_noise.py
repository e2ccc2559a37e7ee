"""Noise schedule, noise variants, timesteps and targets against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loraforge.errors import RecipeError
from loraforge.training.noise import (
    NoiseOptions,
    add_noise,
    apply_noise_offset,
    build_noise_schedule,
    check_timestep_range,
    noise_noisy_latents_and_timesteps,
    prediction_target,
    pyramid_noise_like,
    sample_timesteps,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_schedule_and_snr_table_match_the_scaled_linear_formula(schedule, sd_acp):
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), sd_acp, rtol=1e-5)
    np.testing.assert_allclose(schedule.all_snr.numpy(), sd_acp / (1 - sd_acp), rtol=1e-3)
    assert schedule.num_train_timesteps == 1000
    assert schedule.all_snr.dtype == torch.float32


def test_zero_terminal_snr_rescales_alphas_but_keeps_the_original_snr_table(sd_acp, ztsnr_acp):
    fixed = build_noise_schedule(zero_terminal_snr=True)
    acp = fixed.alphas_cumprod.double().numpy()
    np.testing.assert_allclose(acp, ztsnr_acp, rtol=2e-4, atol=1e-7)
    assert acp[-1] == 0.0
    assert acp[0] == pytest.approx(sd_acp[0], rel=1e-6)
    np.testing.assert_allclose(fixed.scheduler.betas.double().numpy()[-1], 1.0, atol=1e-6)
    # sd-scripts computes all_snr before the fix: the loss weights use the original schedule.
    np.testing.assert_allclose(fixed.all_snr.numpy(), sd_acp / (1 - sd_acp), rtol=1e-3)


def test_add_noise_and_velocity_follow_the_closed_form(schedule, sd_acp):
    latents = torch.randn(3, 4, 2, 2, generator=gen(1))
    noise = torch.randn(3, 4, 2, 2, generator=gen(2))
    t = torch.tensor([0, 499, 999])
    a = sd_acp[t.numpy()][:, None, None, None]
    x, n = latents.double().numpy(), noise.double().numpy()
    expected_noisy = np.sqrt(a) * x + np.sqrt(1 - a) * n
    expected_v = np.sqrt(a) * n - np.sqrt(1 - a) * x
    noisy = add_noise(schedule, latents, noise, t)
    np.testing.assert_allclose(noisy.numpy(), expected_noisy, rtol=1e-4, atol=1e-5)
    v = prediction_target(schedule, latents, noise, t, v_prediction=True)
    np.testing.assert_allclose(v.numpy(), expected_v, rtol=1e-4, atol=1e-5)
    assert prediction_target(schedule, latents, noise, t, v_prediction=False) is noise
    assert schedule.alphas_cumprod.device.type == "cpu"


def test_timesteps_stay_in_the_half_open_range_and_are_reproducible():
    steps = sample_timesteps(5000, 10, 20, gen(3))
    assert steps.dtype == torch.int64
    assert steps.min().item() == 10 and steps.max().item() == 19
    assert torch.equal(steps, sample_timesteps(5000, 10, 20, gen(3)))
    assert torch.equal(sample_timesteps(4, 500, 500, gen(3)), torch.full((4,), 500))


@pytest.mark.parametrize(("low", "high"), [(-1, 10), (20, 10), (0, 1001), (1000, 1000)])
def test_bad_timestep_ranges_are_recipe_errors(low, high):
    with pytest.raises(RecipeError, match="min_timestep"):
        check_timestep_range(low, high, 1000)


def test_noise_offset_adds_one_draw_per_sample_and_channel():
    latents = torch.zeros(2, 3, 4, 4)
    noise = torch.randn(2, 3, 4, 4, generator=gen(4))
    out = apply_noise_offset(latents, noise, 0.1, None, gen(5))
    draws = torch.randn(2, 3, 1, 1, generator=gen(5)).numpy()
    np.testing.assert_allclose(out.numpy(), noise.numpy() + 0.1 * draws, rtol=1e-6)


def test_adaptive_noise_offset_uses_the_channel_mean_and_clamps_at_zero():
    means = np.array([[0.5, -2.0], [1.0, 0.0]])
    latents = torch.tensor(means, dtype=torch.float32)[:, :, None, None].repeat(1, 1, 3, 3)
    noise = torch.zeros(2, 2, 3, 3)
    out = apply_noise_offset(latents, noise, 0.1, -0.1, gen(6))
    draws = torch.randn(2, 2, 1, 1, generator=gen(6)).numpy()
    offset = np.maximum(0.0, 0.1 - 0.1 * np.abs(means))  # [[0.05, 0], [0, 0.1]]
    np.testing.assert_allclose(
        out.numpy(), np.broadcast_to(offset[:, :, None, None] * draws, (2, 2, 3, 3)), atol=1e-7
    )


def test_pyramid_noise_two_levels_by_hand():
    # 2x2 latents: level 0 is full size (r**0 = 1), level 1 is 1x1 (2 / r < 2 for r in [2, 4)),
    # after which the pyramid stops. Replay the draws in the documented order.
    noise = torch.randn(2, 3, 2, 2, generator=gen(7))
    out = pyramid_noise_like(noise, iterations=5, discount=0.5, generator=gen(8))
    replay = gen(8)
    torch.rand(1, generator=replay)
    level0 = torch.randn(2, 3, 2, 2, generator=replay).double().numpy()
    torch.rand(1, generator=replay)
    level1 = torch.randn(2, 3, 1, 1, generator=replay).double().numpy()
    total = noise.double().numpy() + level0 + 0.5 * level1
    expected = total / total.std(ddof=1)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_pyramid_noise_is_unit_std_and_leaves_its_input_alone():
    noise = torch.randn(2, 4, 16, 12, generator=gen(9))
    before = noise.clone()
    out = pyramid_noise_like(noise, iterations=6, discount=0.3, generator=gen(10))
    assert out.shape == noise.shape and out.dtype == noise.dtype
    assert out.std().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(noise, before)
    assert not torch.allclose(out, noise / noise.std())


def test_plain_noisy_batch_replays_noise_then_timesteps(schedule, sd_acp):
    latents = torch.randn(2, 4, 3, 3, generator=gen(11))
    batch = noise_noisy_latents_and_timesteps(latents, schedule, NoiseOptions(), gen(12))
    replay = gen(12)
    noise = torch.randn(2, 4, 3, 3, generator=replay)
    t = torch.randint(0, 1000, (2,), generator=replay)
    assert torch.equal(batch.noise, noise) and torch.equal(batch.timesteps, t)
    a = sd_acp[t.numpy()][:, None, None, None]
    expected = np.sqrt(a) * latents.double().numpy() + np.sqrt(1 - a) * noise.double().numpy()
    np.testing.assert_allclose(batch.noisy_latents.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_input_perturbation_changes_the_input_but_not_the_target_noise(schedule, sd_acp):
    latents = torch.randn(2, 4, 3, 3, generator=gen(13))
    options = NoiseOptions(ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True)
    batch = noise_noisy_latents_and_timesteps(latents, schedule, options, gen(14))
    replay = gen(14)
    noise = torch.randn(2, 4, 3, 3, generator=replay)
    t = torch.randint(0, 1000, (2,), generator=replay)
    gamma = torch.rand(1, generator=replay).item() * 0.1
    perturb = torch.randn(2, 4, 3, 3, generator=replay)
    assert torch.equal(batch.noise, noise)
    a = sd_acp[t.numpy()][:, None, None, None]
    model_noise = noise.double().numpy() + gamma * perturb.double().numpy()
    expected = np.sqrt(a) * latents.double().numpy() + np.sqrt(1 - a) * model_noise
    np.testing.assert_allclose(batch.noisy_latents.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_random_strength_noise_offset_order_of_draws(schedule):
    latents = torch.zeros(2, 3, 2, 2)
    options = NoiseOptions(
        noise_offset=0.2, noise_offset_random_strength=True, min_timestep=5, max_timestep=6
    )
    batch = noise_noisy_latents_and_timesteps(latents, schedule, options, gen(15))
    replay = gen(15)
    noise = torch.randn(2, 3, 2, 2, generator=replay).numpy()
    strength = torch.rand(1, generator=replay).item() * 0.2
    offsets = torch.randn(2, 3, 1, 1, generator=replay).numpy()
    np.testing.assert_allclose(batch.noise.numpy(), noise + strength * offsets, rtol=1e-6)
    assert batch.timesteps.tolist() == [5, 5]


def test_options_from_the_recipe_training_section():
    from loraforge.recipe import parse_recipe_text

    recipe = parse_recipe_text(
        "model: {base: m.safetensors}\ndataset: {subsets: [{dir: d}]}\n"
        "training: {noise_offset: 0.05, multires_noise_iterations: 6, max_timestep: 900}\n"
    )
    options = NoiseOptions.from_training(recipe.training)
    assert options == NoiseOptions(noise_offset=0.05, multires_noise_iterations=6, max_timestep=900)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_generator_gives_the_same_draws_for_cuda_latents(schedule):
    from loraforge.training.loss import LossOptions, training_loss

    latents = torch.randn(2, 4, 8, 8, generator=gen(16))
    options = NoiseOptions(noise_offset=0.1, multires_noise_iterations=3, ip_noise_gamma=0.1)
    on_cpu = noise_noisy_latents_and_timesteps(latents, schedule, options, gen(17))
    on_gpu = noise_noisy_latents_and_timesteps(latents.cuda(), schedule, options, gen(17))
    assert on_gpu.noisy_latents.device.type == "cuda" and on_gpu.timesteps.device.type == "cuda"
    assert torch.equal(on_cpu.timesteps, on_gpu.timesteps.cpu())
    torch.testing.assert_close(
        on_cpu.noisy_latents, on_gpu.noisy_latents.cpu(), rtol=1e-4, atol=1e-5
    )
    assert schedule.alphas_cumprod.device.type == "cpu"
    loss_options = LossOptions(loss_type="huber", min_snr_gamma=5.0)
    weights = torch.ones(2)
    cpu_loss = training_loss(
        on_cpu.noisy_latents, on_cpu.noise, on_cpu.timesteps, weights, schedule, loss_options
    )
    gpu_loss = training_loss(
        on_gpu.noisy_latents, on_gpu.noise, on_gpu.timesteps, weights.cuda(), schedule, loss_options
    )
    assert gpu_loss.item() == pytest.approx(cpu_loss.item(), rel=1e-4)
