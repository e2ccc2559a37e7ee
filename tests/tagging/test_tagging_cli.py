"""`loraforge tag` end to end: recipe subsets, --dir, modes, report, errors and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loraforge.cli import main


def image(path: Path, rgb: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)


def write_recipe(tmp_path: Path, model: str, extra: str = "") -> Path:
    """A recipe whose dataset is a kohya parent folder (two subsets) plus a reg subset."""
    image(tmp_path / "train" / "10_char" / "a.png", (0, 0, 255))
    image(tmp_path / "train" / "10_char" / "b.png", (255, 0, 0))
    image(tmp_path / "train" / "5_style" / "c.png", (0, 0, 255))
    image(tmp_path / "reg" / "1_person" / "r.png", (0, 0, 255))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"""model:
  base: some/model
dataset:
  subsets:
    - dir: train
    - dir: reg
      is_reg: true
tagging:
  model: {model}
  device: cpu
  general_threshold: 0.9
  character_threshold: 0.5
  trigger_word: sks
{extra}output:
  dir: out
""",
        encoding="utf-8",
    )
    return recipe


def call(*args: str) -> int:
    try:
        main(list(args))
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def test_recipe_run_in_a_subprocess_without_torch(tmp_path: Path, wd14_dir: Path) -> None:
    write_recipe(tmp_path, str(wd14_dir))
    code = (
        "import sys\nfrom loraforge.cli import run\n"
        "print('EXIT', run(['tag', 'recipe.yaml', '--format', 'json']), file=sys.stderr)\n"
        "print('TORCH' if 'torch' in sys.modules else 'NOTORCH', file=sys.stderr)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert "NOTORCH" in result.stderr and "EXIT 0" in result.stderr, result.stderr
    data = json.loads(result.stdout)
    assert (data["written"], data["kept"], data["problems"]) == (3, 0, [])
    train = tmp_path / "train"
    assert (train / "10_char" / "a.txt").read_text() == "sks, blue hair, 1girl, hatsune miku\n"
    assert (train / "10_char" / "b.txt").read_text() == "sks, red theme, 1girl, hatsune miku\n"
    assert (train / "5_style" / "c.txt").exists()
    assert not (tmp_path / "reg" / "1_person" / "r.txt").exists()
    assert "regularization images are not tagged" in result.stderr
    report = json.loads((tmp_path / "out" / "tag_frequency.json").read_text())
    assert report == data["tag_frequency"]
    assert report["10_char"] == {
        "1girl": 2,
        "hatsune miku": 2,
        "sks": 2,
        "blue hair": 1,
        "red theme": 1,
    }
    assert set(report) == {"10_char", "5_style"}
    # the training metadata (ss_tag_frequency) counts the written captions the same way
    from loraforge.data.dataset_facts import tag_frequency
    from loraforge.data.discovery import discover
    from loraforge.recipe import load_recipe

    trained = tag_frequency(discover(load_recipe(tmp_path / "recipe.yaml").dataset))
    assert {folder: trained[folder] for folder in report} == report


def test_dir_option_overwrite_and_table(tmp_path: Path, wd14_dir: Path, capsys) -> None:
    recipe = write_recipe(tmp_path, str(wd14_dir))
    extra = tmp_path / "extra"
    image(extra / "x.png", (0, 0, 255))
    (extra / "x.txt").write_text("old\n")
    assert call("tag", str(recipe), "--dir", str(extra), "--batch-size", "1") == 0
    assert (extra / "x.txt").read_text() == "old\n"  # kept
    assert call("tag", str(recipe), "--dir", str(extra), "--overwrite") == 0
    assert (extra / "x.txt").read_text() == "sks, blue hair, 1girl, hatsune miku\n"
    captured = capsys.readouterr()
    assert "extra: top tags" in captured.out and "blue hair" in captured.out
    assert json.loads((extra / "tag_frequency.json").read_text())["extra"]["sks"] == 1
    assert not (tmp_path / "train" / "10_char" / "a.txt").exists()  # only --dir was tagged


def test_append_option_and_custom_report(tmp_path: Path, wd14_dir: Path) -> None:
    recipe = write_recipe(tmp_path, str(wd14_dir))
    caption = tmp_path / "train" / "10_char" / "a.txt"
    caption.write_text("solo\n")
    report = tmp_path / "freq.json"
    assert call("tag", str(recipe), "--append", "--report", str(report)) == 0
    assert caption.read_text() == "sks, solo, blue hair, 1girl, hatsune miku\n"
    assert json.loads(report.read_text())["10_char"]["solo"] == 1


def test_overwrite_and_append_together_is_a_usage_error(tmp_path: Path, wd14_dir: Path) -> None:
    recipe = write_recipe(tmp_path, str(wd14_dir))
    assert call("tag", str(recipe), "--overwrite", "--append") == 2


def test_bad_images_exit_2_after_tagging_the_rest(tmp_path: Path, wd14_dir: Path, capsys) -> None:
    recipe = write_recipe(tmp_path, str(wd14_dir))
    (tmp_path / "train" / "10_char" / "bad.png").write_bytes(b"garbage")
    assert call("tag", str(recipe)) == 2
    err = capsys.readouterr().err
    assert "bad.png" in err and "1 image(s) were not captioned" in err
    assert (tmp_path / "train" / "10_char" / "a.txt").exists()
    assert (tmp_path / "out" / "tag_frequency.json").exists()


def test_offline_hub_model_names_the_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    recipe = write_recipe(tmp_path, "SmilingWolf/wd-v1-4-convnext-tagger-v2")
    assert call("tag", str(recipe)) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "SmilingWolf/wd-v1-4-convnext-tagger-v2" in err and "offline" in err
    assert "model.onnx, selected_tags.csv" in err
    folder = tmp_path / "models" / "wd-v1-4-convnext-tagger-v2"  # next to the recipe
    assert str(folder) in "".join(err.split())  # (the console may wrap inside the path)
    assert "Traceback" not in err


def test_missing_onnxruntime_exit_2(tmp_path: Path, wd14_dir: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    recipe = write_recipe(tmp_path, str(wd14_dir))
    assert call("tag", str(recipe)) == 2
    assert "loraforge[tag]" in capsys.readouterr().err


def test_missing_local_model_folder(tmp_path: Path, capsys) -> None:
    recipe = write_recipe(tmp_path, "./no/such/tagger")
    assert call("tag", str(recipe)) == 2
    assert "no such folder" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["keep", "overwrite"])
def test_existing_captions_from_recipe(tmp_path: Path, wd14_dir: Path, mode: str) -> None:
    recipe = write_recipe(tmp_path, str(wd14_dir), extra=f"  existing_captions: {mode}\n")
    caption = tmp_path / "train" / "5_style" / "c.txt"
    caption.write_text("mine\n")
    assert call("tag", str(recipe)) == 0
    expected = "mine\n" if mode == "keep" else "sks, blue hair, 1girl, hatsune miku\n"
    assert caption.read_text() == expected


def test_image_bytes_unchanged(tmp_path: Path, wd14_dir: Path) -> None:
    recipe = write_recipe(tmp_path, str(wd14_dir))
    files = sorted((tmp_path / "train").rglob("*.png"))
    before = [f.read_bytes() for f in files]
    assert call("tag", str(recipe), "--overwrite") == 0
    assert [f.read_bytes() for f in files] == before
    assert np.asarray(Image.open(files[0])).shape == (8, 8, 3)


def test_tag_prints_the_recipe_warnings_once_before_tagging(
    tmp_path: Path, wd14_dir: Path, capsys
) -> None:
    message = "min_snr_gamma and debiased estimation both reweight the loss by timestep"
    extra = "training:\n  min_snr_gamma: 5\n  debiased_estimation_loss: true\n"
    recipe = write_recipe(tmp_path, str(wd14_dir), extra)
    assert call("tag", str(recipe)) == 0
    stderr = " ".join(capsys.readouterr().err.split())
    assert stderr.count(message) == 1
    assert stderr.index(message) < stderr.index("tagging with")
    # with --dir the recipe's dataset folders are not read, so not checked
    (tmp_path / "other.yaml").write_text(
        recipe.read_text().replace("- dir: train", "- dir: missing"), encoding="utf-8"
    )
    extra_dir = tmp_path / "extra"
    image(extra_dir / "x.png", (0, 0, 255))
    assert call("tag", str(tmp_path / "other.yaml"), "--dir", str(extra_dir)) == 0
    assert call("tag", str(tmp_path / "other.yaml")) == 2
    assert "dataset.subsets[0].dir:" in " ".join(capsys.readouterr().err.split())
