"""Fixtures for the training building blocks (noise, loss, optimizers, schedulers, state)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def schedule():
    """The sd-scripts training noise schedule (no zero-terminal-SNR rescale)."""
    from loraforge.training.noise import build_noise_schedule

    return build_noise_schedule()


@pytest.fixture
def tiny_params():
    """Two small trainable tensors, seeded."""
    gen = torch.Generator().manual_seed(0)
    return [
        torch.nn.Parameter(torch.randn(4, 8, generator=gen)),
        torch.nn.Parameter(torch.randn(8, generator=gen)),
    ]


# Independent reference values, computed with NumPy in float64 (not with loraforge code).


@pytest.fixture
def sd_acp():
    """alpha_bar of the scaled-linear SD schedule: betas = linspace(sqrt(b0), sqrt(b1), 1000)**2."""
    import numpy as np

    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


@pytest.fixture
def ztsnr_acp(sd_acp):
    """alpha_bar after Lin et al. 2023 Alg. 1: shift sqrt(alpha_bar) to end at 0, keep the start."""
    import numpy as np

    root = np.sqrt(sd_acp)
    shifted = (root - root[-1]) * root[0] / (root[0] - root[-1])
    return shifted**2
