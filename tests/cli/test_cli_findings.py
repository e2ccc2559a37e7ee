"""`check` findings: clickable lines, one rule for missing data, what this machine lacks, and the
same findings (and severities) in `check` as in the commands that load a recipe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", "loraforge", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        env=env,
    )


def problems_of(result: subprocess.CompletedProcess) -> list[dict]:
    return json.loads(result.stdout)[0]["problems"]


def test_a_missing_dataset_folder_is_an_error_unless_checked_without_data(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(
        "model: {base: org/model}\ndataset:\n  subsets:\n    - dir: todo\n"
        "training: {mixed_precision: bf16}\n"
    )
    result = run("check", "r.yaml", "--format", "json", cwd=tmp_path)
    assert result.returncode == 1
    [problem] = problems_of(result)
    assert problem["severity"] == "error" and problem["path"] == "dataset.subsets[0].dir"
    assert "train will stop" in problem["message"]
    without = run("check", "r.yaml", "--no-data", "--format", "json", cwd=tmp_path)
    assert without.returncode == 0 and problems_of(without) == []
    # train agrees: it stops on the same finding, named the same way, before loading anything
    train = run("train", "r.yaml", cwd=tmp_path)
    assert train.returncode == 2
    assert "r.yaml:4:12: dataset.subsets[0].dir:" in " ".join(train.stderr.split())


def test_missing_model_files_are_errors_unless_checked_without_data(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "r.yaml").write_text(
        "model: {base: ./no.safetensors}\ndataset: {subsets: [{dir: d}]}\n"
        "training: {mixed_precision: bf16}\n"
    )
    found = problems_of(run("check", "r.yaml", "--format", "json", cwd=tmp_path))
    model = [p for p in found if p["path"] == "model.base"]
    assert [p["severity"] for p in model] == ["error"]
    without = problems_of(run("check", "r.yaml", "--no-data", "--format", "json", cwd=tmp_path))
    assert without == []


def test_check_warns_about_the_package_an_optimizer_needs(tmp_path: Path, monkeypatch) -> None:
    from loraforge.commands.check import check_recipe
    from loraforge.machine import has_package

    (tmp_path / "r.yaml").write_text(
        "model: {base: org/model}\ndataset: {subsets: [{dir: d}]}\n"
        "training: {optimizer: Prodigy, learning_rate: 1.0, mixed_precision: bf16}\n"
    )
    assert has_package("prodigyopt")  # a dev dependency: nothing to report
    assert not check_recipe(tmp_path / "r.yaml", data=False).problems
    monkeypatch.setattr("loraforge.machine.has_package", lambda name: name != "prodigyopt")
    [problem] = check_recipe(tmp_path / "r.yaml", data=False).problems
    assert problem.severity == "warning" and problem.path == "training.optimizer"
    assert (problem.line, problem.column) == (3, 23)
    assert "prodigyopt" in problem.message and "not installed" in problem.message
    assert "pip install prodigyopt" in problem.hint and "loraforge[optimizers]" in problem.hint


def test_check_warns_about_fp16_and_8bit_optimizers_without_a_gpu(tmp_path, monkeypatch) -> None:
    from loraforge.commands.check import check_recipe

    (tmp_path / "r.yaml").write_text(
        "model: {base: org/model}\ndataset: {subsets: [{dir: d}]}\n"
        "training: {optimizer: AdamW8bit, mixed_precision: fp16, attention: xformers}\n"
    )
    monkeypatch.setattr("loraforge.machine.cuda_available", lambda: False)
    monkeypatch.setattr("loraforge.machine.gpu_available", lambda: False)
    monkeypatch.setattr("loraforge.machine.has_package", lambda name: name != "xformers")
    problems = check_recipe(tmp_path / "r.yaml", data=False).problems
    by_field = {p.path: p for p in problems}
    assert {p.severity for p in problems} == {"warning"}
    assert "CUDA" in by_field["training.optimizer"].message
    assert "fp16 needs a GPU" in by_field["training.mixed_precision"].message
    assert "pip install xformers" in by_field["training.attention"].hint
    # with a GPU and the packages, nothing to say
    monkeypatch.setattr("loraforge.machine.cuda_available", lambda: True)
    monkeypatch.setattr("loraforge.machine.gpu_available", lambda: True)
    monkeypatch.setattr("loraforge.machine.has_package", lambda name: True)
    assert check_recipe(tmp_path / "r.yaml", data=False).problems == ()


def test_the_torch_free_gpu_guess(monkeypatch) -> None:
    import loraforge.machine as machine

    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.setattr(machine, "_torch_build", lambda: "cpu")
    assert machine.cuda_available() is False
    monkeypatch.setattr(machine, "_torch_build", lambda: "cu124")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert machine.cuda_available() is False


def test_bucket_errors_are_listed_once(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "d").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "d" / "a.png")  # bucketing then runs too
    (tmp_path / "r.yaml").write_text(
        "model: {base: org/model}\n"
        "dataset:\n  resolution: [512, 256]\n  min_bucket_reso: 320\n  subsets: [{dir: d}]\n"
    )
    found = problems_of(run("check", "r.yaml", "--format", "json", cwd=tmp_path))
    bucket = [p for p in found if "bucket range" in p["message"]]
    assert len(bucket) == 1 and bucket[0]["severity"] == "error"


def test_bucket_prints_the_recipe_warnings_once(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "d" / "1_cat").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(tmp_path / "d" / "1_cat" / "a.png")  # no caption: a warning
    (tmp_path / "r.yaml").write_text(
        "model: {base: org/model}\ndataset: {subsets: [{dir: d}]}\n"
        "training: {min_snr_gamma: 5, debiased_estimation_loss: true, mixed_precision: bf16}\n"
    )
    check = problems_of(run("check", "r.yaml", "--format", "json", cwd=tmp_path))
    assert {p["severity"] for p in check} == {"warning"} and len(check) == 2
    bucket = run("bucket", "r.yaml", cwd=tmp_path)
    assert bucket.returncode == 0, bucket.stderr
    stderr = " ".join(bucket.stderr.split())
    for problem in check:
        assert stderr.count(problem["message"]) == 1, problem["message"]
    assert "r.yaml:3:" in stderr  # with its place, as check prints it


def _extra_requirements(extras: dict[str, list[str]], name: str) -> set[str]:
    """The package names an extra installs, through ``loraforge[other]`` references."""
    names: set[str] = set()
    for requirement in extras[name]:
        if requirement.startswith("loraforge["):
            for other in requirement[len("loraforge[") : -1].split(","):
                names |= _extra_requirements(extras, other)
        else:
            names.add(requirement.split(">")[0].split("=")[0].split(";")[0].strip())
    return names


def test_every_package_a_preset_needs_comes_with_the_extra_check_names() -> None:
    import re

    from loraforge.machine import install_command
    from loraforge.presets import list_presets
    from loraforge.recipe import load_recipe
    from loraforge.training.optim import optimizer_spec

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    needed = {
        optimizer_spec(load_recipe(p.path).training.optimizer).package for p in list_presets()
    }
    assert "bitsandbytes" in needed
    for package in needed - {None}:
        extra = re.search(r"loraforge\[(\w+)\]", install_command(package)).group(1)
        assert package in _extra_requirements(extras, extra), (package, extra)
    assert "bitsandbytes" in _extra_requirements(extras, "gpu")
