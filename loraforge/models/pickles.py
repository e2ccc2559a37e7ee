"""Find pickled weights before anything is loaded, so that they are refused with the opt-in named
(``model.allow_pickle``) instead of failing inside a loader. Torch-free: ``check`` uses it.

A pickle can run code when it is loaded; loraforge reads one only when the recipe opts in, and then
with :func:`load_weights_only`, the one place that unpickles (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loraforge.errors import LoraforgeError, ModelError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format
_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def looks_like_pickle(path: Path) -> bool:
    """A ``.ckpt``/``.pt``/``.pth``/``.bin`` name, or the bytes of a torch or pickle file."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head == _ZIP_MAGIC or (
        head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    )


def pickled_weights(path: Path) -> list[Path]:
    """The pickled weight files loading ``path`` would read: the file itself, or for a
    diffusers folder each component (``unet``, ``vae``, ``text_encoder*``, or a VAE folder)
    that has only pickled weights."""
    path = Path(path)
    if path.is_file():
        return [path] if looks_like_pickle(path) else []
    if not path.is_dir():
        return []
    folders = [path / c for c in _COMPONENTS if (path / c).is_dir()] or [path]
    found = []
    for folder in folders:
        if any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json")):
            continue
        pickles = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        found += pickles[:1]
    return found


def refuse_pickles(path: str | Path, field: str, allow_pickle: bool) -> None:
    """Raise when ``path`` would be loaded from pickled weights without the opt-in.

    Raises:
        ModelError: naming the file and ``model.allow_pickle``.
    """
    found = [] if allow_pickle else pickled_weights(Path(path).expanduser())
    if found:
        raise ModelError(pickle_message(found, field), hint=PICKLE_HINT)


def pickle_message(found: list[Path], field: str) -> str:
    return (
        f"{field}: {found[0]} is a pickle (PyTorch .bin/.ckpt weights), which can run code when "
        "loaded; loraforge does not unpickle without the opt-in"
    )


PICKLE_HINT = (
    "convert it to .safetensors, or set model.allow_pickle: true if you trust the file (it is "
    "then read with torch.load(weights_only=True))"
)


def load_weights_only(path: Path, error: type[LoraforgeError], hint: str) -> Any:
    """Unpickle ``path`` with ``torch.load(weights_only=True)`` on the CPU: tensors and plain
    containers only, never arbitrary code. Callers decide first whether a pickle may be read.

    Raises:
        error: the file cannot be read that way (damaged, or it holds more than tensors), with
            ``hint``.
    """
    import torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for damaged or foreign files
        raise error(
            f"{path}: cannot be read as a weights-only PyTorch file ({e})", hint=hint
        ) from e
