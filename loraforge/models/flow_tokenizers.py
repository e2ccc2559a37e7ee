"""Tokenizers of the SD3 / FLUX text encoders: CLIP's (shipped vocabulary) and T5-XXL's (a
diffusers folder's, one beside the ``t5xxl`` file, or the Hugging Face cache's)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from loraforge.errors import ModelError

T5_TOKENIZER_ID = "google/t5-v1_1-xxl"


def _has_t5_vocabulary(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "spiece.model").is_file()


def folder_tokenizer(
    folder: Path, index: int, family: str, slot: str, beside: Path | None = None
) -> Any:
    """The model folder's tokenizer; for T5 also one in the T5 file's folder (or its
    ``t5_tokenizer/``, as ComfyUI keeps it), else :func:`default_tokenizer`."""
    sub = folder / ("tokenizer" if index == 0 else f"tokenizer_{index + 1}")
    if slot == "t5xxl":
        places = [sub] + ([beside, beside / "t5_tokenizer"] if beside is not None else [])
        found = next((place for place in places if _has_t5_vocabulary(place)), None)
        if found is not None:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(found))
        return default_tokenizer(slot)
    if (sub / "vocab.json").is_file():
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(str(sub))
    return default_tokenizer(slot)


def default_tokenizer(slot: str) -> Any:
    """The tokenizer of an encoder given as a file: OpenAI CLIP's (shipped; CLIP-G pads with
    ``!``), or T5-XXL's from the Hugging Face cache.

    Raises:
        ModelError: the T5 tokenizer is not cached and the hub cannot be reached.
    """
    if slot != "t5xxl":
        from transformers import CLIPTokenizer

        from loraforge.models.clip_tokenizer import clip_merges, write_clip_tokenizer

        pad = "!" if slot == "clip_g" else "<|endoftext|>"
        with tempfile.TemporaryDirectory(prefix="loraforge-tokenizer-") as tmp:
            return CLIPTokenizer.from_pretrained(
                write_clip_tokenizer(Path(tmp), clip_merges(), pad_token=pad)
            )
    from transformers import AutoTokenizer

    from loraforge.models.hub import hub_reachable

    try:
        return AutoTokenizer.from_pretrained(T5_TOKENIZER_ID, local_files_only=not hub_reachable())
    except Exception as e:  # hub errors have no common base class below Exception
        raise ModelError(
            f"the T5-XXL tokenizer ({T5_TOKENIZER_ID}) is not in the Hugging Face cache",
            hint="run once online to cache it (a few MB, as sd-scripts does), put its "
            "tokenizer.json (or spiece.model) beside the t5xxl file or in a t5_tokenizer/ folder "
            "there, or use a diffusers folder that has tokenizer_2/ (FLUX) or tokenizer_3/ (SD3)",
        ) from e
