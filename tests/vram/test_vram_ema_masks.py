"""The VRAM estimates count the weight average (``training.ema``) and trace masked loss."""

from __future__ import annotations

import pytest

from loraforge.vram import estimate_vram
from loraforge.vram.analytic import analytic_estimate
from loraforge.vram.settings import memory_settings
from loraforge.vram.traced import trace_step, traced_estimate

from .conftest import recipe_from, tiny_architecture

_SIZE = {"dataset": {"resolution": 128, "enable_bucket": False}}


def _row(estimate, component):
    return next((r for r in estimate.rows if r.component.startswith(component)), None)


def test_analytic_ema_on_the_gpu_costs_four_bytes_per_trainable_parameter():
    plain = estimate_vram(recipe_from({}))
    same = estimate_vram(recipe_from({"training": {"ema": {}}}))
    cpu = estimate_vram(recipe_from({"training": {"ema": {"device": "cpu"}}}))
    trainable = next(r for r in plain.rows if r.component.startswith("optimizer state"))
    # AdamW keeps two fp32 moments per trainable parameter: the EMA is half of that
    ema = _row(same, "EMA weights (fp32)")
    assert ema is not None and ema.kind == "resident"
    assert ema.bytes == pytest.approx(trainable.bytes / 2, rel=0.01)
    assert same.tensor_bytes - plain.tensor_bytes == ema.bytes
    assert cpu.tensor_bytes == plain.tensor_bytes
    assert _row(cpu, "EMA weights").kind == "info"


def _masked(latents: str) -> dict:
    return {
        "dataset": {**_SIZE["dataset"], "subsets": [{"dir": "images", "alpha_mask": True}]},
        "cache": {"latents": latents},
        "training": {"ema": {}, "masked_loss": True},
    }


@pytest.mark.slow
def test_traced_step_counts_the_ema_and_runs_the_masked_loss_on_live_latents():
    recipe = recipe_from(_masked("none"))
    traced = trace_step(recipe, tiny_architecture("sd1"), memory_settings(recipe, "sd1"))
    # one float32 copy of every trainable parameter (allocator-rounded per tensor), resident
    ema_bytes = traced.at_peak["ema weights"]
    assert 4 * traced.trainable_params <= ema_bytes <= 4 * traced.trainable_params * 1.2


def test_analytic_and_traced_agree_with_an_ema_and_cached_masks():
    recipe = recipe_from(_masked("disk"))
    arch = tiny_architecture("sd1")
    settings = memory_settings(recipe, "sd1")
    analytic = analytic_estimate(recipe, arch, settings)
    traced = traced_estimate(recipe, arch, settings)
    assert _row(traced, "EMA weights (fp32)").bytes > 0
    assert analytic.tensor_bytes == pytest.approx(traced.tensor_bytes, rel=0.10)
