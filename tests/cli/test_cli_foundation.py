"""The CLI boundary: exit codes, init, check formats, and no heavy imports at start-up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loraforge.presets import list_presets


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loraforge", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_version_and_help() -> None:
    assert run("--version").stdout.startswith("loraforge ")
    result = run("--help")
    assert result.returncode == 0
    for name in ("init", "check", "tag", "bucket", "cache", "train", "resize", "merge", "report"):
        assert name in result.stdout


def test_cli_import_does_not_load_heavy_libraries() -> None:
    code = "import sys, loraforge.cli; print(sorted(m for m in ('torch','diffusers','transformers') if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_init_then_check_exits_zero_without_torch(tmp_path: Path) -> None:
    assert run("init", "--preset", "char-12gb", "-o", "r.yaml", cwd=tmp_path).returncode == 0
    code = (
        "import sys; from loraforge.cli import main\ncode = 0\n"
        "try:\n    main(['check', 'r.yaml', '--no-data'])\nexcept SystemExit as e:\n    code = e.code\n"
        "print('TORCH' if 'torch' in sys.modules else 'NOTORCH', code)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.stdout.split()[-2:] == ["NOTORCH", "0"], result.stdout + result.stderr


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("mine")
    result = run("init", "--preset", "char-8gb", "-o", "r.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "--force" in result.stderr
    assert (tmp_path / "r.yaml").read_text() == "mine"
    assert (
        run("init", "--preset", "char-8gb", "-o", "r.yaml", "--force", cwd=tmp_path).returncode == 0
    )
    assert "loraforge preset: char-8gb" in (tmp_path / "r.yaml").read_text()


def test_init_unknown_preset_suggests(tmp_path: Path) -> None:
    result = run("init", "--preset", "char-12g", cwd=tmp_path)
    assert result.returncode == 2
    assert "char-12gb" in result.stderr and "Traceback" not in result.stderr


def test_init_list_shows_presets() -> None:
    result = run("init", "--list")
    for preset in (
        "char-8gb",
        "char-12gb",
        "char-24gb",
        "style-12gb",
        "style-24gb",
        "sdxl-char-12gb",
        "sdxl-char-24gb",
        "sdxl-style-24gb",
        "demo",
    ):
        assert preset in result.stdout


@pytest.mark.parametrize("preset", [p.name for p in list_presets()])
def test_every_preset_passes_check(preset: str, tmp_path: Path) -> None:
    from loraforge.commands.check import check_recipe

    # without its data: a preset's dataset folder is the user's to fill
    report = check_recipe(next(p.path for p in list_presets() if p.name == preset), data=False)
    assert [p for p in report.problems if p.severity == "error"] == []
    # The only findings allowed are about what this machine lacks (a GPU, bitsandbytes).
    assert all(p.path.startswith("training.") for p in report.problems), report.problems


BROKEN = """\
model:
  base: org/model
netwrok:
  dim: 4
dataset:
  subsets:
    - dir: data
      repeats: big
training:
  optimizer: AdamW9bit
