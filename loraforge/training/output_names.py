"""Checkpoint and state folder names as sd-scripts writes them, and keep-last-N rotation.

sd-scripts (``library/train_util.py``) names intermediate files ``{name}-{epoch:06d}`` and
``{name}-step{step:08d}``, the final file ``{name}``, and state folders the same with ``-state``
appended (``{name}-state`` for the last). loraforge keeps those names so existing tools and
habits (sorting, "keep the last N") still work.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Literal

Kind = Literal["epoch", "step"]
EXT = ".safetensors"


def epoch_ckpt_name(name: str, epoch: int, ext: str = EXT) -> str:
    """``lora-000004.safetensors`` for epoch 4."""
    return f"{name}-{epoch:06d}{ext}"


def step_ckpt_name(name: str, step: int, ext: str = EXT) -> str:
    """``lora-step00000100.safetensors`` for step 100."""
    return f"{name}-step{step:08d}{ext}"


def last_ckpt_name(name: str, ext: str = EXT) -> str:
    """``lora.safetensors``: the final file."""
    return f"{name}{ext}"


RAW_EXT = "-raw" + EXT


def raw_ckpt_name(file_name: str) -> str:
    """``lora-step00000100-raw.safetensors``: the raw (not averaged) weights saved next to a
    file that holds the EMA weights (``training.ema.save_raw``)."""
    return file_name.removesuffix(EXT) + RAW_EXT


def best_ckpt_name(name: str, ext: str = EXT) -> str:
    """``lora-best.safetensors``: the weights with the lowest validation loss so far
    (``output.keep_best``; rotation never removes it)."""
    return f"{name}-best{ext}"


def epoch_state_name(name: str, epoch: int) -> str:
    """``lora-000004-state``: the resumable state saved at the end of epoch 4."""
    return f"{name}-{epoch:06d}-state"


def step_state_name(name: str, step: int) -> str:
    """``lora-step00000100-state``: the resumable state saved at step 100."""
    return f"{name}-step{step:08d}-state"


def last_state_name(name: str) -> str:
    """``lora-state``: the state saved at the end of training (or on Ctrl-C)."""
    return f"{name}-state"


def metrics_name(name: str) -> str:
    """``lora-metrics.jsonl``: the run's metrics, one JSON record per line (see
    :mod:`loraforge.training.metrics`)."""
    return f"{name}-metrics.jsonl"


def _pattern(name: str, kind: Kind, suffix: str) -> re.Pattern[str]:
    number = r"(\d{6})" if kind == "epoch" else r"step(\d{8})"
    return re.compile(rf"{re.escape(name)}-{number}{re.escape(suffix)}")


def list_numbered(
    directory: Path | str, name: str, kind: Kind, *, states: bool = False, ext: str = EXT
) -> list[tuple[int, Path]]:
    """Existing numbered checkpoints (or state folders) of run ``name``, oldest first.

    Args:
        directory: the output folder.
        name: ``output.name``.
        kind: ``"epoch"`` files (``name-000004``) or ``"step"`` files (``name-step00000100``).
        states: list ``-state`` folders instead of ``ext`` files.
        ext: file extension of checkpoints.

    Returns:
        ``(number, path)`` pairs sorted by number. Other runs' files never match, even when
        their name starts with ``name``.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    pattern = _pattern(name, kind, "-state" if states else ext)
    found = []
    for path in directory.iterdir():
        match = pattern.fullmatch(path.name)
        if match and (path.is_dir() if states else path.is_file()):
            found.append((int(match.group(1)), path))
    return sorted(found)


def rotate(
    directory: Path | str,
    name: str,
    kind: Kind,
    keep_last: int | None,
    *,
    states: bool = False,
    ext: str = EXT,
) -> list[Path]:
    """Delete all but the newest ``keep_last`` numbered checkpoints (or state folders).

    Epoch and step checkpoints are rotated separately, and the final ``name.safetensors`` /
    ``name-state`` and the best ``name-best.safetensors`` are never touched. ``keep_last=None``
    keeps everything.

    Raises:
        ValueError: ``keep_last`` below 1.

    Returns:
        The removed paths.
    """
    if keep_last is None:
        return []
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    existing = list_numbered(directory, name, kind, states=states, ext=ext)
    removed = [path for _, path in existing[:-keep_last]]
    for path in removed:
        if states:
            shutil.rmtree(path)
        else:
            path.unlink()
    return removed
