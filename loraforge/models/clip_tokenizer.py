"""CLIP BPE tokenizer files (``vocab.json``, ``merges.txt``, configs) written by code.

A CLIP vocabulary is laid out from its merge list: 256 byte symbols, the same 256 with ``</w>``,
one entry per merge, then ``<|startoftext|>`` and ``<|endoftext|>``. ``!`` is id 0, which is what
SD2's and SDXL's second tokenizer pad with.

Two merge lists: OpenAI CLIP's own (48,894 merges, shipped in ``clip/``; every SD text encoder
uses it, so single-file checkpoints tokenise offline) and a tiny one for the built-in test models.
"""

from __future__ import annotations

import functools
import gzip
import json
from collections.abc import Sequence
from pathlib import Path

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77

_CLIP_BPE = Path(__file__).resolve().parent / "clip" / "bpe_simple_vocab_16e6.txt.gz"
_CLIP_MERGE_COUNT = 49152 - 256 - 2  # CLIP's vocabulary size, less bytes and specials

# a few merges so that some words are one token and others split into pieces
MERGES: tuple[tuple[str, str], ...] = (
    ("a", "t</w>"),
    ("c", "at</w>"),
    ("d", "o"),
    ("do", "g</w>"),
    ("t", "h"),
    ("th", "e</w>"),
    ("p", "h"),
    ("ph", "o"),
    ("pho", "t"),
    ("phot", "o</w>"),
    ("o", "f</w>"),
    ("r", "e"),
    ("re", "d</w>"),
    ("s", "k"),
    ("sk", "y</w>"),
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table, in CLIP's vocabulary order."""
    order = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in order}
    for extra, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + extra)  # insertion order: printable bytes first, then the rest
    return table


@functools.cache
def clip_merges() -> tuple[tuple[str, str], ...]:
    """OpenAI CLIP's BPE merges, read from the shipped file."""
    lines = gzip.decompress(_CLIP_BPE.read_bytes()).decode("utf-8").split("\n")
    return tuple(tuple(line.split()) for line in lines[1 : _CLIP_MERGE_COUNT + 1])  # type: ignore[misc]


def clip_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """The vocabulary of a merge list: bytes, bytes + ``</w>``, merges, then the two specials."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def tiny_vocab() -> dict[str, int]:
    """The tiny tokenizer's vocabulary."""
    return clip_vocab(MERGES)


def tiny_clip_token_ids() -> dict[str, int]:
    """The CLIP text-config fields that must match the tiny tokenizer: vocabulary size and the
    special-token ids."""
    vocab = tiny_vocab()
    return {
        "vocab_size": len(vocab),
        "bos_token_id": vocab["<|startoftext|>"],
        "eos_token_id": vocab["<|endoftext|>"],
        "pad_token_id": vocab["<|endoftext|>"],
    }


def write_tiny_tokenizer(out_dir: Path, *, pad_token: str = EOS_TOKEN) -> Path:
    """Write the tiny tokenizer into ``out_dir`` (see :func:`write_clip_tokenizer`)."""
    return write_clip_tokenizer(out_dir, MERGES, pad_token=pad_token)


def write_clip_tokenizer(
    out_dir: Path, merges: Sequence[tuple[str, str]], *, pad_token: str = EOS_TOKEN
) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer configs into ``out_dir``.

    Args:
        out_dir: the tokenizer folder (created).
        merges: the BPE merges (:func:`clip_merges` for the real tokenizer).
        pad_token: ``<|endoftext|>`` (SD1, SDXL tokenizer 1) or ``!`` (SD2, SDXL tokenizer 2).

    Returns:
        ``out_dir``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = json.dumps(clip_vocab(merges), ensure_ascii=False)
    (out_dir / "vocab.json").write_text(vocab, "utf-8")
    text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (out_dir / "merges.txt").write_text(text, "utf-8")
    specials = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": pad_token,
    }
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
        **specials,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), "utf-8")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2), "utf-8")
    return out_dir
