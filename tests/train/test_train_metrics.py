"""The metrics file of a real tiny run: every step once, numbers checked independently, and a
resume that appends without duplicating steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraforge.recipe import load_recipe
from loraforge.training.run import run_training

LR, TE_LR, MAX_NORM = 1e-3, 5e-4, 0.05
OVERRIDES = {
    "training": {
        "max_train_steps": 4,
        "learning_rate": LR,
        "text_encoder_lr": TE_LR,
        "lr_scheduler": "constant",
        "scale_weight_norms": MAX_NORM,
    },
    "output": {"save_every_n_steps": 2, "save_state": True},
    "sample": {
        "every_n_steps": 2,
        "at_first": True,
        "prompts": [{"prompt": "a red circle", "seed": 3, "steps": 2}],
    },
}


def _records(out: Path) -> list[dict]:
    path = out / "t-metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def metrics_run(tmp_path_factory, make_recipe) -> tuple[Path, Path, tuple[float, ...]]:
    """(recipe, output folder, losses) of a 4-step run with max-norm, saves and samples."""
    folder = tmp_path_factory.mktemp("metrics")
    recipe = make_recipe(folder, OVERRIDES)
    result = run_training(load_recipe(recipe))
    return recipe, folder / "out", result.losses


def test_every_step_is_recorded_once_with_its_numbers(metrics_run) -> None:
    _, out, losses = metrics_run
    steps = [r for r in _records(out) if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert tuple(r["loss"] for r in steps) == losses
    # the moving average over the last epoch's steps (one epoch here: the running mean)
    for index, record in enumerate(steps):
        window = losses[: index + 1]
        assert record["average"] == pytest.approx(sum(window) / len(window), rel=1e-12)
    assert all(r["lr"] == {"textencoder": TE_LR, "unet": LR} for r in steps)
    assert all(r["epoch"] == 1 and not r["skipped"] for r in steps)
    assert all(r["grad_norm"] > 0 and r["seconds"] > 0 and r["peak_memory"] > 0 for r in steps)


def test_the_max_norm_figures_match_the_saved_weights(metrics_run) -> None:
    """After the last step the saved file holds the weights max-norm just scaled: the norms of
    its deltas ``up @ down * alpha / rank`` are the figures the last record reports."""
    _, out, _ = metrics_run
    last = [r for r in _records(out) if r["kind"] == "step"][-1]["max_norm"]
    tensors = load_file(str(out / "t.safetensors"))
    norms = []
    for key in (k for k in tensors if k.endswith(".lora_down.weight")):
        prefix = key.removesuffix(".lora_down.weight")
        down = tensors[key].double()
        up = tensors[f"{prefix}.lora_up.weight"].double()
        scale = float(tensors[f"{prefix}.alpha"]) / down.shape[0]
        delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1) * scale
        norms.append(float(torch.linalg.norm(delta)))
    assert last["max_norm"] == pytest.approx(max(norms), rel=1e-4)
    assert last["mean_norm"] == pytest.approx(sum(norms) / len(norms), rel=1e-4)
    assert 0 < last["keys_scaled"] <= len(norms) and max(norms) <= MAX_NORM * (1 + 1e-5)


def test_the_run_and_sample_records(metrics_run) -> None:
    recipe, out, _ = metrics_run
    records = _records(out)
    run = records[0]
    assert run["kind"] == "run" and run["step"] == 0 and run["resumed"] is False
    assert run["recipe_file"] == str(recipe)
    assert run["recipe"]["training"]["learning_rate"] == LR
    assert run["length"]["max_train_steps"] == 4
    assert sum(b["images"] for b in run["buckets"]) == 6
    assert run["vram_estimate"]["tensor_bytes"] > 0
    assert run["peak_memory_kind"] == "process_peak_rss"
    samples = [r for r in records if r["kind"] == "sample"]
    assert [r["step"] for r in samples] == [0, 2, 4]
    for record in samples:
        (image,) = record["images"]
        assert image["prompt"] == "a red circle" and image["seed"] == 3
        assert (out / image["file"]).is_file()


def test_a_resumed_run_appends_without_duplicating_steps(metrics_run, tmp_path) -> None:
    recipe, out, losses = metrics_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    moved = tmp_path / "recipe.yaml"
    moved.write_text(
        recipe.read_text(encoding="utf-8").replace(str(out), str(copy)), encoding="utf-8"
    )
    run_training(load_recipe(moved), resume=str(copy / "t-step00000002-state"))
    records = _records(copy)
    assert [r["step"] for r in records if r["kind"] == "step"] == [1, 2, 3, 4]
    # resume equals uninterrupted, so the resumed steps' losses are the first run's
    assert tuple(r["loss"] for r in records if r["kind"] == "step") == losses
    runs = [(r["step"], r["resumed"]) for r in records if r["kind"] == "run"]
    assert runs == [(0, False), (2, True)]
    assert [r["step"] for r in records if r["kind"] == "sample"] == [0, 2, 4]


def test_an_earlier_runs_metrics_file_needs_force(write_recipe, tmp_path) -> None:
    from loraforge.training.dry_run import build_plan

    recipe = write_recipe()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "t-metrics.jsonl").write_text("", encoding="utf-8")
    plan = build_plan(load_recipe(recipe))
    assert plan.existing == [tmp_path / "out" / "t-metrics.jsonl"]


# --- the run report -------------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
VALIDATION_LOSSES = {2: 0.21, 4: 0.17}  # what validation code would record


@pytest.fixture
def reported(metrics_run, tmp_path) -> Path:
    """A copy of the run's output folder with validation records added through the API."""
    from loraforge.training.metrics import MetricsLog

    _, out, _ = metrics_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    log = MetricsLog(copy / "t-metrics.jsonl")
    for step, loss in VALIDATION_LOSSES.items():
        log.record("validation", step, validation_loss=loss)
    return copy


