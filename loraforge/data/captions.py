"""Training-time caption processing with sd-scripts semantics (``BaseDataset.process_caption``).

Pure functions of (caption, options, random source, epoch). In order:

1. **Dropout** (``caption_dropout_rate``, or every ``caption_dropout_every_n_epochs``-th epoch,
   1-based): the whole caption becomes ``""``.
2. **Line choice**: with ``enable_wildcard`` one line of a multi-line caption is drawn; otherwise
   the first line is used.
3. **Prefix / suffix** are joined with a space.
4. **Wildcards** (``enable_wildcard``): ``{a|b|c}`` becomes one of the options; ``{{`` and ``}}``
   stand for literal braces.
5. **Tokens** (when shuffling, dropping tags, or a ``keep_tokens_separator`` is in the caption):
   split on ``caption_separator``; the first ``keep_tokens`` tokens - or everything before
   ``keep_tokens_separator``, and everything after a second one - stay in place; the others are
   shuffled (``shuffle_caption``) and each dropped with ``caption_tag_dropout_rate``; the result
   is joined with ``", "``.
6. **Secondary separator**: replaced by ``caption_separator`` (so ``"red dress;;;lace"`` stays one
   token while shuffling).

Deliberate differences from sd-scripts, both so that what the user wrote reaches the model:

* sd-scripts adds prefix/suffix before choosing the line of a multi-line caption, so the suffix
  (or, with wildcards, the prefix) is lost for all but one line; here they go on the chosen line.
* sd-scripts leaves a ``keep_tokens_separator`` (e.g. ``|||``) in the text when neither shuffle
  nor tag dropout is on; here the caption is always split at it, so it never reaches the
  text encoder.

Random draws happen in sd-scripts' order (dropout, line, wildcards, shuffle, tag dropout), each
only when its option is on, from the ``random.Random`` passed in.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

from loraforge.recipe.types import SubsetConfig

_WILDCARD = re.compile(r"\{([^}]+)\}")


@dataclass(frozen=True)
class CaptionOptions:
    """Caption options of one subset (the SubsetConfig fields of the same names)."""

    caption_prefix: str | None = None
    caption_suffix: str | None = None
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_separator: str = ","
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0

    @classmethod
    def from_subset(cls, subset: SubsetConfig) -> CaptionOptions:
        """Take the caption fields of a recipe subset."""
        return cls(
            caption_prefix=subset.caption_prefix,
            caption_suffix=subset.caption_suffix,
            shuffle_caption=subset.shuffle_caption,
            keep_tokens=subset.keep_tokens,
            keep_tokens_separator=subset.keep_tokens_separator,
            caption_separator=subset.caption_separator,
            secondary_separator=subset.secondary_separator,
            enable_wildcard=subset.enable_wildcard,
            caption_dropout_rate=subset.caption_dropout_rate,
            caption_dropout_every_n_epochs=subset.caption_dropout_every_n_epochs,
            caption_tag_dropout_rate=subset.caption_tag_dropout_rate,
        )

    @property
    def is_random(self) -> bool:
        """Whether the same caption can come out differently (matters for text-encoder caches)."""
        return (
            self.shuffle_caption
            or self.caption_tag_dropout_rate > 0
            or self.caption_dropout_rate > 0
            or self.caption_dropout_every_n_epochs > 0
            or self.enable_wildcard
        )


def validation_caption(caption: str, options: CaptionOptions) -> str:
    """The caption of a held-out validation image: the same every time it is used (no shuffle,
    no dropout; with wildcards, a fixed choice), with prefix and suffix.

    Args:
        caption: the raw caption.
        options: the subset's caption options (their random parts are turned off).
    """
    fixed = replace(
        options,
        shuffle_caption=False,
        caption_dropout_rate=0.0,
        caption_dropout_every_n_epochs=0,
        caption_tag_dropout_rate=0.0,
    )
    return process_caption(caption, fixed, random.Random(0), 1)


def process_caption(caption: str, options: CaptionOptions, rng: random.Random, epoch: int) -> str:
    """The caption one training step sees.

    Args:
        caption: the raw caption (as discovery read it; may hold several lines).
        options: the subset's caption options.
        rng: the random source for every draw.
        epoch: the current epoch, 1-based (sd-scripts' ``current_epoch``; dropout every n epochs
            hits epochs n, 2n, ...).

    Returns:
        The processed caption (``""`` when dropped).
    """
    if _is_dropped(options, rng, epoch):
        return ""
    lines = caption.split("\n")
    text = rng.choice(lines) if options.enable_wildcard and len(lines) > 1 else lines[0]
    if options.caption_prefix:
        text = options.caption_prefix + " " + text
    if options.caption_suffix:
        text = text + " " + options.caption_suffix
    if options.enable_wildcard:
        text = expand_wildcards(text, rng)
    separator_used = bool(options.keep_tokens_separator) and options.keep_tokens_separator in text
    if options.shuffle_caption or options.caption_tag_dropout_rate > 0 or separator_used:
        text = _process_tokens(text, options, rng)
    if options.secondary_separator:
        text = text.replace(options.secondary_separator, options.caption_separator)
    return text


def _is_dropped(options: CaptionOptions, rng: random.Random, epoch: int) -> bool:
    # Same short-circuit as sd-scripts: no draw unless a dropout rate is set.
    if options.caption_dropout_rate > 0 and rng.random() < options.caption_dropout_rate:
        return True
    every = options.caption_dropout_every_n_epochs
    return every > 0 and epoch % every == 0


def expand_wildcards(text: str, rng: random.Random) -> str:
    """Replace each ``{a|b|c}`` with one option; ``{{`` / ``}}`` are literal braces.

    Args:
        text: the caption.
        rng: the random source (one draw per wildcard, left to right).
    """
    # Stand-ins for escaped braces that cannot occur in the text (sd-scripts' trick).
    open_mark, close_mark = "⦅", "⦆"
    while open_mark in text or close_mark in text:
        open_mark += "⦅"
        close_mark += "⦆"
    text = text.replace("{{", open_mark).replace("}}", close_mark)
    text = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), text)
    return text.replace(open_mark, "{").replace(close_mark, "}")


def _process_tokens(text: str, options: CaptionOptions, rng: random.Random) -> str:
    fixed, flexible, fixed_suffix = split_tokens(text, options)
    if options.shuffle_caption:
        rng.shuffle(flexible)
    if options.caption_tag_dropout_rate > 0:
        flexible = [t for t in flexible if rng.random() >= options.caption_tag_dropout_rate]
    return ", ".join(fixed + flexible + fixed_suffix)


def split_tokens(text: str, options: CaptionOptions) -> tuple[list[str], list[str], list[str]]:
    """Split a caption into (kept in front, shuffleable, kept at the end) tokens.

    With a ``keep_tokens_separator`` present: before it / between it and a second occurrence /
    after that, blank tokens removed. Otherwise the first ``keep_tokens`` tokens are kept and
    blank tokens stay (as sd-scripts does).
    """
    separator = options.caption_separator
    marker = options.keep_tokens_separator
    if marker and marker in text:
        head, rest = text.split(marker, 1)
        tail = ""
        if marker in rest:
            rest, tail = rest.split(marker, 1)
        return _non_blank(head, separator), _non_blank(rest, separator), _non_blank(tail, separator)
    tokens = [t.strip() for t in text.strip().split(separator)]
    keep = max(0, options.keep_tokens)
    return tokens[:keep], tokens[keep:], []


def _non_blank(text: str, separator: str) -> list[str]:
    return [s for t in text.split(separator) if (s := t.strip())]
