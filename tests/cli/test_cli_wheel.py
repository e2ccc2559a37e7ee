"""A non-editable install finds its data: schema, presets, architecture configs, CLIP vocabulary."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("hatchling", reason="builds the wheel without build isolation")


def test_the_wheel_carries_its_data_and_works_from_a_plain_install(tmp_path: Path) -> None:
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next(tmp_path.glob("loraforge-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "loraforge/_data/schema/recipe.schema.json",
        "loraforge/_data/recipes/char-8gb.yaml",
        "loraforge/models/configs/sdxl/unet/config.json",
        "loraforge/models/clip/bpe_simple_vocab_16e6.txt.gz",
        "loraforge/models/clip/NOTICE",
        "loraforge/models/pretrained/demo-sd1.safetensors",  # the demo base model
    ):
        assert expected in names, expected
    assert not [n for n in names if n.startswith("tests/") or "__pycache__" in n]

    target = tmp_path / "site"
    installed = subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = (
        "import loraforge, sys; from loraforge.cli import run\n"
        "print(loraforge.__file__)\n"
        "sys.exit(run(['init', '--preset', 'char-8gb', '-o', 'r.yaml']) "
        "or run(['check', 'r.yaml', '--no-data']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=work, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[0].startswith(str(target))  # the installed copy ran
    assert (work / "r.yaml").is_file()
