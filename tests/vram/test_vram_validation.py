"""The traced estimate predicts a real training step's peak of live tensor bytes within 5%.

A real step runs on the CPU with a tiny model (real tensors, real memory), measured by the same
tracker; the trace runs the same step on fake tensors. Both include everything the step
allocates: frozen weights, the network, optimizer state, activations, gradients, temporaries.
"""

from __future__ import annotations

import pytest

from loraforge.vram.settings import memory_settings
from loraforge.vram.traced import trace_step

from .conftest import recipe_from, tiny_architecture

CASES = {
    "sd1-bf16-text-encoder": ("sd1", {"training": {"mixed_precision": "bf16", "batch_size": 2}}),
    "sd1-fp16-checkpointing-eager-live-vae": (
        "sd1",
        {
            "training": {
                "mixed_precision": "fp16",
                "gradient_checkpointing": True,
                "attention": "eager",
            },
            "cache": {"latents": "none"},
        },
    ),
    "sd1-fp32-locon-adafactor": (
        "sd1",
        {
            "training": {"mixed_precision": "no", "optimizer": "Adafactor"},
            "network": {"algorithm": "locon", "conv_dim": 4, "train_text_encoder": False},
        },
    ),
    "sdxl-bf16-checkpointing-unet-only": (
        "sdxl",
        {
            "training": {
                "mixed_precision": "bf16",
                "gradient_checkpointing": True,
                "batch_size": 2,
                "optimizer": "AdamW8bit",
            },
            "network": {"train_text_encoder": False},
            "cache": {"text_encoder_outputs": "disk"},
        },
    ),
    "sd1-lycoris-loha": (
        "sd1",
        {
            "training": {"mixed_precision": "bf16"},
            "network": {"backend": "lycoris", "algorithm": "loha", "dim": 4, "alpha": 2},
        },
    ),
    "sdxl-fp8-base-full-bf16": (
        "sdxl",
        {"training": {"mixed_precision": "bf16", "fp8_base": True, "full_bf16": True}},
    ),
}


# Each case traces a full UNet graph (~10 s of CPU); two run by default, the rest are slow.
_DEFAULT = ("sd1-bf16-text-encoder", "sdxl-bf16-checkpointing-unet-only")


@pytest.mark.parametrize(
    "case",
    [c if c in _DEFAULT else pytest.param(c, marks=pytest.mark.slow) for c in sorted(CASES)],
)
def test_traced_peak_matches_a_real_cpu_step(case):
    family, sections = CASES[case]
    sections = {"dataset": {"resolution": 256, "enable_bucket": False}, **sections}
    recipe = recipe_from(sections, family=family)
    arch = tiny_architecture(family)
    settings = memory_settings(recipe, family)
    real = trace_step(recipe, arch, settings, fake=False)
    fake = trace_step(recipe, arch, settings, fake=True)
    assert real.peak_bytes > 4 * 2**20  # a meaningful step, not a few kilobytes
    assert fake.peak_bytes == pytest.approx(real.peak_bytes, rel=0.05)
    assert fake.trainable_params == real.trainable_params
    # the parts agree too: weights exactly, activations within the tolerance
    for category in ("unet weights", "network weights"):
        assert fake.at_peak.get(category) == real.at_peak.get(category)


def test_checkpointing_lowers_the_measured_peak():
    sections = {"dataset": {"resolution": 256, "enable_bucket": False}}
    plain = recipe_from(sections)
    checkpointed = recipe_from({**sections, "training": {"gradient_checkpointing": True}})
    arch = tiny_architecture("sd1")
    peaks = [
        trace_step(r, arch, memory_settings(r, "sd1"), fake=False).at_peak["unet activations"]
        for r in (plain, checkpointed)
    ]
    assert peaks[1] < 0.6 * peaks[0]
