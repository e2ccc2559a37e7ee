"""Hashes of a base model or VAE file, as A1111 and sd-scripts compute them for LoRA metadata."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelHashes:
    """Hashes of a base model / VAE file, as A1111 and sd-scripts compute them.

    Attributes:
        legacy: first 8 hex digits of SHA-256 over 64 KiB at offset 1 MiB (``ss_sd_model_hash``).
        sha256: SHA-256 of the whole file (``ss_new_sd_model_hash``).
    """

    legacy: str
    sha256: str


def model_file_hashes(path: str | os.PathLike[str]) -> ModelHashes | None:
    """A1111-style hashes of a single-file model; ``None`` for folders, hub ids, missing files."""
    path = Path(path)
    if not path.is_file():
        return None
    full = hashlib.sha256()
    with path.open("rb") as file:
        file.seek(0x100000)
        legacy = hashlib.sha256(file.read(0x10000)).hexdigest()[:8]
        file.seek(0)
        for chunk in iter(lambda: file.read(1 << 20), b""):
            full.update(chunk)
    return ModelHashes(legacy=legacy, sha256=full.hexdigest())
