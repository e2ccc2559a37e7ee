"""Tag frequency: how often each tag appears, per dataset folder, as ``ss_tag_frequency`` has it.

sd-scripts stores ``ss_tag_frequency`` in LoRA metadata as ``{folder_name: {tag: count}}``
where ``folder_name`` is the base name of the subset's image folder and tags are the
comma-separated pieces of each caption, stripped and lower-cased. The count itself is the one
the training metadata uses (:func:`loraforge.data.dataset_facts.count_tags`), so the report `tag`
writes and the file's ``ss_tag_frequency`` agree for comma-separated captions.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from loraforge.data.dataset_facts import count_tags as tag_frequency
from loraforge.fileio import write_text_atomic

__all__ = [
    "merge_frequencies",
    "read_frequency_report",
    "tag_frequency",
    "tag_frequency_by_folder",
    "write_frequency_report",
]


def tag_frequency_by_folder(
    captions_by_folder: Mapping[str, Iterable[str]], separator: str = ","
) -> dict[str, dict[str, int]]:
    """``{folder_name: tag_frequency(captions)}``, the shape of ``ss_tag_frequency``.

    Args:
        captions_by_folder: captions keyed by the folder's base name (``10_mychar``).
        separator: see :func:`tag_frequency`.
    """
    return {name: tag_frequency(caps, separator) for name, caps in captions_by_folder.items()}


def merge_frequencies(*reports: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    """Add reports together; folders with the same name are summed (as sd-scripts does)."""
    merged: dict[str, dict[str, int]] = {}
    for report in reports:
        for folder, counts in report.items():
            target = merged.setdefault(folder, {})
            for tag, n in counts.items():
                target[tag] = target.get(tag, 0) + int(n)
    return {
        folder: dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        for folder, counts in merged.items()
    }


def write_frequency_report(path: Path, report: Mapping[str, Mapping[str, int]]) -> None:
    """Write ``report`` as JSON (UTF-8, indented) atomically; overwrites an older report."""
    write_text_atomic(Path(path), json.dumps(report, indent=2, ensure_ascii=False) + "\n")


def read_frequency_report(path: Path) -> dict[str, dict[str, int]]:
    """Read a report written by :func:`write_frequency_report`.

    Raises:
        OSError: the file cannot be read; ``ValueError``: it is not such a report.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path}: not a tag frequency report ({{folder: {{tag: count}}}})")
    return {str(k): {str(t): int(n) for t, n in v.items()} for k, v in data.items()}
