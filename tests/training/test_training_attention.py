"""Attention kernel selection: SDPA by default, eager on request; both compute the same UNet."""

from __future__ import annotations

import torch

from loraforge.models.tiny import build_tiny_components
from loraforge.recipe import section_defaults
from loraforge.training.precision import configure_attention


def _noise_prediction(unet: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), context).sample


def test_sdpa_is_the_default_and_eager_computes_the_same() -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    assert section_defaults("training").attention == "sdpa"
    parts = build_tiny_components("sd1")
    unet, encoders = parts["unet"], [parts["text_encoder"]]
    configure_attention(unet, encoders, "sdpa")
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor2_0}
    fused = _noise_prediction(unet)
    configure_attention(unet, encoders, "eager")
    assert {type(p) for p in unet.attn_processors.values()} == {AttnProcessor}
    assert encoders[0].config._attn_implementation == "eager"
    torch.testing.assert_close(_noise_prediction(unet), fused, rtol=1e-4, atol=1e-5)
