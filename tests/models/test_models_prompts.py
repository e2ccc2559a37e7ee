"""Prompt tokenizing/encoding against hand-written token windows and independent encoder runs."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import CLIPTokenizer

from loraforge.models.clip_tokenizer import tiny_vocab
from loraforge.models.prompts import encode_prompts, encode_tokens, sdxl_time_ids, tokenize

VOCAB = tiny_vocab()
BOS, EOS, BANG = VOCAB["<|startoftext|>"], VOCAB["<|endoftext|>"], VOCAB["!"]
CAT, A, PHOTO, OF, THE = (VOCAB[w + "</w>"] for w in ("cat", "a", "photo", "of", "the"))


@pytest.fixture(scope="module")
def tokenizers(tiny_sdxl_dir):
    """SDXL's pair: tokenizer 1 pads with EOS (like SD1), tokenizer 2 with "!" (like SD2)."""
    return (
        CLIPTokenizer.from_pretrained(tiny_sdxl_dir / "tokenizer"),
        CLIPTokenizer.from_pretrained(tiny_sdxl_dir / "tokenizer_2"),
    )


@pytest.fixture(scope="module")
def sd1(tiny_sd1_dir):
    from loraforge.models.loading import load_model

    return load_model(str(tiny_sd1_dir))


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir):
    from loraforge.models.loading import load_model

    return load_model(str(tiny_sdxl_dir))


def test_pad_ids_of_the_tiny_tokenizers(tokenizers) -> None:
    assert BANG == 0  # as in the real CLIP vocabulary
    assert tokenizers[0].pad_token_id == EOS
    assert tokenizers[1].pad_token_id == 0


def test_one_window(tokenizers) -> None:
    ids1, ids2 = tokenize(tokenizers, ["A photo of the cat"], max_token_length=75)
    words = [A, PHOTO, OF, THE, CAT]
    assert ids1.shape == ids2.shape == (1, 1, 77)
    assert ids1[0, 0].tolist() == [BOS, *words, EOS] + [EOS] * 70
    assert ids2[0, 0].tolist() == [BOS, *words, EOS] + [0] * 70


def _cats(n: int) -> str:
    return " ".join(["cat"] * n)


def test_225_tokens_eos_padded(tokenizers) -> None:
    (ids,) = tokenize(tokenizers[:1], [_cats(100)], max_token_length=225)
    assert ids.shape == (1, 3, 77)
    assert ids[0, 0].tolist() == [BOS] + [CAT] * 75 + [EOS]
    assert ids[0, 1].tolist() == [BOS] + [CAT] * 25 + [EOS] * 51
    assert ids[0, 2].tolist() == [BOS] + [EOS] * 76


def test_225_tokens_bang_padded(tokenizers) -> None:
    (ids,) = tokenize(tokenizers[1:], [_cats(100)], max_token_length=225)
    # a full window gets an EOS at its end; the window after the text: BOS EOS PAD…
    assert ids[0, 0].tolist() == [BOS] + [CAT] * 75 + [EOS]
    assert ids[0, 1].tolist() == [BOS] + [CAT] * 25 + [EOS] + [0] * 50
    assert ids[0, 2].tolist() == [BOS, EOS] + [0] * 75


def test_too_long_captions_are_truncated_to_225(tokenizers) -> None:
    ids1, ids2 = tokenize(tokenizers, [_cats(300)], max_token_length=225)
    for ids in (ids1, ids2):
        for window in range(3):
            assert ids[0, window].tolist() == [BOS] + [CAT] * 75 + [EOS]


def test_150_tokens_short_caption(tokenizers) -> None:
    ids1, ids2 = tokenize(tokenizers, ["the cat", _cats(80)], max_token_length=150)
    assert ids1.shape == (2, 2, 77)
    assert ids1[0, 1].tolist() == [BOS] + [EOS] * 76
    assert ids2[0, 1].tolist() == [BOS, EOS] + [0] * 75
    assert ids2[1, 1].tolist() == [BOS] + [CAT] * 5 + [EOS] + [0] * 70


def test_bad_max_token_length(tokenizers) -> None:
    with pytest.raises(ValueError, match="75, 150 or 225"):
        tokenize(tokenizers, ["cat"], max_token_length=100)


def _windows(tokenizer, caption: str, n: int) -> list[torch.Tensor]:
    (ids,) = tokenize([tokenizer], [caption], max_token_length=75 * n)
    return [ids[:, i] for i in range(n)]


