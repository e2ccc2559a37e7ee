"""The run report's reading of a metrics file: sampling points, sessions, validation, gaps."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from loraforge.training.metrics import MetricsLog
from loraforge.training.report_page import render_page
from loraforge.training.run_report import image_data_uri, load_run
from loraforge.training.settings import SampleSpec


def _step(log: MetricsLog, step: int, loss: float) -> None:
    log.record("step", step, epoch=1, loss=loss, average=loss, lr={"unet": 1e-4},
               grad_norm=0.5, max_norm=None, skipped=False, seconds=0.2, peak_memory=2**30)  # fmt: skip


def _write_run(out: Path) -> Path:
    path = out / "r-metrics.jsonl"
    log = MetricsLog(path)
    log.begin(0, resumed=False, facts={"name": "r", "length": {"max_train_steps": 6}})
    specs = [
        SampleSpec(0, "a <b>cat</b>", "", 64, 64, seed=1, steps=2, cfg_scale=7.0),
        SampleSpec(1, "a dog", "", 64, 64, seed=2, steps=2, cfg_scale=7.0),
    ]
    for step in (1, 2, 3):
        _step(log, step, 1.0 / step)
    files = [out / "sample" / "r_e000001_00_1.png", out / "sample" / "r_e000001_01_2.png"]
    files[0].parent.mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 10, 10)).save(files[0])  # the dog's file is missing
    log.samples(3, "epoch", 1, specs, files)
    log.record("validation", 3, validation_loss=0.4)
    log.begin(3, resumed=True, facts={"name": "r", "length": {"max_train_steps": 6}})
    _step(log, 4, 0.3)
    log.record("validation", 4, validation_loss=0.35)
    big = out / "sample" / "r_000004_00_1.png"
    Image.new("RGB", (1024, 512), (10, 200, 10)).save(big)
    log.samples(4, "step", 4, specs[:1], [big])
    with path.open("a", encoding="utf-8") as f:
        f.write('{"kind": "step", "step": 5, "lo')  # a run killed mid-line
    return path


def test_the_report_reads_points_sessions_and_validation(tmp_path) -> None:
    data = load_run(_write_run(tmp_path))
    assert [s["step"] for s in data.steps] == [1, 2, 3, 4]
    assert data.validation == [(3, 0.4), (4, 0.35)]
    assert [(s["step"], s["resumed"]) for s in data.sessions] == [(0, False), (3, True)]
    assert [(p.step, p.label) for p in data.points] == [(3, "epoch 1"), (4, "step 4")]
    assert data.prompts == {0: "a <b>cat</b>", 1: "a dog"}
    page = render_page(data)
    assert "epoch 1<br>(step 3)" in page and "<th>step 4</th>" in page
    assert page.count('class="missing"') == 2  # the dog at epoch 1 and at step 4
    assert "a &lt;b&gt;cat&lt;/b&gt;" in page and "<b>cat" not in page
    assert "resumed at step 3" in page and "4 of 6" in page
    assert "0.35000 at step 4" in page
    assert "1.00 GiB" in page


def test_large_samples_are_shrunk_into_the_page(tmp_path) -> None:
    import base64
    import io

    path = tmp_path / "big.png"
    Image.new("RGB", (1024, 512), (10, 200, 10)).save(path)
    uri = image_data_uri(path)
    assert uri is not None and uri.startswith("data:image/jpeg;base64,")
    shrunk = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert shrunk.size == (256, 128)
    assert image_data_uri(tmp_path / "nothing.png") is None


def test_a_run_without_samples_or_recipe_says_so(tmp_path) -> None:
    path = tmp_path / "q-metrics.jsonl"
    path.write_text(json.dumps({"kind": "step", "step": 1, "loss": 0.5}) + "\n", encoding="utf-8")
    page = render_page(load_run(path))
    assert "no sample images were written" in page
    assert "the metrics file holds no recipe" in page
    assert "no VRAM estimate in the metrics file" in page


def test_the_report_command_does_not_import_torch(tmp_path) -> None:
    import subprocess
    import sys

    _write_run(tmp_path)
    code = (
        "import sys; from loraforge.cli import run\n"
        f"code = run(['report', {str(tmp_path)!r}])\n"
        "print(code, sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split("\n")[-2] == "0 []", result.stdout + result.stderr
    assert (tmp_path / "r-report.html").is_file()
