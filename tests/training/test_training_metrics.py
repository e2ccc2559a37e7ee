"""The metrics file writer: records, resume truncation, strict JSON, and the gradient norm."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from loraforge.backends.base import MaxNormResult
from loraforge.training.display import StepReport
from loraforge.training.metrics import MetricsLog, kept_on_resume, read_metrics
from loraforge.training.settings import SampleSpec
from loraforge.training.step import apply_update, unclipped_grad_norm


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _report(step: int, loss: float, **kwargs) -> StepReport:
    return StepReport(
        step=step, epoch=1, loss=loss, average=loss, lrs={"unet": 1e-4, "textencoder": 5e-5},
        **kwargs,
    )  # fmt: skip


def _lines(path: Path) -> list[dict]:
    # an independent reader: strict JSON, every line
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_a_session_writes_run_step_sample_and_validation_records(tmp_path) -> None:
    clock = FakeClock()
    path = tmp_path / "t-metrics.jsonl"
    log = MetricsLog(path, clock=clock)
    log.begin(0, resumed=False, facts={"name": "t"})
    clock.now += 2.5
    result = MaxNormResult(keys_scaled=3, mean_norm=0.5, max_norm=1.0)
    log.step(_report(1, 0.25, max_norm=result), grad_norm=torch.tensor(3.0), device=None)
    log.restart_clock()  # saving and sampling are not step time
    clock.now += 10.0
    log.restart_clock()
    clock.now += 1.5
    log.step(_report(2, float("nan")), grad_norm=float("inf"), skipped=True)
    spec = SampleSpec(0, "p", "", 64, 64, seed=1, steps=2, cfg_scale=7.0)
    log.samples(2, "step", 2, [spec], [tmp_path / "sample" / "t_000002_00_1.png"])
    log.record("validation", 2, validation_loss=0.125)
    records = _lines(path)
    assert [(r["kind"], r["step"]) for r in records] == [
        ("run", 0), ("step", 1), ("step", 2), ("sample", 2), ("validation", 2),
    ]  # fmt: skip
    run, first, second, sample, validation = records
    assert run["name"] == "t" and run["resumed"] is False and "time" in run
    assert first["lr"] == {"unet": 1e-4, "textencoder": 5e-5}
    assert first["grad_norm"] == 3.0 and first["seconds"] == 2.5
    assert first["max_norm"] == {"keys_scaled": 3, "mean_norm": 0.5, "max_norm": 1.0}
    assert first["peak_memory"] > 0  # the process's peak RSS on a CPU
    assert second["loss"] is None and second["grad_norm"] is None and second["skipped"] is True
    assert second["seconds"] == 1.5 and second["max_norm"] is None
    assert sample["images"] == [
        {"file": "sample/t_000002_00_1.png", "prompt": "p", "index": 0, "seed": 1}
    ]
    assert validation["validation_loss"] == 0.125


def test_peak_memory_on_the_cpu_is_the_process_peak_rss(tmp_path) -> None:
    import resource

    log = MetricsLog(tmp_path / "m.jsonl")
    log.step(_report(1, 0.1), device=torch.device("cpu"))
    peak = _lines(tmp_path / "m.jsonl")[0]["peak_memory"]
    now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert 0 < peak <= now


def test_a_fresh_run_starts_the_file_anew_at_its_first_record(tmp_path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"kind": "step", "step": 7}\n', encoding="utf-8")
    log = MetricsLog(path)
    log.begin(0, resumed=False, facts={})
    assert [r["step"] for r in _lines(path)] == [7]  # a run failing now changes nothing
    log.record("step", 1)
    assert [(r["kind"], r["step"]) for r in _lines(path)] == [("run", 0), ("step", 1)]


def test_a_session_that_records_nothing_writes_no_file(tmp_path) -> None:
    MetricsLog(tmp_path / "m.jsonl").begin(0, resumed=False, facts={})
    assert not (tmp_path / "m.jsonl").exists()


def test_a_resumed_run_drops_the_records_after_its_step(tmp_path) -> None:
    path = tmp_path / "m.jsonl"
    old = [
        {"kind": "run", "step": 0},
        *({"kind": "step", "step": s} for s in range(1, 6)),
        {"kind": "sample", "step": 3},
        {"kind": "run", "step": 3},  # an earlier resume at the same step
        {"kind": "validation", "step": 4},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in old), encoding="utf-8")
    log = MetricsLog(path)
    log.begin(3, resumed=True, facts={"name": "t"})
    log.record("step", 4)
    records = [(r["kind"], r["step"]) for r in _lines(path)]
    assert records == [
        ("run", 0), ("step", 1), ("step", 2), ("step", 3), ("sample", 3), ("run", 3), ("step", 4),
    ]  # fmt: skip
    assert _lines(path)[-2]["resumed"] is True


def test_kept_on_resume_and_a_truncated_last_line(tmp_path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"kind": "step", "step": 1}\n{"kind": "step", "st', encoding="utf-8")
    assert read_metrics(path) == [{"kind": "step", "step": 1}]
    assert kept_on_resume([{"kind": "run", "step": 2}, {"kind": "step", "step": 2}], 2) == [
        {"kind": "step", "step": 2}
    ]


def test_a_log_without_a_path_writes_nothing(tmp_path) -> None:
    log = MetricsLog(None)
    log.begin(0, resumed=False, facts={})
    log.step(_report(1, 0.1))
    log.record("validation", 1, validation_loss=1.0)
    assert not log.enabled and list(tmp_path.iterdir()) == []


class _Accelerator:
    scaler = None

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


class _Scheduler:
    def step(self) -> None:
        pass


def _model_with_grads() -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    grads = [torch.randn_like(p) for p in model.parameters()]
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g.clone()
    expected = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    return model, torch.tensor(expected)


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.1, 100.0])
def test_the_update_reports_the_pre_clip_gradient_norm(max_grad_norm) -> None:
    model, expected = _model_with_grads()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    class _Network:
        def apply_max_norm(self, value):
            raise AssertionError("max-norm is off")

    update = apply_update(
        _Accelerator(), optimizer, _Scheduler(), _Network(), list(model.parameters()),
        max_grad_norm=max_grad_norm, scale_weight_norms=None,
    )  # fmt: skip
    assert float(update.grad_norm) == pytest.approx(float(expected), rel=1e-6)


def test_the_unclipped_norm_undoes_the_fp16_loss_scale() -> None:
    model, expected = _model_with_grads()

    class _Scaler:
        def is_enabled(self) -> bool:
            return True

        def get_scale(self) -> float:
            return 1024.0

    for p in model.parameters():
        p.grad *= 1024.0
    norm = unclipped_grad_norm(list(model.parameters()), _Scaler())
    assert float(norm) == pytest.approx(float(expected), rel=1e-6)
    assert unclipped_grad_norm([nn.Parameter(torch.zeros(2))]) is None