@torch.no_grad()
def test_sd1_150_tokens_joins_windows(sd1) -> None:
    encoder, tokenizer = sd1.text_encoders[0], sd1.tokenizers[0]
    caption = _cats(90)
    got = encode_prompts(sd1.text_encoders, sd1.tokenizers, "sd1", [caption], max_token_length=150)
    w0, w1 = (encoder(w).last_hidden_state for w in _windows(tokenizer, caption, 2))
    expected = torch.cat([w0[:, :1], w0[:, 1:76], w1[:, 1:76], w1[:, 76:]], dim=1)
    assert got.pooled is None
    assert got.hidden.shape == (1, 152, 32)
    torch.testing.assert_close(got.hidden, expected)


@torch.no_grad()
def test_sd1_clip_skip_2_equals_a_model_without_its_last_layer(sd1) -> None:
    encoder = sd1.text_encoders[0]
    shorter = copy.deepcopy(encoder)
    shorter.encoder.layers = shorter.encoder.layers[:-1]  # transformers 5: no text_model wrapper
    (ids,) = tokenize(sd1.tokenizers, ["a photo of the cat"], max_token_length=75)
    got = encode_tokens(sd1.text_encoders, sd1.tokenizers, "sd1", (ids,), clip_skip=2)
    torch.testing.assert_close(got.hidden, shorter(ids[:, 0]).last_hidden_state)
    last = encode_tokens(sd1.text_encoders, sd1.tokenizers, "sd1", (ids,), clip_skip=1)
    torch.testing.assert_close(last.hidden, encoder(ids[:, 0]).last_hidden_state)
    assert not torch.allclose(got.hidden, last.hidden)


def test_clip_skip_beyond_the_layers_is_an_error(sd1) -> None:
    (ids,) = tokenize(sd1.tokenizers, ["cat"], max_token_length=75)
    with pytest.raises(ValueError, match="clip_skip"):
        encode_tokens(sd1.text_encoders, sd1.tokenizers, "sd1", (ids,), clip_skip=9)


@torch.no_grad()
def test_sdxl_conditioning(sdxl) -> None:
    te1, te2 = sdxl.text_encoders
    captions = ["a photo of the cat", "the cat"]
    got = encode_prompts(sdxl.text_encoders, sdxl.tokenizers, "sdxl", captions)
    ids1, ids2 = tokenize(sdxl.tokenizers, captions)
    # penultimate layers without the final norm: run copies with the last layer removed,
    # whose output *before* the final norm is what we want; hidden_states[-1] is that output
    short1, short2 = copy.deepcopy(te1), copy.deepcopy(te2)
    short1.encoder.layers = short1.encoder.layers[:-1]
    short2.text_model.encoder.layers = short2.text_model.encoder.layers[:-1]
    h1 = short1(ids1[:, 0], output_hidden_states=True).hidden_states[-1]
    h2 = short2(ids2[:, 0], output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(got.hidden, torch.cat([h1, h2], dim=2))
    assert got.hidden.shape == (2, 77, 32 + 48)
    # transformers' own pooled projection (it pools at the first EOS of our tiny vocabulary)
    torch.testing.assert_close(got.pooled, te2(ids2[:, 0]).text_embeds)
    assert got.pooled.shape == (2, 32)


@torch.no_grad()
def test_sdxl_225_pools_the_first_window(sdxl) -> None:
    te2 = sdxl.text_encoders[1]
    caption = _cats(120)
    got = encode_prompts(
        sdxl.text_encoders, sdxl.tokenizers, "sdxl", [caption], max_token_length=225
    )
    assert got.hidden.shape == (1, 227, 80)
    first = _windows(sdxl.tokenizers[1], caption, 3)[0]
    torch.testing.assert_close(got.pooled, te2(first).text_embeds)


def test_sdxl_time_ids() -> None:
    ids = sdxl_time_ids((768, 1024), (0, 32), (512, 640))
    assert ids.tolist() == [768.0, 1024.0, 0.0, 32.0, 512.0, 640.0]
    assert ids.dtype == torch.float32


def test_encoding_keeps_gradients_for_text_encoder_training(sd1) -> None:
    encoder = copy.deepcopy(sd1.text_encoders[0]).requires_grad_(True)
    got = encode_prompts([encoder], sd1.tokenizers, "sd1", ["the cat"], clip_skip=2)
    got.hidden.sum().backward()
    assert encoder.encoder.layers[0].self_attn.q_proj.weight.grad is not None
