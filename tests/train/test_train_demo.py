"""The demo projects: `loraforge init --preset demo` writes a project that `train` runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraforge.cli import run
from loraforge.demo import FOLDER, NUM_IMAGES, write_demo_project
from loraforge.errors import OutputExistsError
from loraforge.recipe import load_recipe


def cli(*args: str) -> int:
    return run(list(args))


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demo") / "demo"
    assert cli("init", "--preset", "demo", "--dir", str(folder)) == 0
    return folder


def test_init_writes_model_images_and_a_valid_recipe(demo_dir) -> None:
    assert (demo_dir / "model" / "model_index.json").is_file()
    images = sorted((demo_dir / "dataset" / FOLDER).glob("*.png"))
    assert len(images) == NUM_IMAGES
    assert all(p.with_suffix(".txt").read_text().startswith("lfdemo shape, ") for p in images)
    from PIL import Image

    assert {Image.open(p).size for p in images} == {(96, 96), (128, 72), (72, 128)}
    recipe = load_recipe(demo_dir / "recipe.yaml")
    assert recipe.model.base == str(demo_dir / "model") and recipe.training.mixed_precision == "no"


def test_init_refuses_an_existing_project_without_force(demo_dir, tmp_path) -> None:
    with pytest.raises(OutputExistsError):
        write_demo_project("demo", demo_dir, force=False)
    copy = tmp_path / "copy"
    write_demo_project("demo", copy, force=False)
    (copy / "dataset" / FOLDER / "extra.png").write_bytes(b"x")
    write_demo_project("demo", copy, force=True)
    assert not (copy / "dataset" / FOLDER / "extra.png").exists()


def test_demo_plan_trains_both_text_encoder_and_unet(demo_dir, capsys) -> None:
    assert cli("train", str(demo_dir / "recipe.yaml"), "--dry-run", "-f", "json") == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["family"] == "sd1" and plan["length"]["max_train_steps"] == 160
    assert set(plan["network"]["groups"]) == {"textencoder", "unet"}
    assert [b["width"] * b["height"] for b in plan["buckets"]] == [64 * 64, 64 * 128, 128 * 64]


@pytest.mark.slow
def test_demo_sdxl_project_plans_and_trains(tmp_path, capsys) -> None:
    assert cli("init", "--preset", "demo-sdxl", "--dir", str(tmp_path / "x")) == 0
    recipe = tmp_path / "x" / "recipe.yaml"
    assert cli("train", str(recipe), "--dry-run", "-f", "json") == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["family"] == "sdxl" and plan["length"]["max_train_steps"] == 150
    short = recipe.with_name("short.yaml")  # shortened to keep the suite fast
    text = recipe.read_text().replace("max_train_steps: 150", "max_train_steps: 3")
    short.write_text(text.replace("every_n_steps: 75", "every_n_steps: 2"))
    assert cli("train", str(short)) == 0
    out = tmp_path / "x" / "output"
    assert (out / "lfdemo.safetensors").is_file()
    assert (out / "lfdemo-step00000002.safetensors").is_file()
    assert list((out / "sample").glob("lfdemo_000002_*.png"))


@pytest.mark.slow
def test_demo_trains_end_to_end_with_samples(demo_dir, capsys) -> None:
    recipe = demo_dir / "recipe.yaml"
    short = demo_dir / "short.yaml"  # the demo recipe, shortened to keep the suite fast
    text = recipe.read_text().replace("max_train_steps: 160", "max_train_steps: 6")
    short.write_text(text.replace("every_n_steps: 80", "every_n_steps: 3"))
    assert cli("train", str(short)) == 0
    out = demo_dir / "output"
    assert (out / "lfdemo.safetensors").is_file() and (
        out / "lfdemo-step00000003.safetensors"
    ).is_file()
    assert len(list((out / "sample").glob("lfdemo_00000[36]_0[01]_[12].png"))) == 4
