"""A disk store of small tensor entries, each tagged with what it was computed from.

One safetensors file per entry (``<folder>/<sha1(key)>.safetensors``). The header's metadata holds
the entry's *dependencies* (VAE identity, bucket, crop, dtype, …); an entry whose dependencies
differ from the current ones is stale and is never returned, so a changed VAE or resolution
rebuilds the cache instead of silently training on old latents. Files are written to a temporary
name and renamed, so an interrupted run never leaves a half-written entry under the final name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loraforge.fileio import atomic_path

FORMAT_VERSION = "1"


def _file_name(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8")).hexdigest() + ".safetensors"


class EntryStore:
    """Entries under ``folder``; see the module docstring.

    Args:
        folder: where the entry files live (created on the first save).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path_for(self, key: str) -> Path:
        return self.folder / _file_name(key)

    def is_valid(self, key: str, depends: Mapping[str, str]) -> bool:
        """True when the entry exists, is readable, and was made from exactly ``depends``."""
        path = self.path_for(key)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="pt") as handle:
                stored = handle.metadata() or {}
        except Exception:  # a truncated or foreign file is as good as none: rebuild it
            return False
        return stored == {**depends, "loraforge_cache": FORMAT_VERSION, "key": key}

    def load(self, key: str) -> dict[str, torch.Tensor]:
        """The tensors of an entry (call :meth:`is_valid` first)."""
        with safe_open(str(self.path_for(key)), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118

    def save(
        self, key: str, tensors: Mapping[str, torch.Tensor], depends: Mapping[str, str]
    ) -> None:
        """Write an entry atomically (replacing a stale one)."""
        metadata = {**depends, "loraforge_cache": FORMAT_VERSION, "key": key}
        contiguous = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        with atomic_path(self.path_for(key)) as tmp:
            save_file(contiguous, str(tmp), metadata=metadata)
