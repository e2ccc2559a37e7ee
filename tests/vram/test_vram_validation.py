"""The traced estimate runs ``train``'s step on fake tensors for every precision and option.

The comparison with a real ``train`` run (within 5%) is in tests/train/test_train_memory.py;
these check that the trace follows the recipe's settings the way training applies them.
"""

from __future__ import annotations

import pytest

from loraforge.vram.settings import memory_settings
from loraforge.vram.traced import trace_step

from .conftest import recipe_from, tiny_architecture

_SIZE = {"dataset": {"resolution": 256, "enable_bucket": False}}


def _trace(sections, family="sd1"):
    recipe = recipe_from({**_SIZE, **sections}, family=family)
    return trace_step(recipe, tiny_architecture(family), memory_settings(recipe, family))


def test_checkpointing_lowers_the_traced_activations():
    plain = _trace({})
    checkpointed = _trace({"training": {"gradient_checkpointing": True}})
    assert checkpointed.at_peak["unet activations"] < 0.6 * plain.at_peak["unet activations"]


@pytest.mark.slow
def test_fp8_base_and_full_bf16_shrink_the_weights_they_store():
    bf16 = _trace({"training": {"mixed_precision": "bf16"}}, "sdxl")
    fp8 = _trace({"training": {"mixed_precision": "bf16", "fp8_base": True}}, "sdxl")
    full = _trace({"training": {"mixed_precision": "bf16", "full_bf16": True}}, "sdxl")
    assert fp8.at_peak["unet weights"] < 0.65 * bf16.at_peak["unet weights"]
    # half the bytes, plus the allocator's 512-byte rounding of many small tensors
    assert full.at_peak["network weights"] < 0.6 * bf16.at_peak["network weights"]


def test_live_vae_and_eager_attention_show_in_the_trace():
    cached = _trace({"training": {"mixed_precision": "bf16"}})
    live = _trace(
        {
            "training": {"mixed_precision": "bf16", "attention": "eager"},
            "cache": {"latents": "none"},
        }
    )
    assert "vae weights" not in cached.at_peak and "vae weights" in live.at_peak
    assert live.at_peak["unet activations"] > cached.at_peak["unet activations"]


def test_a_stand_in_holds_the_state_bytes_of_an_optimizer_that_needs_cuda():
    eight_bit = _trace({"training": {"optimizer": "AdamW8bit"}})
    adamw = _trace({"training": {"optimizer": "AdamW"}})
    # 2 bytes per parameter for bitsandbytes' two 8-bit moments vs 8 for AdamW's fp32 ones
    # (plus AdamW's step counters and the allocator's rounding of small tensors)
    ratio = eight_bit.at_peak["optimizer state"] / adamw.at_peak["optimizer state"]
    assert 0.15 < ratio < 0.26
