"""Fixtures shared by every test area: offline Hugging Face libraries and the tiny models.

The tiny models are built once per test session (seeded, a few MB each): a diffusers folder and an
original-layout single-file checkpoint for the SD1 and the SDXL architecture. Treat them as
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


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD1-architecture model as a diffusers folder (seed 0)."""
    from loraforge.models.tiny import write_tiny_model

    return write_tiny_model("sd1", tmp_path_factory.mktemp("tiny-sd1") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL-architecture model as a diffusers folder (seed 0)."""
    from loraforge.models.tiny import write_tiny_model

    return write_tiny_model("sdxl", tmp_path_factory.mktemp("tiny-sdxl") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_sd1_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny SD1 model as one original-layout ``.safetensors`` checkpoint."""
    from loraforge.models.tiny import write_tiny_single_file

    out = tmp_path_factory.mktemp("tiny-sd1-file") / "tiny-sd1.safetensors"
    return write_tiny_single_file("sd1", out, seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny SDXL model as one original-layout ``.safetensors`` checkpoint."""
    from loraforge.models.tiny import write_tiny_single_file

    out = tmp_path_factory.mktemp("tiny-sdxl-file") / "tiny-sdxl.safetensors"
    return write_tiny_single_file("sdxl", out, seed=0)
