"""``benchmarks/gpu_truth.py``: its plan of rows (``truth_plan``), and a ``--smoke`` run end to end
on the CPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
BASE_ROWS = ("char-8gb", "char-12gb", "sdxl-char-12gb", "sdxl-char-24gb")

CPU_ONLY = {"cuda_device": None, "packages": {"bitsandbytes": None, "xformers": None}}
GPU_BARE = {"cuda_device": "GPU", "bf16_supported": True, "packages": {}}
GPU_FULL = {**GPU_BARE, "packages": {"bitsandbytes": "0.45", "xformers": "0.0.30"}}


@pytest.fixture
def truth(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import truth_plan

    return truth_plan


def test_rows_are_the_presets_then_each_flipped_setting(truth):
    from truth_inputs import preset_data

    presets = {name: preset_data(name) for name in BASE_ROWS}
    rows = truth.plan_rows(presets)
    assert [r.name for r in rows[:4]] == list(BASE_ROWS)
    assert all(not r.changes for r in rows[:4])
    by_name = {r.name: r for r in rows}
    # char-8gb ships fp16, AdamW8bit, sdpa; sdxl-char-12gb ships bf16
    assert by_name["char-8gb+bf16"].changes == {"training.mixed_precision": "bf16"}
    assert by_name["char-8gb+AdamW"].changes == {"training.optimizer": "AdamW"}
    assert by_name["char-8gb+xformers"].changes == {"training.attention": "xformers"}
    assert by_name["sdxl-char-12gb+fp16"].family == "sdxl"
    assert len(rows) == 4 * (1 + len(truth.FLIPS))


def test_rows_needing_a_missing_package_or_device_say_why(truth):
    fp16_8bit = {
        "training.mixed_precision": "fp16",
        "training.optimizer": "AdamW8bit",
        "training.attention": "sdpa",
    }
    assert truth.unmet_needs(fp16_8bit, CPU_ONLY) == "fp16 needs a CUDA GPU"
    assert "bitsandbytes" in truth.unmet_needs(fp16_8bit, GPU_BARE)
    assert truth.unmet_needs(fp16_8bit, GPU_FULL) is None
    xformers = {**fp16_8bit, "training.optimizer": "AdamW", "training.attention": "xformers"}
    assert "xformers is not installed" in truth.unmet_needs(xformers, GPU_BARE)
    assert truth.unmet_needs(xformers, GPU_FULL) is None
    assert truth.stand_ins(fp16_8bit, CPU_ONLY) == {
        "training.mixed_precision": "no",
        "training.optimizer": "AdamW",
    }
    assert truth.stand_ins(fp16_8bit, GPU_BARE) == {"training.optimizer": "AdamW"}
    assert truth.stand_ins(fp16_8bit, GPU_FULL) == {}


def test_a_bare_gpu_measures_the_presets_with_stand_ins_and_skips_what_it_lacks(truth):
    from truth_inputs import preset_data

    presets = {name: preset_data(name) for name in BASE_ROWS}
    planned: dict[str, str] = {}
    plans = {
        row.name: truth.row_plan(row, presets[row.preset], GPU_BARE, planned)
        for row in truth.plan_rows(presets)
    }
    settings, adjusted, reason = plans["char-8gb"]
    assert reason is None and adjusted == {"training.optimizer": "AdamW"}
    assert settings["training.mixed_precision"] == "fp16"
    # the AdamW row is now the preset row again; xformers cannot run; bf16 runs with AdamW
    assert plans["char-8gb+AdamW"][2] == "the same settings as char-8gb here"
    assert "xformers is not installed" in plans["char-8gb+xformers"][2]
    assert plans["char-8gb+bf16"][2] is None
    assert plans["char-8gb+bf16"][1] == {"training.optimizer": "AdamW"}
    # with every package, nothing is adjusted or skipped
    full = {
        r.name: truth.row_plan(r, presets[r.preset], GPU_FULL, {}) for r in truth.plan_rows(presets)
    }
    assert all(adjusted == {} and reason is None for _, adjusted, reason in full.values())


def test_ratios_divide_what_was_measured(truth):
    estimate = {
        "analytic": {"tensor_bytes": 900, "total_bytes": 1500},
        "traced": {"tensor_bytes": 1100, "total_bytes": 1800},
    }
    measured = {
        "live_tensor_peak": 1000,
        "cuda": {
            "context": 400,
            "steady": {"max_memory_allocated": 1000, "max_memory_reserved": 1200},
        },
        "s_per_step": 0.5,
        "minimal": {"s_per_step": 0.4},
        "unet_flops": 3e12,
    }
    got = truth.ratios(estimate, measured)
    assert got["analytic_over_allocated"] == pytest.approx(0.9)
    assert got["traced_total_over_reserved_plus_context"] == pytest.approx(1800 / 1600)
    assert got["overhead_ratio"] == pytest.approx(1.25)
    assert got["achieved_tflops"] == pytest.approx(6.0)
    assert got["minimal_achieved_tflops"] == pytest.approx(7.5)
    # nothing measured on a CPU: no CUDA ratios, no division by missing numbers
    assert set(truth.ratios(estimate, {"live_tensor_peak": 1000})) == {
        "analytic_over_live_tensors",
        "traced_over_live_tensors",
    }


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_smoke_run_records_finite_measurements_and_the_estimators_numbers(tmp_path: Path):
    out = tmp_path / "truth"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_truth.py"), str(out), "--smoke", "--steps", "5"],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((out / "gpu_truth.json").read_text("utf-8"))
    assert data["smoke"] is True and data["finished"]
    assert set(data["environment"]["packages"]) >= {"bitsandbytes", "xformers"}
    rows = {row["name"]: row for row in data["rows"]}
    assert len(rows) == 16
    from loraforge.recipe import load_recipe
    from loraforge.vram import estimate_vram

    for name in BASE_ROWS:
        row = rows[name]
        assert row["status"] == "ok", (name, row["reason"])
        measured = row["measured"]
        assert measured["steps"] == 5 and measured["timed_steps"] == 2
        for value in (
            measured["setup_s"],
            measured["s_per_step"],
            measured["minimal"]["s_per_step"],
            measured["unet_flops"],
            measured["live_tensor_peak"],
            row["ratios"]["overhead_ratio"],
            row["ratios"]["achieved_tflops"],
            row["ratios"]["traced_over_live_tensors"],
        ):
            assert _finite(value), (name, value)
        assert row["ratios"]["achieved_tflops"] == pytest.approx(
            measured["unet_flops"] / 1e12 / measured["s_per_step"]
        )
        recipe = load_recipe(out / row["recipe"])
        assert recipe.training.max_train_steps == 5
        analytic = estimate_vram(recipe)
        assert row["estimate"]["analytic"]["tensor_bytes"] == analytic.tensor_bytes
        assert row["estimate"]["analytic"]["total_bytes"] == analytic.total_bytes
    # fp16 and AdamW8bit need CUDA: the shipped char-8gb ran with CPU stand-ins, said so
    assert rows["char-8gb"]["adjusted"] == {
        "training.mixed_precision": "no",
        "training.optimizer": "AdamW",
    }
    assert load_recipe(out / rows["char-8gb"]["recipe"]).training.optimizer == "AdamW"
    traced = estimate_vram(load_recipe(out / rows["char-8gb"]["recipe"]), method="traced")
    assert rows["char-8gb"]["estimate"]["traced"]["tensor_bytes"] == traced.tensor_bytes
    assert rows["char-8gb"]["estimate"]["traced"]["total_bytes"] == traced.total_bytes
    skipped = [row for row in data["rows"] if row["changes"]]
    assert all(row["status"] == "skipped" and row["reason"] for row in skipped)
    assert rows["char-8gb+xformers"]["reason"].startswith("xformers")
    assert rows["char-8gb+AdamW"]["reason"] == "the same settings as char-8gb here"
    assert rows["char-8gb+bf16"]["reason"] == "--smoke runs the presets only"
    assert rows["sdxl-char-12gb+fp16"]["reason"] == "fp16 needs a CUDA GPU"
