"""Atomic, no-clobber file writing shared by every command that writes outputs, and the one
JSON reader for model configs.

Outputs are written to a temporary file (or folder) in the destination folder and renamed into
place, so a crash or Ctrl-C never leaves a half-written file under the final name. A write that
fails (a full disk, a read-only folder) becomes one :class:`OutputWriteError` naming the path and
the free space, whatever library was writing (safetensors, torch, Pillow).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loraforge.errors import LoraforgeError, ModelError, OutputExistsError, OutputWriteError

_DISK_FULL_WORDS = ("no space left", "os error 28", "storagefull", "disk quota")


def refuse_overwrite(path: Path, force: bool) -> None:
    """Raise when ``path`` exists and ``force`` is false.

    Raises:
        OutputExistsError: naming the file and the ``--force`` fix.
    """
    if path.exists() and not force:
        raise OutputExistsError(
            f"{path} already exists", hint="pass --force to overwrite it, or choose another output"
        )


@contextlib.contextmanager
def atomic_path(path: Path | str, *, force: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` when the block succeeds.

    Args:
        path: the final destination.
        force: when false, an existing ``path`` raises :class:`OutputExistsError` before anything
            is written.

    The temporary file is removed if the block raises (including ``KeyboardInterrupt``).
    """
    path = Path(path)
    refuse_overwrite(path, force)
    with write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with write_errors(path):
            yield tmp
            # mkstemp creates 0600 files; an output should get the permissions any new file gets.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: Path | str, *, force: bool) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; it replaces ``path`` when the block succeeds.

    Raises:
        OutputExistsError: ``path`` exists and ``force`` is false.
        OutputWriteError: writing failed (see :func:`write_errors`).
    """
    path = Path(path)
    refuse_overwrite(path, force)
    with write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with write_errors(path):
            yield tmp
            if path.exists():
                old = Path(
                    tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent)
                )
                os.replace(path, old / path.name)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def write_errors(path: Path) -> Iterator[None]:
    """Turn a failed write inside the block into an :class:`OutputWriteError` naming ``path``
    and the free space of its disk (safetensors and torch report a full disk as their own
    error types)."""
    try:
        yield
    except OSError as e:
        raise write_error(path, e) from e
    except Exception as e:
        # torch.save: RuntimeError("PytorchStreamWriter failed writing file …"); safetensors:
        # SafetensorError("… IoError …"); any other error is not about writing and stays as is
        text = str(e).lower()
        writing = isinstance(e, RuntimeError) and "writ" in text
        if not (writing or (type(e).__name__ == "SafetensorError" and "io" in text)):
            raise
        raise write_error(path, e) from e


def write_error(path: Path, error: BaseException) -> OutputWriteError:
    """The user error for a write of ``path`` that failed with ``error``."""
    text = str(error)
    full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
        word in text.lower() for word in _DISK_FULL_WORDS
    )
    free = free_space(path)
    reason = "the disk is full" if full else (getattr(error, "strerror", None) or text)
    where = f"{free} free on that disk" if free is not None else "free space unknown"
    return OutputWriteError(
        f"cannot write {path}: {reason} ({where})",
        hint="free some space or write to another disk (output.dir, -o); files written before "
        "are intact"
        if full
        else "check that the folder is writable",
    )


def free_space(path: Path) -> str | None:
    """The free space of the disk ``path`` is (or would be) on, e.g. ``"12.3 MiB"``."""
    for folder in (path, *path.parents):
        try:
            free = float(shutil.disk_usage(folder).free)
        except OSError:
            continue
        for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
            if free < 1024 or unit == "TiB":
                return f"{free:.0f} {unit}" if unit == "bytes" else f"{free:.1f} {unit}"
            free /= 1024
    return None


def write_text_atomic(path: Path | str, text: str, *, force: bool = True) -> None:
    """Write UTF-8 text to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, force=force) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json(path: Path, *, hint: str = "is the model folder complete?") -> dict[str, Any]:
    """Read a JSON file (a model's ``config.json``, ``model_index.json``…).

    Raises:
        ModelError: the file is missing, unreadable or not JSON, with ``hint``.
    """
    try:
        return json.loads(Path(path).read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {path} ({e})", hint=hint) from e


# A safetensors header larger than this is not a real header (guards against a corrupt length).
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def read_safetensors_header(
    path: Path, *, error: type[LoraforgeError], hint: str
) -> tuple[dict[str, dict], dict[str, str]]:
    """Parse and check a safetensors header without reading tensor data.

    Returns:
        ``(entries, metadata)``: ``entries`` maps each tensor key to its ``dtype``, ``shape``
        and ``data_offsets``.

    Raises:
        error: not a safetensors file, a corrupt header, or a truncated file (with ``hint``).
    """

    def corrupt(why: str) -> LoraforgeError:
        return error(f"{path}: is not a readable safetensors file: {why}", hint=hint)

    try:
        size = path.stat().st_size
    except OSError as e:
        raise corrupt(str(e)) from e
    with path.open("rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise corrupt(f"only {size} bytes long")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(_MAX_SAFETENSORS_HEADER, size - 8):
            raise corrupt("the header length is larger than the file")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise corrupt("the header is not JSON") from e
    if not isinstance(header, dict):
        raise corrupt("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_len = 0
    for key, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise corrupt(f"the entry for {key!r} has no data offsets")
        data_len = max(data_len, int(offsets[1]))
    if 8 + header_len + data_len > size:
        missing = 8 + header_len + data_len - size
        raise corrupt(f"it is truncated ({missing} bytes of tensor data missing)")
    return header, {str(k): str(v) for k, v in metadata.items()}