"""


def test_check_reports_all_problems_and_exits_one(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(BROKEN)
    result = run("check", "r.yaml", "--format", "json", cwd=tmp_path)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    lines = sorted(p["line"] for p in report[0]["problems"])
    assert lines == [3, 8, 10]
    github = run("check", "r.yaml", "--format", "github", cwd=tmp_path)
    assert "::error file=r.yaml,line=3,col=1::netwrok: unknown key" in github.stdout


def test_check_prints_clickable_lines_by_default_and_a_table_on_request(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(BROKEN)
    result = run("check", "r.yaml", cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith('r.yaml:3:1: error: netwrok: unknown key "netwrok"')
    assert lines[1].startswith("r.yaml:8:16: error: dataset.subsets[0].repeats: ")
    assert lines[2].startswith("r.yaml:10:14: error: training.optimizer: ")
    assert "did you mean" in lines[0]  # the hint stays on the finding's line
    assert lines[-1] == "r.yaml: 3 error(s), 0 warning(s)"
    table = run("check", "r.yaml", "--format", "table", cwd=tmp_path)
    assert table.returncode == 1
    assert "┃ where" in table.stdout and "3:1" in table.stdout
    assert "r.yaml:3:1:" not in table.stdout


def test_check_strict_fails_on_warnings(tmp_path: Path) -> None:
    run("init", "--preset", "char-24gb", "-o", "r.yaml", cwd=tmp_path)
    text = (tmp_path / "r.yaml").read_text()
    assert run("check", "r.yaml", "--no-data", "--strict", cwd=tmp_path).returncode == 0
    # a recipe warning (on any machine): two ways of reweighting the loss
    text = text.replace("min_snr_gamma: 5", "min_snr_gamma: 5\n  debiased_estimation_loss: true")
    (tmp_path / "r.yaml").write_text(text)
    assert run("check", "r.yaml", "--no-data", cwd=tmp_path).returncode == 0
    assert run("check", "r.yaml", "--no-data", "--strict", cwd=tmp_path).returncode == 1


def test_check_places_dataset_and_backend_findings_in_the_file(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(
        "model: {base: a/b}\n"
        "dataset:\n"
        "  subsets:\n"
        "    - dir: missing\n"
        "network: {backend: lycoris, algorithm: loha, dropout: 0.1}\n"
        "training: {mixed_precision: bf16}\n"
    )
    result = run("check", "r.yaml", "--format", "github", cwd=tmp_path)
    assert result.returncode == 1
    dataset, network = result.stdout.splitlines()  # in file order
    assert dataset.startswith("::error file=r.yaml,line=4,col=12::dataset.subsets[0].dir:")
    assert network.startswith("::error file=r.yaml,line=5,col=55::network.dropout: lycoris-lora's")


def test_check_reports_model_files_that_do_not_exist(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "r.yaml").write_text(
        "model: {base: ./no.safetensors, vae: /nowhere/vae.safetensors}\n"
        "dataset: {subsets: [{dir: d}]}\n"
        "network: {weights: old.safetensors}\n"
    )
    result = run("check", "r.yaml", "--format", "json", cwd=tmp_path)
    problems = json.loads(result.stdout)[0]["problems"]
    missing = {p["path"]: p["line"] for p in problems if "does not exist" in p["message"]}
    assert missing == {"model.base": 1, "model.vae": 1, "network.weights": 3}
    assert result.returncode == 1  # train would stop on them; --no-data skips them
    (tmp_path / "hub.yaml").write_text("model: {base: org/model}\ndataset: {subsets: [{dir: d}]}\n")
    hub = json.loads(run("check", "hub.yaml", "--format", "json", cwd=tmp_path).stdout)
    assert not [p for p in hub[0]["problems"] if p["path"].startswith("model")]


def test_check_usage_errors_exit_two(tmp_path: Path) -> None:
    missing = run("check", "nope.yaml", cwd=tmp_path)
    assert missing.returncode == 2 and "no such file" in missing.stderr
    directory = run("check", ".", cwd=tmp_path)
    assert directory.returncode == 2 and "Traceback" not in directory.stderr


def test_debug_shows_traceback(tmp_path: Path) -> None:
    result = run("--debug", "check", "nope.yaml", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_usage_errors_exit_two_without_traceback(tmp_path: Path) -> None:
    # Regression: typer bundles its own click, whose usage errors escaped as tracebacks.
    for args in (["check"], ["init", "--preset"], ["no-such-command"]):
        result = run(*args, cwd=tmp_path)
        assert result.returncode == 2, args
        assert "Traceback" not in result.stderr


def test_check_reports_what_the_backend_refuses(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(
        "model: {base: a/b}\ndataset: {subsets: [{dir: d}]}\n"
        "network: {backend: lycoris, algorithm: loha, dropout: 0.1}\n"
    )
    result = run("check", "r.yaml", "--format", "json", cwd=tmp_path)
    assert result.returncode == 1
    problems = json.loads(result.stdout)[0]["problems"]
    assert any(p["severity"] == "error" and "dropout" in p["message"] for p in problems)


def _preset_path(name: str) -> Path:
    return next(p.path for p in list_presets() if p.name == name)


def test_check_vram_budget_passes_and_fails() -> None:
    recipe = str(_preset_path("sdxl-char-12gb"))
    ok = run("check", recipe, "--no-data", "--vram", "--budget", "12GB", "--format", "json")
    assert ok.returncode == 0, ok.stderr
    estimate = json.loads(ok.stdout)[0]["vram"]
    assert 0 < estimate["total_bytes"] <= 12 * 2**30
    components = " ".join(row["component"] for row in estimate["rows"])
    for part in ("UNet weights", "optimizer state", "activations", "CUDA context"):
        assert part in components
    tight = run("check", recipe, "--no-data", "--budget", "4GB", "--format", "json")
    assert tight.returncode == 1
    problems = json.loads(tight.stdout)[0]["problems"]
    over = [p for p in problems if "exceeds the budget" in p["message"]]
    assert over and over[0]["hint"].startswith("try:")
    assert json.loads(tight.stdout)[0]["vram"]["suggestions"]


def test_check_vram_method_traced_on_the_command_line(tmp_path: Path) -> None:
    # the demo's tiny model keeps the traced step quick; the method is the traced one
    assert run("init", "--preset", "demo", "--dir", "d", cwd=tmp_path).returncode == 0
    args = ["check", "d/recipe.yaml", "--vram", "--format", "json"]
    traced = run(*args, "--vram-method", "traced", cwd=tmp_path)
    assert traced.returncode == 0, traced.stderr
    estimate = json.loads(traced.stdout)[0]["vram"]
    assert estimate["method"] == "traced" and estimate["total_bytes"] > 0
    analytic = json.loads(run(*args, cwd=tmp_path).stdout)[0]["vram"]
    assert analytic["method"] == "analytic"
    # the two methods agree on the tiny model too (about 5% apart)
    assert abs(estimate["tensor_bytes"] / analytic["tensor_bytes"] - 1) < 0.1


def test_check_budget_from_the_preset_header_without_torch() -> None:
    code = (
        "import sys; from loraforge.cli import main\ncode = 0\n"
        f"try:\n    main(['check', {str(_preset_path('char-8gb'))!r}, '--no-data', '--budget', "
        "'header'])\n"
        "except SystemExit as e:\n    code = e.code\n"
        "print('TORCH' if 'torch' in sys.modules else 'NOTORCH', code)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split()[-2:] == ["NOTORCH", "0"], result.stdout + result.stderr


@pytest.mark.parametrize(
    "name", ["init", "check", "tag", "bucket", "cache", "train", "resize", "merge", "report"]
)
def test_every_command_help_shows_a_worked_example(name: str) -> None:
    from typer.testing import CliRunner

    from loraforge.cli import app

    result = CliRunner().invoke(app, [name, "--help"])
    assert result.exit_code == 0
    assert "Example" in result.stdout and f"loraforge {name}" in result.stdout
