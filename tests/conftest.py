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

from pathlib import Path

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
