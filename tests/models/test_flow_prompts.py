"""SD3 / FLUX prompt encoding (sd-scripts' strategy_flux / strategy_sd3), recomputed here from
the encoders' own outputs."""

from __future__ import annotations

import pytest
import torch

from loraforge.models.flow_prompts import caption_token_length, default_t5_tokens
from loraforge.models.prompts import encode_prompts


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from loraforge.models.loading import load_model
    from loraforge.models.tiny_flow import write_tiny_flow_model

    root = tmp_path_factory.mktemp("flow-prompts")
    return {f: load_model(str(write_tiny_flow_model(f, root / f))) for f in ("flux", "sd3")}


CAPTIONS = ["red lfdemo, white background", "blue cross"]


def test_flux_embeds_are_t5_states_and_clip_l_pooled(models) -> None:
    m = models["flux"]
    embeds = encode_prompts(m.text_encoders, m.tokenizers, "flux", CAPTIONS, max_token_length=64)
    clip, t5 = m.text_encoders
    clip_ids = m.tokenizers[0](CAPTIONS, max_length=77, padding="max_length", truncation=True,
                               return_tensors="pt").input_ids  # fmt: skip
    t5_ids = m.tokenizers[1](CAPTIONS, max_length=64, padding="max_length", truncation=True,
                             return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        assert torch.equal(embeds.hidden, t5(t5_ids).last_hidden_state)
        assert torch.equal(embeds.pooled, clip(clip_ids).pooler_output)
    assert embeds.hidden.shape == (2, 64, t5.config.d_model)


def test_sd3_context_is_padded_clip_then_t5(models) -> None:
    m = models["sd3"]
    embeds = encode_prompts(m.text_encoders, m.tokenizers, "sd3", CAPTIONS, max_token_length=32)
    l_enc, g_enc, t5 = m.text_encoders
    ids = [
        tok(
            CAPTIONS, max_length=77, padding="max_length", truncation=True, return_tensors="pt"
        ).input_ids
        for tok in m.tokenizers[:2]
    ]
    with torch.no_grad():
        l_out = l_enc(ids[0], output_hidden_states=True)
        g_out = g_enc(ids[1], output_hidden_states=True)
    widths = (l_enc.config.hidden_size, g_enc.config.hidden_size)
    assert embeds.hidden.shape == (2, 77 + 32, t5.config.d_model)
    torch.testing.assert_close(embeds.hidden[:, :77, : widths[0]], l_out.hidden_states[-2])
    torch.testing.assert_close(
        embeds.hidden[:, :77, widths[0] : sum(widths)], g_out.hidden_states[-2]
    )
    assert not embeds.hidden[:, :77, sum(widths) :].any()  # zero padding to the T5 width
    pooled = torch.cat([l_out.text_embeds, g_out.text_embeds], dim=-1)
    torch.testing.assert_close(embeds.pooled, pooled)


def test_t5_token_lengths_follow_sd_scripts() -> None:
    assert default_t5_tokens("flux", "dev") == 512 and default_t5_tokens("flux", "schnell") == 256
    assert default_t5_tokens("sd3", "5-large") == 256
    assert caption_token_length("flux", "dev", 75, None) == 512
    assert caption_token_length("flux", "dev", 75, 128) == 128
    assert caption_token_length("sdxl", None, 150, 128) == 150
