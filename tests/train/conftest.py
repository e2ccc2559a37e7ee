"""Fixtures for the training-loop tests: a drawn dataset and recipes on the tiny models.

Training here runs on the CPU with one thread per process: the tiny models are far too small to
gain from more, and the CI machines are shared.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _single_thread() -> None:
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shapes_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six drawn images in a kohya folder ``3_lfdemo shape`` (three aspect ratios)."""
    from loraforge.demo import write_demo_images

    root = tmp_path_factory.mktemp("shapes") / "dataset"
    write_demo_images(root / "3_lfdemo shape", count=6)
    return root


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in, section by section (subsets item by item)."""
    out = dict(base)
    for key, value in overrides.items():
        current = out.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            out[key] = merge(current, value)
        elif key == "subsets" and isinstance(current, list) and len(value) == len(current):
            out[key] = [merge(c, v) for c, v in zip(current, value, strict=True)]
        else:
            out[key] = value
    return out


def base_recipe(model: Path, dataset: Path, out: Path) -> dict[str, Any]:
    return {
        "model": {"base": str(model)},
        "dataset": {
            "resolution": 96,
            "min_bucket_reso": 64,
            "max_bucket_reso": 128,
            "bucket_reso_steps": 64,
            "num_workers": 0,
            "subsets": [{"dir": str(dataset)}],
        },
        "cache": {"latents": "none"},
        "network": {"dim": 4, "alpha": 4},
        "training": {
            "max_train_steps": 4,
            "batch_size": 2,
            "learning_rate": 1.0e-3,
            "mixed_precision": "no",
            "seed": 7,
        },
        "output": {"dir": str(out), "name": "t", "save_precision": "fp32"},
    }


RecipeFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def make_recipe(tiny_sd1_dir: Path, shapes_dataset: Path) -> Callable[..., Path]:
    """Write a recipe into ``folder`` (tiny SD1, the drawn dataset, ``folder/out``) with
    overrides merged in: ``make_recipe(folder, {"training": {...}}, name=..., model=..., out=...)``.
    """

    def factory(
        folder: Path,
        overrides: dict[str, Any] | None = None,
        *,
        name: str = "recipe.yaml",
        model: Path | None = None,
        out: Path | None = None,
    ) -> Path:
        data = base_recipe(model or tiny_sd1_dir, shapes_dataset, out or folder / "out")
        data = merge(data, overrides or {})
        path = folder / name
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return path

    return factory


@pytest.fixture
def write_recipe(tmp_path: Path, make_recipe: Callable[..., Path]) -> RecipeFactory:
    """:func:`make_recipe` writing into this test's ``tmp_path``."""

    def factory(overrides: dict[str, Any] | None = None, **kwargs: Any) -> Path:
        return make_recipe(tmp_path, overrides, **kwargs)

    return factory


def train_quietly(run: Any, probe: Any = None) -> Any:
    """Run :func:`loraforge.training.loop.train` on a set-up run with the display off."""
    from loraforge.console import err
    from loraforge.training.display import TrainingDisplay
    from loraforge.training.loop import StopFlag, train

    length = run.settings.length
    display = TrainingDisplay(
        err, total_steps=length.max_train_steps, num_epochs=length.num_epochs,
        start_step=run.start.global_step, device=run.device, enabled=False,
    )  # fmt: skip
    return train(run, display, StopFlag(), probe)
