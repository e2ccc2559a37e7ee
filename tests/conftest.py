"""Fixtures shared by every test area: offline Hugging Face libraries and the tiny models.

The tiny models are built once per test session (seeded, a few MB each): a diffusers folder and an
original-layout single-file checkpoint for the SD1, the SD 2.x v-prediction (``sd2v``) and the
SDXL architecture. Treat them as
read-only; copy one (``shutil.copytree``) before changing it.
"""

from __future__ import annotations

import os

# Before anything imports huggingface_hub (it reads these once): tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
# Tests run on 2 cores under `pytest -n 2`: one thread per worker is fastest (oversubscribed
# OpenMP threads made tiny-UNet steps take seconds instead of ~0.1 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def _tiny_dir(factory: pytest.TempPathFactory, family: str) -> Path:
    from loraforge.models.tiny import write_tiny_model

    return write_tiny_model(family, factory.mktemp(f"tiny-{family}") / "model", seed=0)


def _tiny_file(factory: pytest.TempPathFactory, family: str) -> Path:
    from loraforge.models.tiny import write_tiny_single_file

    out = factory.mktemp(f"tiny-{family}-file") / f"tiny-{family.replace('-', '')}.safetensors"
    return write_tiny_single_file(family, out, seed=0)


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD1-architecture model as a diffusers folder (seed 0)."""
    return _tiny_dir(tmp_path_factory, "sd1")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL-architecture model as a diffusers folder (seed 0)."""
    return _tiny_dir(tmp_path_factory, "sdxl")


@pytest.fixture(scope="session")
def tiny_sd2v_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD 2.x v-prediction model as a diffusers folder (seed 0)."""
    return _tiny_dir(tmp_path_factory, "sd2-v")


@pytest.fixture(scope="session")
def tiny_sd1_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny SD1 model as one original-layout ``.safetensors`` checkpoint."""
    return _tiny_file(tmp_path_factory, "sd1")


@pytest.fixture(scope="session")
def tiny_sdxl_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny SDXL model as one original-layout ``.safetensors`` checkpoint."""
    return _tiny_file(tmp_path_factory, "sdxl")


@pytest.fixture(scope="session")
def tiny_sd2v_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny SD 2.x v-prediction model as one original-layout checkpoint."""
    return _tiny_file(tmp_path_factory, "sd2-v")


# FLUX.1's published width (3072 wide, MLP 12288, 64 input channels, T5-XXL and CLIP-L widths) with
# one double and one single block: diffusers' kohya-LoRA and BFL single-file converters hard-code
# that width, so only a model this wide can go through them.
FULL_WIDTH_FLUX = {
    "in_channels": 64,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}


@pytest.fixture
def full_width_flux() -> Callable[[int], Any]:
    """Builds the narrow full-width FLUX transformer (:data:`FULL_WIDTH_FLUX`): 546 M random bf16
    weights (about 1.1 GB, a few seconds), uniform in ±0.05 from ``seed``; nothing is cached."""
    diffusers = pytest.importorskip("diffusers")
    import torch

    def build(seed: int = 0) -> Any:
        with torch.device("meta"):
            model = diffusers.FluxTransformer2DModel(**FULL_WIDTH_FLUX)
        generator = torch.Generator().manual_seed(seed)
        state = {
            k: torch.empty(v.shape, dtype=torch.bfloat16).uniform_(-0.05, 0.05, generator=generator)
            for k, v in model.state_dict().items()
        }
        model.load_state_dict(state, assign=True)
        assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
        return model.eval()

    return build