def _report(*args: str) -> int:
    from loraforge.cli import run

    return run(["report", *args])


def test_the_report_is_one_self_contained_page(reported, capsys) -> None:
    import base64
    import io
    import re

    from PIL import Image

    assert _report(str(reported)) == 0
    page = (reported / "t-report.html").read_text(encoding="utf-8")
    # nothing is fetched: no script, no external source, stylesheet or link
    assert "<script" not in page and "@import" not in page
    assert not re.search(r'(src|href)="(?!data:)', page)
    images = re.findall(r'<img src="data:image/(png|jpeg);base64,([^"]+)"', page)
    assert len(images) == 3  # one prompt at steps 0, 2 and 4
    files = sorted((reported / "sample").glob("t_0*.png"))  # steps 0, 2, 4 in order
    for (_, data), file in zip(images, files, strict=True):
        embedded = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
        assert embedded.tobytes() == Image.open(file).convert("RGB").tobytes()  # lossless PNG
    assert "a red circle" in page
    assert "best validation loss</th><td>0.17000 at step 4" in page
    assert page.count("<svg") == 6  # 4 training curves, buckets, memory
    assert "learning_rate: 0.001" in page  # the recipe
    # a second report needs --force
    assert _report(str(reported)) == 2
    assert "--force" in capsys.readouterr().err
    assert _report(str(reported), "--force") == 0


def test_the_report_finds_the_run_from_its_recipe(metrics_run, tmp_path) -> None:
    recipe = metrics_run[0]
    page = tmp_path / "page.html"
    assert _report(str(recipe), "-o", str(page)) == 0
    assert "loraforge run report: t" in page.read_text(encoding="utf-8")


def test_the_report_names_what_is_missing(tmp_path, capsys) -> None:
    assert _report(str(tmp_path)) == 2
    assert "no metrics file" in capsys.readouterr().err
    for name in ("a", "b"):
        (tmp_path / f"{name}-metrics.jsonl").write_text('{"kind": "step", "step": 1}\n')
    assert _report(str(tmp_path)) == 2
    error = capsys.readouterr().err
    assert "several runs: a, b" in error and "--name" in error
    assert _report(str(tmp_path), "--name", "c") == 2
    assert "c-metrics.jsonl: no such metrics file" in capsys.readouterr().err
    (tmp_path / "c-metrics.jsonl").write_text("not json\n")
    assert _report(str(tmp_path), "--name", "c") == 2
    assert "holds no metrics record" in capsys.readouterr().err
    assert _report(str(tmp_path / "nowhere")) == 2


def _colour_pixels(image, colour: str, tolerance: int = 6) -> int:
    """Pixels of ``image`` within ``tolerance`` of ``#rrggbb`` in every channel."""
    target = tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return sum(
        count
        for count, pixel in image.getcolors(maxcolors=2**24)
        if all(abs(a - b) <= tolerance for a, b in zip(pixel, target, strict=True))
    )


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (/usr/bin/chromium)")
def test_the_report_renders_its_charts_in_a_headless_browser(reported, tmp_path) -> None:
    import subprocess

    from PIL import Image

    from loraforge.training import report_page as colours

    assert _report(str(reported)) == 0
    shot = tmp_path / "shot.png"
    profile = tmp_path / "profile"
    profile.mkdir()
    subprocess.run(
        [
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={profile}", f"--screenshot={shot}",
            "--window-size=1200,2000", (reported / "t-report.html").as_uri(),
        ],
        check=True, capture_output=True, timeout=180,
    )  # fmt: skip
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 2000)
    # every chart draws its lines and bars in its own colour; a legend swatch alone is 100
    # pixels, a drawn line or bar many more
    drawn = {
        "loss average": colours.AVERAGE,
        "validation loss": colours.VALIDATION,
        "unet lr": colours.LR_COLORS[1],
        "text encoder lr": colours.LR_COLORS[0],
        "gradient norm": colours.GRAD,
        "max-norm": colours.KEY_NORM,
        "step time": colours.SECONDS,
        "bucket images x repeats": colours.BUCKET_SAMPLES,
        "bucket images": colours.BUCKET_IMAGES,
        "measured memory": colours.VRAM_MEASURED,
    }
    counts = {what: _colour_pixels(image, colour) for what, colour in drawn.items()}
    assert all(count > 300 for count in counts.values()), counts
    # the sample images (drawn noise of the tiny model) make the samples row colourful
    assert len(image.getcolors(maxcolors=2**24)) > 2000
