"""Prompt tokenizing and encoding exactly as kohya-ss/sd-scripts does it.

* Token windows: ``max_token_length`` 75 gives one 77-token window; 150/225 tokenize to
  ``max_token_length + 2`` tokens and cut them into 75-token windows, each wrapped in BOS … EOS
  (sd-scripts' ``_get_input_ids``). Tokenizers that pad with EOS (SD1, SDXL's first) keep the
  last token of the long sequence as each window's end; tokenizers that pad with ``!``
  (SD2, SDXL's second) get an EOS where a full window would otherwise end in a word, and an
  EOS after BOS in an empty window.
* SD1/SD2: ``clip_skip`` 1 takes the last layer (with the final layer norm), 2 the penultimate
  layer, … followed by the final layer norm. Windows are joined: BOS state, each window's 75
  inner states, then the very last state (length ``n * 75 + 2``).
* SDXL: the penultimate layer of both encoders without the final norm (``clip_skip`` does not
  apply), joined the same way and concatenated along features; the pooled output is encoder 2's
  final state at the first EOS of the first window, through its text projection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

WINDOW = 75  # tokens between BOS and EOS in one CLIP window
MAX_TOKEN_LENGTHS = (75, 150, 225)


@dataclass(frozen=True)
class PromptEmbeds:
    """Text conditioning for the UNet.

    Args:
        hidden: ``(batch, tokens, features)``; tokens is 77 or ``n * 75 + 2``; SDXL features are
            encoder 1's and encoder 2's widths concatenated.
        pooled: SDXL's ``(batch, projection_dim)`` pooled text embedding, else ``None``.
    """

    hidden: torch.Tensor
    pooled: torch.Tensor | None


def _check(max_token_length: int) -> None:
    if max_token_length not in MAX_TOKEN_LENGTHS:
        raise ValueError(f"max_token_length must be 75, 150 or 225, got {max_token_length}")


def tokenize(
    tokenizers: Sequence[Any], captions: Sequence[str], *, max_token_length: int = 75
) -> tuple[torch.Tensor, ...]:
    """Token ids per tokenizer, each ``(batch, windows, 77)`` (windows = max_token_length / 75).

    Args:
        tokenizers: the family's CLIP tokenizers (one, or two for SDXL).
        captions: the captions of one batch.
        max_token_length: 75, 150 or 225.

    Raises:
        ValueError: for another max_token_length.
    """
    import torch

    _check(max_token_length)
    out = []
    for tokenizer in tokenizers:
        rows = [_window_ids(tokenizer, caption, max_token_length) for caption in captions]
        out.append(torch.tensor(rows, dtype=torch.long))
    return tuple(out)


def _window_ids(tokenizer: Any, caption: str, max_token_length: int) -> list[list[int]]:
    """One caption's windows (sd-scripts ``TokenizeStrategy._get_input_ids``)."""
    window = tokenizer.model_max_length  # 77
    length = window if max_token_length == WINDOW else max_token_length + 2
    ids = tokenizer(caption, padding="max_length", truncation=True, max_length=length).input_ids
    if length <= window:
        return [list(ids)]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    windows = []
    for start in range(1, length - window + 2, window - 2):
        chunk = [ids[0], *ids[start : start + window - 2], ids[-1]]
        if pad != eos:  # SD2 / SDXL encoder 2: "!"-padded
            if chunk[-2] not in (eos, pad):  # a full window ends in a word: close it
                chunk[-1] = eos
            if chunk[1] == pad:  # an empty window: BOS EOS PAD …
                chunk[1] = eos
        windows.append(chunk)
    return windows


def encode_tokens(
    text_encoders: Sequence[Any],
    tokenizers: Sequence[Any],
    family: str,
    tokens: Sequence[torch.Tensor],
    *,
    clip_skip: int = 1,
) -> PromptEmbeds:
    """Encode token ids from :func:`tokenize` (gradients flow when the encoders train).

    Args:
        text_encoders: the family's text encoders.
        tokenizers: their tokenizers (for the EOS id of the pooled output).
        family: ``sd1`` | ``sd2`` | ``sd2-v`` | ``sdxl``.
        tokens: per encoder, ``(batch, windows, 77)`` ids.
        clip_skip: SD1/SD2 only: 1 = last layer, 2 = penultimate, …

    Raises:
        ValueError: for clip_skip < 1 or more than the encoder has layers.
    """
    if clip_skip < 1:
        raise ValueError(f"clip_skip must be >= 1, got {clip_skip}")
    if family == "sdxl":
        return _encode_sdxl(text_encoders, tokenizers, tokens)
    encoder, ids = text_encoders[0], tokens[0]
    batch, windows, width = ids.shape
    flat = ids.reshape(batch * windows, width).to(_device(encoder))
    if clip_skip == 1:
        hidden = encoder(flat).last_hidden_state
    else:
        states = encoder(flat, output_hidden_states=True).hidden_states
        if clip_skip >= len(states):
            raise ValueError(f"clip_skip {clip_skip} exceeds the text encoder's layers")
        hidden = _text_transformer(encoder).final_layer_norm(states[-clip_skip])
    return PromptEmbeds(_join_windows(hidden, batch, windows), None)


