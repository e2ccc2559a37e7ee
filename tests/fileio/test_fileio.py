"""Atomic writes: all or nothing, no clobbering without force, ordinary permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from loraforge.errors import OutputExistsError
from loraforge.fileio import atomic_path, write_text_atomic


def test_written_file_gets_umask_permissions(tmp_path: Path) -> None:
    # Regression: mkstemp's 0600 leaked into every output (LoRA files unreadable by other users).
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644


def test_failure_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_force(tmp_path: Path) -> None:
    target = tmp_path / "r.yaml"
    target.write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        write_text_atomic(target, "theirs", force=False)
    assert target.read_text() == "mine"
    write_text_atomic(target, "theirs", force=True)
    assert target.read_text() == "theirs"
