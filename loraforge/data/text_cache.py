"""Text-encoder outputs cached in memory or on disk, keyed by the exact caption string.

Only meaningful when every caption is fixed (no shuffle, dropout or wildcards: the recipe rules
refuse the other cases) and the text encoders are frozen. Entries depend on the base model's
identity, the family, clip_skip and max_token_length, so changing any of them rebuilds the cache.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from loraforge.data.cache_store import EntryStore
from loraforge.data.captions import CaptionOptions, process_caption, validation_caption
from loraforge.data.plan import BucketPlan
from loraforge.data.subsets import ResolvedSubset
from loraforge.errors import RecipeError
from loraforge.models.prompts import PromptEmbeds, encode_prompts


@dataclass
class TextCache:
    """Prompt embeddings by caption."""

    memory: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    store: EntryStore | None = None
    encoded: int = 0
    reused: int = 0
    stale: int = 0
    seconds: float = 0.0

    def get(self, caption: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if caption in self.memory:
            return self.memory[caption]
        if self.store is None:
            raise KeyError(f"caption not cached: {caption!r}")
        tensors = self.store.load(caption)
        return tensors["hidden"], tensors.get("pooled")

    def batch(self, captions: Sequence[str]) -> PromptEmbeds:
        """The embeddings of a batch of captions, stacked like ``encode_prompts`` returns them."""
        pairs = [self.get(c) for c in captions]
        hidden = torch.stack([h for h, _ in pairs])
        pooled = None if pairs[0][1] is None else torch.stack([p for _, p in pairs])
        return PromptEmbeds(hidden, pooled)


def fixed_captions(plan: BucketPlan, subsets: Sequence[ResolvedSubset]) -> list[str]:
    """Every distinct training caption, which must not vary between steps.

    Raises:
        RecipeError: a subset's captions change every step (shuffle, dropout, wildcards).
    """
    captions: dict[str, None] = {}
    for planned in plan.images:
        subset = subsets[planned.record.subset]
        options = CaptionOptions.from_subset(subset.config)
        if options.is_random:
            raise RecipeError(
                f"subset {subset.config.dir}: captions change every step, "
                "so text-encoder outputs cannot be cached",
                hint="set cache.text_encoder_outputs: none, or turn off shuffle/dropout/wildcards",
            )
        captions[process_caption(planned.record.caption, options, random.Random(0), 1)] = None
    for planned in plan.validation:  # held-out images: their fixed captions
        config = subsets[planned.record.subset].config
        text = validation_caption(planned.record.caption, CaptionOptions.from_subset(config))
        captions[text] = None
    return list(captions)


def prepare_text_cache(
    captions: Sequence[str],
    text_encoders: Sequence[Any],
    tokenizers: Sequence[Any],
    family: str,
    *,
    mode: Literal["memory", "disk"],
    cache_dir: Path | None,
    model_identity: str,
    clip_skip: int = 1,
    max_token_length: int = 75,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> TextCache:
    """Encode each caption once with the (frozen) text encoders.

    Args:
        captions: distinct captions (see :func:`fixed_captions`).
        text_encoders, tokenizers, family: as for :func:`~loraforge.models.prompts.encode_prompts`.
        mode: ``memory`` or ``disk`` (one file per caption under ``cache_dir``, reused when valid).
        model_identity: changes when the base model's weights change.
        clip_skip, max_token_length: the recipe's encoding options.
        batch_size: captions per encoder call.
        progress: called with ``(done, total)``.
    """
    started = time.perf_counter()
    if mode == "disk" and cache_dir is None:
        raise ValueError("a disk cache needs cache_dir")
    store = EntryStore(cache_dir) if mode == "disk" else None
    cache = TextCache(store=store)
    depends = {
        "model": model_identity,
        "family": family,
        "clip_skip": str(clip_skip),
        "max_token_length": str(max_token_length),
        "dtype": str(text_encoders[0].dtype).removeprefix("torch."),
    }
    todo = [c for c in captions if store is None or not store.is_valid(c, depends)]
    cache.reused = len(captions) - len(todo)
    cache.stale = sum(store.path_for(c).exists() for c in todo) if store is not None else 0
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        with torch.no_grad():
            embeds = encode_prompts(
                text_encoders,
                tokenizers,
                family,
                chunk,
                clip_skip=clip_skip,
                max_token_length=max_token_length,
            )
        for i, caption in enumerate(chunk):
            hidden = embeds.hidden[i].to("cpu")
            pooled = None if embeds.pooled is None else embeds.pooled[i].to("cpu")
            if store is not None:
                tensors = {"hidden": hidden} | ({} if pooled is None else {"pooled": pooled})
                store.save(caption, tensors, depends)
            else:
                cache.memory[caption] = (hidden, pooled)
        cache.encoded += len(chunk)
        if progress:
            progress(cache.reused + cache.encoded, len(captions))
    cache.seconds = time.perf_counter() - started
    return cache
