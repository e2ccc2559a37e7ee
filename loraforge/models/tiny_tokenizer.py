"""A tiny CLIP BPE tokenizer written by code: byte-level base vocabulary, a few merges, specials.

Laid out exactly like OpenAI CLIP's vocabulary (256 byte symbols, the same 256 with ``</w>``, one
entry per merge, then ``<|startoftext|>`` and ``<|endoftext|>``), so ``CLIPTokenizer`` reads it
like the real one; only the merge list is short. ``!`` is id 0, as in the real vocabulary, which
is what SD2's and SDXL's second tokenizer pad with.
"""

from __future__ import annotations

import json
from pathlib import Path

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77

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


def tiny_vocab() -> dict[str, int]:
    """The vocabulary: bytes, bytes + ``</w>``, merges, then the two specials (CLIP's order)."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in MERGES]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def write_tiny_tokenizer(out_dir: Path, *, pad_token: str = EOS_TOKEN) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer configs into ``out_dir``.

    Args:
        out_dir: the tokenizer folder (created).
        pad_token: ``<|endoftext|>`` (SD1, SDXL tokenizer 1) or ``!`` (SD2, SDXL tokenizer 2).

    Returns:
        ``out_dir``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(tiny_vocab(), ensure_ascii=False), "utf-8")
    merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES)
    (out_dir / "merges.txt").write_text(merges, "utf-8")
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
