"""Unit tests of the loop's pieces: lengths, file plans, accumulation, seeds, samplers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from loraforge.errors import DependencyError, RecipeError
from loraforge.training.display import LossWindow
from loraforge.training.distributed import synchronise_step
from loraforge.training.loop import is_update_batch
from loraforge.training.output_plan import planned_outputs, sample_file_name, sample_points
from loraforge.training.sampling import SAMPLERS, make_scheduler
from loraforge.training.settings import (
    OutputSettings,
    SampleSettings,
    SampleSpec,
    training_length,
)
from loraforge.training.step import batch_seed


@pytest.mark.parametrize(
    ("batches", "accumulation", "epochs", "steps", "expected"),
    [
        (30, 1, 10, None, (30, 30, 300, 10)),
        (9, 2, 2, None, (9, 5, 10, 2)),  # the last, partial accumulation of an epoch steps too
        (9, 2, 10, 12, (9, 5, 12, 3)),  # steps win over epochs
        (4, 4, None, 1, (4, 1, 1, 1)),
    ],
)
def test_training_length_counts_like_sd_scripts(
    batches, accumulation, epochs, steps, expected
) -> None:
    length = training_length(batches, accumulation, epochs, steps)
    assert (
        length.batches_per_epoch,
        length.steps_per_epoch,
        length.max_train_steps,
        length.num_epochs,
    ) == expected


def test_training_length_needs_a_limit_and_data() -> None:
    with pytest.raises(RecipeError):
        training_length(3, 1, None, None)
    with pytest.raises(RecipeError):
        training_length(0, 1, 1, None)


def test_update_batches_with_accumulation() -> None:
    assert [i for i in range(9) if is_update_batch(i, 2, 9)] == [1, 3, 5, 7, 8]
    assert [i for i in range(3) if is_update_batch(i, 1, 3)] == [0, 1, 2]


def _output(tmp_path: Path, **kwargs) -> OutputSettings:
    values = {
        "dir": tmp_path, "name": "lora", "save_every_n_epochs": None, "save_every_n_steps": None,
        "save_last_n": None, "save_precision": "fp16", "save_state": False,
        "log_with": "none", "log_dir": tmp_path / "logs",
    }  # fmt: skip
    values.update(kwargs)
    return OutputSettings(**values)


def test_planned_outputs_use_sd_scripts_names(tmp_path) -> None:
    length = training_length(10, 1, 4, None)  # 40 steps, 4 epochs
    output = _output(tmp_path, save_every_n_epochs=2, save_every_n_steps=15, save_state=True)
    spec = SampleSpec(0, "p", "", 64, 64, 5, 4, 7.0)
    sample = SampleSettings(None, 20, "euler_a", (spec,))
    files = [(f.step, f.kind, f.path.name) for f in planned_outputs(output, sample, length)]
    assert files == [
        (1, "metrics", "lora-metrics.jsonl"),
        (15, "lora", "lora-step00000015.safetensors"),
        (15, "state", "lora-step00000015-state"),
        (20, "lora", "lora-000002.safetensors"),
        (20, "state", "lora-000002-state"),
        (20, "sample", "lora_000020_00_5.png"),
        (20, "sample", "lora_grid.png"),
        (30, "lora", "lora-step00000030.safetensors"),
        (30, "state", "lora-step00000030-state"),
        (40, "sample", "lora_000040_00_5.png"),
        (40, "lora", "lora.safetensors"),
        (40, "state", "lora-state"),
    ]


def test_sample_at_first_plans_step_zero_samples_and_the_grid(tmp_path) -> None:
    length = training_length(10, 1, 2, None)  # 20 steps, 2 epochs
    specs = (SampleSpec(0, "p", "", 64, 64, 5, 4, 7.0), SampleSpec(1, "q", "", 64, 64, 6, 4, 7.0))
    sample = SampleSettings(1, 10, "euler_a", specs, at_first=True)
    assert sample_points(sample, length) == [
        (0, "step", 0),
        (10, "epoch", 1),
        (10, "step", 10),
        (20, "epoch", 2),
        (20, "step", 20),
    ]
    files = [(f.step, f.path.name) for f in planned_outputs(_output(tmp_path), sample, length)]
    assert files[:3] == [
        (0, "lora_000000_00_5.png"),
        (0, "lora_000000_01_6.png"),
        (0, "lora_grid.png"),
    ]
    assert SampleSettings(None, None, "euler_a", specs, at_first=True).enabled


def test_sample_grid_puts_prompts_down_and_sampling_points_across(tmp_path) -> None:
    from PIL import Image

    from loraforge.training.sample_grid import write_sample_grid

    specs = (
        SampleSpec(0, "red", "", 64, 64, 1, 4, 7.0),
        SampleSpec(1, "blue", "", 64, 64, 2, 4, 7.0),
    )
    colours = {(0, 0): (255, 0, 0), (0, 1): (0, 0, 255), (8, 0): (0, 255, 0)}
    for (step, index), rgb in colours.items():
        name = sample_file_name("lora", "step", step, index, specs[index].seed)
        Image.new("RGB", (64, 64), rgb).save(tmp_path / name)
    grid_path = write_sample_grid(tmp_path, "lora", specs, [("step", 0), ("step", 8)])
    assert grid_path == tmp_path / "lora_grid.png"
    grid = Image.open(grid_path).convert("RGB")
    cell, label, header, pad = 128, 168, 18, 4  # 64-pixel samples are shown twice as large

    def centre(row: int, col: int) -> tuple[int, int, int]:
        return grid.getpixel(
            (label + col * (cell + pad) + cell // 2, header + row * (cell + pad) + cell // 2)
        )

    assert centre(0, 0) == (255, 0, 0) and centre(1, 0) == (0, 0, 255)
    assert centre(0, 1) == (0, 255, 0)
    assert centre(1, 1) == (200, 200, 200)  # not rendered (yet): grey


def test_sample_file_names() -> None:
    assert sample_file_name("x", "epoch", 2, 1, 42) == "x_e000002_01_42.png"
    assert sample_file_name("x", "step", 100, 0, 7) == "x_000100_00_7.png"


def test_loss_window_is_a_moving_average() -> None:
    window = LossWindow(3, [1.0])
    assert window.add(2.0) == pytest.approx(1.5)
    window.add(3.0)
    assert window.add(4.0) == pytest.approx(3.0)
    assert list(window.values) == [2.0, 3.0, 4.0]


def test_batch_seeds_depend_on_place_only() -> None:
    assert batch_seed(1, 0, 5, 3) == batch_seed(1, 0, 5, 3)
    seeds = {batch_seed(1, r, s, b) for r in (0, 1) for s in (0, 1) for b in (0, 1)}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)


def test_single_process_step_sync_changes_nothing() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    agreed = synchronise_step([p], 0.5, True, 1)
    assert agreed.loss == 0.5 and agreed.stop and torch.equal(p.grad, torch.full((3,), 2.0))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_maps_to_a_diffusers_scheduler(name) -> None:
    from diffusers import DDPMScheduler

    base = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config
    if name == "lms" and importlib.util.find_spec("scipy") is None:
        with pytest.raises(DependencyError, match="scipy"):
            make_scheduler(name, base, v_prediction=False)
        return
    scheduler = make_scheduler(name, base, v_prediction=name == "ddim")
    assert type(scheduler).__name__ == SAMPLERS[name][0]
    assert scheduler.config.prediction_type == ("v_prediction" if name == "ddim" else "epsilon")
    scheduler.set_timesteps(4)
    assert len(scheduler.timesteps) >= 4
