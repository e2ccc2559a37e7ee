"""The analytic estimate: torch-free, consistent, and close to the traced one."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loraforge.vram import estimate_vram
from loraforge.vram.analytic import analytic_estimate
from loraforge.vram.settings import memory_settings
from loraforge.vram.traced import traced_estimate

from .conftest import recipe_from, tiny_architecture


def test_analytic_estimate_imports_no_torch(tmp_path):
    script = (
        "import sys, json\n"
        "from loraforge.presets import get_preset\n"
        "from loraforge.recipe import load_recipe\n"
        "from loraforge.vram import estimate_vram, parse_size, render_vram, vram_to_dict\n"
        "e = estimate_vram(load_recipe(get_preset('sdxl-char-12gb').path),"
        " budget_bytes=parse_size('12GB'))\n"
        "render_vram(e); vram_to_dict(e)\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "print(json.dumps({'heavy': heavy, 'total': e.total_bytes}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["heavy"] == []
    assert data["total"] > 5 * 2**30


def _total(sections, family="sd1"):
    return estimate_vram(recipe_from(sections, family=family)).total_bytes


def test_rows_add_up_and_overheads_are_on_top():
    estimate = estimate_vram(recipe_from({"cache": {"latents": "none"}}))
    assert sum(r.bytes for r in estimate.rows) == estimate.total_bytes
    overhead = sum(r.bytes for r in estimate.rows if r.kind == "overhead")
    assert estimate.tensor_bytes + overhead == estimate.total_bytes
    assert all(r.bytes == 0 for r in estimate.rows if r.kind == "info")


@pytest.mark.parametrize(
    ("cheaper", "dearer"),
    [
        ({"training": {"gradient_checkpointing": True}}, {}),
        ({}, {"training": {"batch_size": 4}}),
        ({}, {"training": {"attention": "eager"}}),
        ({"training": {"optimizer": "AdamW8bit"}}, {"training": {"optimizer": "AdamW"}}),
        ({"training": {"optimizer": "AdamW"}}, {"training": {"optimizer": "Prodigy"}}),
        ({"cache": {"latents": "disk"}}, {"cache": {"latents": "none"}}),
        (
            {"network": {"train_text_encoder": False}, "cache": {"text_encoder_outputs": "disk"}},
            {"network": {"train_text_encoder": False}},
        ),
        (
            {"training": {"mixed_precision": "bf16", "fp8_base": True}},
            {"training": {"mixed_precision": "bf16"}},
        ),
        ({"training": {"mixed_precision": "bf16"}}, {"training": {"mixed_precision": "no"}}),
        ({}, {"dataset": {"resolution": 768, "max_bucket_reso": 1024}}),
        ({}, {"network": {"dim": 128}}),
        ({"model": {"max_token_length": 75}}, {"model": {"max_token_length": 225}}),
    ],
)
def test_every_setting_moves_the_estimate_the_right_way(cheaper, dearer):
    assert _total(cheaper) < _total(dearer)


def test_eager_attention_costs_the_attention_matrix():
    # SD1.5 at 512: 8 heads x 4096^2 tokens; fp32 softmax + fp16 copy kept per self-attention
    sdpa = _total({})
    eager = _total({"training": {"attention": "eager"}})
    assert eager - sdpa > 5 * 8 * 4096**2 * 6  # five top-level self-attentions at least


@pytest.mark.parametrize(
    ("family", "sections"),
    [
        ("sd1", {"training": {"mixed_precision": "bf16", "batch_size": 2}}),
        (
            "sdxl",
            {
                "training": {"mixed_precision": "fp16", "gradient_checkpointing": True},
                "network": {"train_text_encoder": False},
                "cache": {"text_encoder_outputs": "disk"},
            },
        ),
    ],
)
def test_analytic_is_close_to_traced_on_tiny_models(family, sections):
    sections = {"dataset": {"resolution": 512, "enable_bucket": False}, **sections}
    recipe = recipe_from(sections, family=family)
    arch = tiny_architecture(family)
    settings = memory_settings(recipe, family)
    analytic = analytic_estimate(recipe, arch, settings)
    traced = traced_estimate(recipe, arch, settings)
    assert analytic.tensor_bytes == pytest.approx(traced.tensor_bytes, rel=0.10)


def test_unknown_method_is_a_recipe_error():
    from loraforge.errors import RecipeError

    with pytest.raises(RecipeError, match="method"):
        estimate_vram(recipe_from({}), method="guess")  # type: ignore[arg-type]


def test_estimate_serialises(tmp_path):
    from loraforge.vram import vram_to_dict

    data = vram_to_dict(estimate_vram(recipe_from({}), budget_bytes=2**30))
    text = json.dumps(data)
    assert json.loads(text)["fits"] is False
    assert sum(r["bytes"] for r in data["rows"]) == data["total_bytes"]


def test_the_validation_pass_is_counted():
    """Held-out images add a phase: a no-grad UNet forward after the update. It is below the
    training step (nothing is kept for backward), so it shows as a row off the peak."""
    plain = estimate_vram(recipe_from({}))
    held_out = estimate_vram(recipe_from({"dataset": {"validation_split": 0.1}}))
    [row] = [r for r in held_out.rows if r.component.startswith("validation pass")]
    assert row.kind == "info" and "during the validation pass" in row.note
    assert not any(r.component.startswith("validation pass") for r in plain.rows)
    assert held_out.total_bytes == plain.total_bytes


def test_the_traced_validation_pass_runs_and_the_analytic_one_is_close():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from loraforge.vram.analytic import _validation_rows
    from loraforge.vram.step import run_training_step
    from loraforge.vram.tracker import LiveBytesTracker

    class ValidationPeak(LiveBytesTracker):
        """Its peak restarts when the validation pass starts."""

        def phase(self, category: str) -> None:
            super().phase(category)
            if category == "validation":
                self.reset_peak()

    recipe = recipe_from({"dataset": {"resolution": 256, "validation_split": 0.1}})
    arch = tiny_architecture("sd1")
    settings = memory_settings(recipe, "sd1")
    with FakeTensorMode(allow_non_fake_inputs=True):
        step = run_training_step(recipe, arch, settings, LiveBytesTracker())
    with FakeTensorMode(allow_non_fake_inputs=True):
        validation = run_training_step(recipe, arch, settings, ValidationPeak())
    resident = sum(v for k, v in validation.at_peak.items() if "weights" in k or "optimizer" in k)
    transient = validation.peak_bytes - resident
    # the pass ran (its batch is there) and peaked far below the training step
    assert validation.at_peak.get("validation", 0) > 0
    assert 0 < transient < 0.3 * (step.peak_bytes - resident)
    # the analytic row is the same order of magnitude (the formulas aim at full-size models)
    [row] = _validation_rows(recipe, arch, settings)
    assert transient / 4 < row.bytes < transient * 4
