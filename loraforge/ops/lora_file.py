"""Reading and writing LoRA files: safetensors with metadata, hashes computed like sd-scripts.

A LoRA file is a flat ``{key: tensor}`` mapping plus a ``{str: str}`` metadata header. Reading
never unpickles unless the caller opts in; writing is atomic (temporary file + rename) and fills
``sshs_model_hash`` / ``sshs_legacy_hash`` exactly the way kohya-ss/sd-scripts does
(``library/train_util.py: precalculate_safetensors_hashes``): both are hashes of the bytes that
``safetensors.torch.save(tensors, ss_only_metadata)`` produces, where ``ss_only_metadata`` keeps
the ``ss_*`` keys only, so that later user edits of other metadata do not change the hash.

- ``sshs_model_hash``: SHA-256 of everything after the 8-byte length and the JSON header.
- ``sshs_legacy_hash``: the first 8 hex digits of the SHA-256 of the 64 KiB at offset 1 MiB
  (sd-webui-additional-networks' old hash; it depends on the header length too).
"""

from __future__ import annotations

import hashlib
import io
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraforge.errors import LoraFileError
from loraforge.fileio import atomic_path, read_safetensors_header
from loraforge.models.pickles import PICKLE_SUFFIXES, looks_like_pickle


@dataclass(frozen=True)
class LoraFile:
    """The raw contents of a LoRA file.

    Attributes:
        tensors: every tensor in the file, by key (``lora_unet_…​.lora_down.weight`` …).
        metadata: the safetensors metadata header (empty for pickle files).
        path: where it was read from; ``None`` for an in-memory state dict.
    """

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    @property
    def label(self) -> str:
        """How messages name this file."""
        return str(self.path) if self.path is not None else "<state dict>"


def read_lora_file(path: Path | str, *, allow_pickle: bool = False) -> LoraFile:
    """Read a LoRA file (safetensors; pickle only when ``allow_pickle``).

    Args:
        path: a ``.safetensors`` file, or a ``.ckpt``/``.pt``/``.pth``/``.bin`` pickle.
        allow_pickle: default False. When True, pickles are read with
            ``torch.load(weights_only=True)``, which refuses arbitrary code.

    Raises:
        LoraFileError: missing file, a folder, a pickle without opt-in, a truncated or corrupt
            file, or a file whose values are not tensors.
    """
    path = Path(path)
    if not path.exists():
        raise LoraFileError(f"{path}: no such file", hint="check the path")
    if path.is_dir():
        raise LoraFileError(
            f"{path}: is a folder, not a LoRA file", hint="pass the .safetensors file"
        )
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _read_pickle(path, allow_pickle)
    try:
        tensors, metadata = _read_safetensors(path)
    except LoraFileError:
        if looks_like_pickle(path):  # a pickle under a .safetensors name
            return _read_pickle(path, allow_pickle)
        raise
    return LoraFile(tensors=tensors, metadata=metadata, path=path)


def _read_pickle(path: Path, allow_pickle: bool) -> LoraFile:
    if not allow_pickle:
        raise LoraFileError(
            f"{path}: is a PyTorch pickle; loraforge does not unpickle files by default "
            "(a pickle can run arbitrary code)",
            hint="convert it to .safetensors, or pass --allow-pickle if you trust the file "
            "(it is then read with torch.load(weights_only=True))",
        )
    from loraforge.models.pickles import load_weights_only

    data = load_weights_only(
        path,
        LoraFileError,
        hint="the file may be corrupt or hold more than tensors; convert it with the tool "
        "that made it",
    )
    if (
        isinstance(data, Mapping)
        and "state_dict" in data
        and isinstance(data["state_dict"], Mapping)
    ):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise LoraFileError(f"{path}: holds a {type(data).__name__}, not a state dict")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in data.items():
        if not isinstance(value, torch.Tensor):
            raise LoraFileError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        tensors[str(key)] = value
    return LoraFile(tensors=tensors, metadata={}, path=path)


_INCOMPLETE = "the download or copy may be incomplete; fetch the file again"


def _corrupt(path: Path, why: str) -> LoraFileError:
    return LoraFileError(f"{path}: is not a readable safetensors file: {why}", hint=_INCOMPLETE)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _, metadata = read_safetensors_header(path, error=LoraFileError, hint=_INCOMPLETE)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise _corrupt(path, str(e)) from e
    return tensors, metadata


def sshs_hashes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` exactly as sd-scripts computes them.

    Args:
        tensors: the tensors as they will be written (already in the save dtype).
        metadata: the full metadata; only ``ss_*`` keys take part.
    """
    from safetensors.torch import save

    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = save(_contiguous(tensors), ss_only)
    (header_len,) = struct.unpack("<Q", data[:8])
    model_hash = hashlib.sha256(data[8 + header_len :]).hexdigest()
    buffer = io.BytesIO(data)
    buffer.seek(0x100000)
    legacy_hash = hashlib.sha256(buffer.read(0x10000)).hexdigest()[:8]
    return model_hash, legacy_hash


def modelspec_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """``modelspec.hash_sha256`` as sd-scripts' ``sai_model_spec`` computes it (tensor by tensor).

    Tensors are taken in sorted key order so the value does not depend on dict order.
    """
    from safetensors.torch import save

    digest = hashlib.sha256()
    for key in sorted(tensors):
        data = save({"tensor": tensors[key].contiguous()})
        (header_len,) = struct.unpack("<Q", data[:8])
        digest.update(data[8 + header_len :])
    return f"0x{digest.hexdigest()}"


def _contiguous(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def write_lora_file(
    path: Path | str,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    *,
    force: bool = False,
) -> dict[str, str]:
    """Write a LoRA file atomically, with the sd-scripts hashes filled in.

    Args:
        path: the destination ``.safetensors`` file.
        tensors: what to write, already in the save dtype.
        metadata: the header; ``sshs_*`` (and ``modelspec.hash_sha256`` when present) are
            recomputed.
        force: default False; overwrite an existing file.

    Returns:
        The metadata as written.

    Raises:
        OutputExistsError: ``path`` exists and ``force`` is false.
        LoraFileError: the destination is not a ``.safetensors`` file.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise LoraFileError(
            f"{path}: LoRA outputs are written as .safetensors",
            hint="name the output *.safetensors",
        )
    data = _contiguous(tensors)
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = sshs_hashes(data, meta)
    if "modelspec.hash_sha256" in meta:
        meta["modelspec.hash_sha256"] = modelspec_hash(data)
    with atomic_path(path, force=force) as tmp:
        save_file(data, str(tmp), metadata=meta)
    return meta