def _encode_sdxl(
    text_encoders: Sequence[Any], tokenizers: Sequence[Any], tokens: Sequence[torch.Tensor]
) -> PromptEmbeds:
    import torch

    encoder1, encoder2 = text_encoders
    batch, windows, width = tokens[0].shape
    ids1 = tokens[0].reshape(-1, width).to(_device(encoder1))
    ids2 = tokens[1].reshape(-1, width).to(_device(encoder2))
    hidden1 = encoder1(ids1, output_hidden_states=True).hidden_states[-2]
    out2 = encoder2(ids2, output_hidden_states=True)
    hidden2 = out2.hidden_states[-2]
    pooled = _pool_at_eos(encoder2, out2.last_hidden_state, ids2, tokenizers[1].eos_token_id)
    hidden = torch.cat(
        [_join_windows(hidden1, batch, windows), _join_windows(hidden2, batch, windows)], dim=2
    )
    return PromptEmbeds(hidden, pooled[::windows])  # pooled from each caption's first window


def _pool_at_eos(
    encoder: Any, last_hidden: torch.Tensor, ids: torch.Tensor, eos_id: int
) -> torch.Tensor:
    """Final state at the first EOS, projected (sd-scripts' ``_pool_workaround``)."""
    import torch

    index = (ids == eos_id).int().argmax(dim=1).to(last_hidden.device)
    pooled = last_hidden[torch.arange(last_hidden.shape[0], device=last_hidden.device), index]
    projection = encoder.text_projection
    return projection(pooled.to(projection.weight.dtype)).to(last_hidden.dtype)


def _join_windows(hidden: torch.Tensor, batch: int, windows: int) -> torch.Tensor:
    """``(batch * windows, 77, D)`` -> ``(batch, 77, D)`` or ``(batch, windows * 75 + 2, D)``."""
    import torch

    hidden = hidden.reshape(batch, -1, hidden.shape[-1])
    if windows == 1:
        return hidden
    width = hidden.shape[1] // windows
    parts = [hidden[:, :1]]
    parts += [hidden[:, start : start + width - 2] for start in range(1, hidden.shape[1], width)]
    parts.append(hidden[:, -1:])
    return torch.cat(parts, dim=1)


def encode_prompts(
    text_encoders: Sequence[Any],
    tokenizers: Sequence[Any],
    family: str,
    captions: Sequence[str],
    *,
    clip_skip: int = 1,
    max_token_length: int = 75,
) -> PromptEmbeds:
    """Tokenize and encode captions (see :func:`tokenize` and :func:`encode_tokens`).

    For ``sd3`` / ``flux`` ``max_token_length`` is the T5 token count (``clip_skip`` does not
    apply); see :mod:`loraforge.models.flow_prompts`.
    """
    if family in ("sd3", "flux"):
        from loraforge.models.flow_prompts import encode_flow_prompts

        return encode_flow_prompts(
            text_encoders, tokenizers, family, captions, t5_tokens=max_token_length
        )
    tokens = tokenize(tokenizers, captions, max_token_length=max_token_length)
    return encode_tokens(text_encoders, tokenizers, family, tokens, clip_skip=clip_skip)


def sdxl_time_ids(
    original_size: tuple[int, int],
    crop_top_left: tuple[int, int],
    target_size: tuple[int, int],
) -> torch.Tensor:
    """SDXL's size conditioning ``[orig_h, orig_w, crop_top, crop_left, target_h, target_w]``.

    All sizes are ``(height, width)`` in pixels, as sd-scripts passes them; stack one per
    image for a batch and give it to the UNet as ``added_cond_kwargs["time_ids"]``.
    """
    import torch

    values = [*original_size, *crop_top_left, *target_size]
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


def _device(module: Any) -> torch.device:
    return next(module.parameters()).device


def _text_transformer(encoder: Any) -> Any:
    """The module holding ``final_layer_norm`` (``text_model`` before transformers 5)."""
    return getattr(encoder, "text_model", encoder)
