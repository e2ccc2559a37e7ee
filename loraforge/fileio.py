"""Atomic, no-clobber file writing shared by every command that writes outputs, and the one
JSON reader for model configs.

Outputs are written to a temporary file in the destination folder and renamed into place, so a
crash or Ctrl-C never leaves a half-written file under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loraforge.errors import ModelError, OutputExistsError


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600 files; an output should get the permissions any new file gets.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
