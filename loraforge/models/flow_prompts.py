"""Prompt encoding of the SD3 and FLUX.1 families, as sd-scripts' ``strategy_flux`` /
``strategy_sd3`` do it (no attention masks: ``apply_t5_attn_mask`` off, sd-scripts' default).

* CLIP tokens: 77, padded to the maximum; T5 tokens: ``t5xxl_max_token_length`` (FLUX.1 dev 512,
  schnell and SD3 256), padded to it.
* FLUX: ``hidden`` = T5's last hidden state ``(B, T, 4096)``; ``pooled`` = CLIP-L's pooled output
  (the final-norm state at EOS, no projection) ``(B, 768)``.
* SD3: CLIP-L's and CLIP-G's penultimate hidden states concatenated along features (768 + 1280),
  zero-padded to T5's width and followed by T5's tokens: ``hidden`` ``(B, 77 + T, 4096)``;
  ``pooled`` = the two projected pooled outputs concatenated ``(B, 2048)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from loraforge.models.prompts import PromptEmbeds

if TYPE_CHECKING:
    import torch

CLIP_TOKENS = 77
#: sd-scripts' default ``t5xxl_max_token_length`` per (family, variant)
DEFAULT_T5_TOKENS = {("flux", "dev"): 512, ("flux", "schnell"): 256}
SD3_T5_TOKENS = 256


def default_t5_tokens(family: str, variant: str | None) -> int:
    """512 for FLUX.1 dev, 256 for schnell and SD3 (sd-scripts' defaults)."""
    if family == "flux":
        return DEFAULT_T5_TOKENS.get((family, variant or "dev"), 512)
    return SD3_T5_TOKENS


def tokenize_flow(
    tokenizers: Sequence[Any], captions: Sequence[str], t5_tokens: int
) -> tuple[torch.Tensor, ...]:
    """Token ids per tokenizer (CLIP ones ``(B, 77)``, the last, T5, ``(B, t5_tokens)``)."""
    out = []
    for index, tokenizer in enumerate(tokenizers):
        length = t5_tokens if index == len(tokenizers) - 1 else CLIP_TOKENS
        ids = tokenizer(
            list(captions),
            max_length=length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids
        out.append(ids)
    return tuple(out)


def encode_flow_tokens(
    text_encoders: Sequence[Any], family: str, tokens: Sequence[torch.Tensor]
) -> PromptEmbeds:
    """Encode :func:`tokenize_flow`'s ids (gradients flow when the encoders train)."""
    import torch

    t5 = text_encoders[-1]
    t5_out = t5(tokens[-1].to(_device(t5))).last_hidden_state
    if family == "flux":
        clip_l = text_encoders[0]
        pooled = clip_l(tokens[0].to(_device(clip_l))).pooler_output
        return PromptEmbeds(t5_out, pooled)
    hidden, pooled = [], []
    for encoder, ids in zip(text_encoders[:2], tokens[:2], strict=True):
        out = encoder(ids.to(_device(encoder)), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out.text_embeds)
    lg = torch.cat(hidden, dim=-1)
    lg = torch.nn.functional.pad(lg, (0, t5_out.shape[-1] - lg.shape[-1]))
    context = torch.cat([lg.to(t5_out.dtype), t5_out], dim=-2)
    return PromptEmbeds(context, torch.cat(pooled, dim=-1))


def encode_flow_prompts(
    text_encoders: Sequence[Any],
    tokenizers: Sequence[Any],
    family: str,
    captions: Sequence[str],
    *,
    t5_tokens: int,
) -> PromptEmbeds:
    """Tokenize and encode captions for SD3 / FLUX (see the module docstring)."""
    tokens = tokenize_flow(tokenizers, captions, t5_tokens)
    return encode_flow_tokens(text_encoders, family, tokens)


def _device(module: Any) -> torch.device:
    return next(module.parameters()).device


def caption_token_length(
    family: str, variant: str | None, max_token_length: int, t5xxl_max_token_length: int | None
) -> int:
    """The ``max_token_length`` the encoders get: the recipe's CLIP length for the UNet
    families; for SD3 / FLUX the T5 length (``t5xxl_max_token_length``, else the default)."""
    if family not in ("sd3", "flux"):
        return max_token_length
    return t5xxl_max_token_length or default_t5_tokens(family, variant)
