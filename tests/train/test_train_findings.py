"""`train`, `train --dry-run` and `cache` show the recipe's findings as `check` does: warnings
once on stderr before any work, errors stopping them all at once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from loraforge.cli import run

# a cross-field warning of the recipe (two ways of reweighting the loss by timestep)
WARNED = {"training": {"min_snr_gamma": 5, "debiased_estimation_loss": True}}
MESSAGE = "min_snr_gamma and debiased estimation both reweight the loss by timestep"


def stderr_of(capsys) -> str:
    """stderr with the console's line wrapping undone."""
    return " ".join(capsys.readouterr().err.split())


def check_messages(recipe: Path, capsys) -> list[str]:
    assert run(["check", str(recipe), "--format", "json"]) == 0
    return [p["message"] for p in json.loads(capsys.readouterr().out)[0]["problems"]]


@pytest.mark.parametrize(
    ("args", "overrides", "work"),
    [
        (["train", "--dry-run"], WARNED, "training plan"),
        (
            ["train"],
            {"training": {**WARNED["training"], "max_train_steps": 1}},
            "training on the CPU",
        ),
        (["cache"], {**WARNED, "cache": {"latents": "disk"}}, "cache:"),
    ],
    ids=["dry-run", "train", "cache"],
)
def test_commands_print_the_recipe_warnings_once_before_work(
    write_recipe, capsys, args, overrides, work
) -> None:
    recipe = write_recipe(overrides)
    assert check_messages(recipe, capsys) == [MESSAGE]
    assert run([args[0], str(recipe), *args[1:]]) == 0
    captured = capsys.readouterr()
    stderr = " ".join(captured.err.split())
    assert stderr.count(MESSAGE) == 1
    assert f"{recipe}:" in stderr  # with its place in the recipe, as check prints it
    if work in stderr:
        assert stderr.index(MESSAGE) < stderr.index(work)
    else:
        assert work in captured.out


def test_train_reports_missing_captions(write_recipe, shapes_dataset, tmp_path, capsys) -> None:
    dataset = tmp_path / "dataset"
    shutil.copytree(shapes_dataset, dataset)
    next(dataset.rglob("*.txt")).unlink()
    recipe = write_recipe(
        {"dataset": {"subsets": [{"dir": str(dataset)}]}, "training": {"max_train_steps": 1}}
    )
    assert run(["train", str(recipe)]) == 0
    assert "1 of 6 image(s) have no usable '.txt' caption" in stderr_of(capsys)


def test_train_stops_on_every_error_check_reports_before_loading(write_recipe, capsys) -> None:
    recipe = write_recipe(
        {
            "model": {"vae": "missing-vae.safetensors"},
            "dataset": {"subsets": [{"dir": "no-such-folder"}]},
        }
    )
    assert run(["train", str(recipe)]) == 2
    stderr = stderr_of(capsys)
    assert "the recipe has 2 errors" in stderr
    assert "dataset.subsets[0].dir:" in stderr and "model.vae:" in stderr
    assert "training on the CPU" not in stderr  # stopped before set-up
