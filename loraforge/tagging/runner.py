"""A tagging run: which images need a caption, batched inference, atomic caption writes, report.

Resumable by construction: each batch's captions are written (atomically) as soon as the batch
is done, and in ``keep`` mode images that already have a caption are skipped, so a run that was
interrupted simply continues. Images are only ever read.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge.data.caption_files import read_caption
from loraforge.data.folders import list_image_files
from loraforge.data.images import BadImageError, load_image_rgb
from loraforge.fileio import write_text_atomic
from loraforge.progress import make_progress
from loraforge.tagging.compose import compose_caption
from loraforge.tagging.frequency import merge_frequencies, tag_frequency, write_frequency_report

if TYPE_CHECKING:
    from rich.console import Console

    from loraforge.recipe.types import TaggingConfig
    from loraforge.tagging.annotator import Annotator

EXISTING_MODES = ("keep", "append", "overwrite")


@dataclass(frozen=True)
class TagFolder:
    """An image folder to caption.

    Attributes:
        path: the folder.
        name: its key in the frequency report (``ss_tag_frequency``): the folder's base name.
        separator: the subset's ``caption_separator`` (tags are written ``"<sep> "``-joined).
        recursive: include images in sub-folders.
    """

    path: Path
    name: str
    separator: str = ","
    recursive: bool = False


@dataclass(frozen=True)
class TagJob:
    """One image to caption: where the caption goes and the caption it has now (append mode)."""

    image: Path
    caption: Path
    folder: TagFolder
    existing: str | None


@dataclass(frozen=True)
class Problem:
    """An image that was left alone, and why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class TagPlan:
    """What a run will do: the jobs, the images whose caption is kept, the images skipped."""

    jobs: tuple[TagJob, ...]
    kept: tuple[Path, ...]
    problems: tuple[Problem, ...]


@dataclass(frozen=True)
class TagRunResult:
    """What a run did.

    Attributes:
        written: captions written.
        kept: images whose existing caption was kept (``keep`` mode).
        problems: images not captioned (unreadable image or caption file), with reasons.
        frequency: ``{folder_name: {tag: count}}`` over all captions after the run.
        report_path: where the frequency report was written (``None``: not written).
        seconds: wall time of the inference part.
    """

    written: int
    kept: int
    problems: tuple[Problem, ...]
    frequency: dict[str, dict[str, int]]
    report_path: Path | None
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def plan_tagging(folders: Sequence[TagFolder], extension: str, existing: str) -> TagPlan:
    """Decide per image: caption it, keep its caption, or leave it (with a reason).

    Args:
        folders: the image folders.
        extension: the caption file extension (``.txt``).
        existing: ``keep`` (skip captioned images: resume), ``append`` or ``overwrite``.

    Raises:
        ValueError: an unknown ``existing`` mode. DatasetError: a folder does not exist.
    """
    if existing not in EXISTING_MODES:
        raise ValueError(f"existing must be one of {EXISTING_MODES}, got {existing!r}")
    jobs: list[TagJob] = []
    kept: list[Path] = []
    problems: list[Problem] = []
    claimed: dict[Path, Path] = {}
    for folder in folders:
        for image in list_image_files(folder.path, recursive=folder.recursive):
            found = read_caption(image, extension, enable_wildcard=True)
            other = claimed.setdefault(found.path, image)
            if other != image:
                problems.append(Problem(image, f"shares its caption file with {other.name}"))
                continue
            action, reason = _decide(found.text, found.problem, existing, found.path.is_dir())
            if action == "keep":
                kept.append(image)
            elif action == "skip":
                problems.append(Problem(image, f"{found.path.name} {reason}"))
            else:
                text = found.text if existing == "append" else None
                jobs.append(TagJob(image, found.path, folder, text or None))
    return TagPlan(tuple(jobs), tuple(kept), tuple(problems))


def _decide(
    text: str | None, problem: str | None, existing: str, is_dir: bool
) -> tuple[str, str | None]:
    """``("tag" | "keep" | "skip", reason when skipped)`` for one image's caption state."""
    if problem is not None:
        # An unreadable caption file is replaced only when asked to overwrite, a folder never.
        return ("tag", None) if existing == "overwrite" and not is_dir else ("skip", problem)
    if not text:
        return "tag", None  # no caption file, or an empty one
    if existing == "keep":
        return "keep", None
    if existing == "append" and "\n" in text:
        return "skip", "has several lines (wildcards); appending would drop all but one"
    return "tag", None


def tag_images(
    jobs: Sequence[TagJob],
    annotator: Annotator,
    config: TaggingConfig,
    *,
    batch_size: int,
    append: bool,
    console: Console,
    show_progress: bool = True,
    workers: int = 2,
) -> tuple[int, list[Problem]]:
    """Caption ``jobs`` in batches and write each caption file atomically.

    Images are decoded and preprocessed on ``workers`` threads while the previous batch runs
    through the model.

    Returns:
        ``(captions written, images that could not be read)``.
    """
    batches = [list(jobs[i : i + batch_size]) for i in range(0, len(jobs), max(batch_size, 1))]
    problems: list[Problem] = []
    written = 0
    progress = make_progress(console, enabled=show_progress)
    with (
        ThreadPoolExecutor(max_workers=1) as loader,
        ThreadPoolExecutor(max_workers=max(workers, 1)) as decoders,
        progress,
    ):
        task = progress.add_task("tagging", total=len(jobs))
        pending = loader.submit(_load_batch, decoders, annotator, batches[0]) if batches else None
        for index in range(len(batches)):
            loaded, failed = pending.result()
            if index + 1 < len(batches):
                pending = loader.submit(_load_batch, decoders, annotator, batches[index + 1])
            problems.extend(failed)
            if loaded:
                results = annotator.annotate([prepared for _, prepared in loaded])
                for (job, _), items in zip(loaded, results, strict=True):
                    _write_caption(job, items, config, append)
                    written += 1
            progress.advance(task, len(batches[index]))
    return written, problems


def _load_batch(
    decoders: ThreadPoolExecutor, annotator: Annotator, batch: list[TagJob]
) -> tuple[list[tuple[TagJob, Any]], list[Problem]]:
    def load(job: TagJob) -> tuple[TagJob, Any] | Problem:
        try:
            return job, annotator.prepare(load_image_rgb(job.image))
        except BadImageError as e:
            return Problem(job.image, e.reason)

    outcomes = list(decoders.map(load, batch))
    loaded = [o for o in outcomes if not isinstance(o, Problem)]
    return loaded, [o for o in outcomes if isinstance(o, Problem)]


def _write_caption(job: TagJob, items: list[str], config: TaggingConfig, append: bool) -> None:
    text = compose_caption(
        items, job.existing, config, append=append, separator=job.folder.separator
    )
    write_text_atomic(job.caption, text + "\n")


def folder_frequency(folders: Sequence[TagFolder], extension: str) -> dict[str, dict[str, int]]:
    """Tag frequency over the caption files now present (first line each, as training reads).

    Folders with the same name are summed, as in sd-scripts' ``ss_tag_frequency``.
    """
    reports = []
    for folder in folders:
        captions = [
            found.text
            for image in list_image_files(folder.path, recursive=folder.recursive)
            if (found := read_caption(image, extension)).text
        ]
        reports.append({folder.name: tag_frequency(captions, folder.separator)})
    return merge_frequencies(*reports)


def run_tagging(
    folders: Sequence[TagFolder],
    annotator: Annotator,
    config: TaggingConfig,
    *,
    console: Console,
    existing: str | None = None,
    batch_size: int | None = None,
    report_path: Path | None = None,
    show_progress: bool = True,
    workers: int = 2,
) -> TagRunResult:
    """Plan, caption, and write the frequency report.

    Args:
        folders: the image folders.
        annotator: a loaded model (:func:`~loraforge.tagging.annotator.load_annotator`).
        config: the recipe's tagging section.
        console: where the progress bar goes (stderr).
        existing: overrides ``config.existing_captions`` (``keep``/``append``/``overwrite``).
        batch_size: overrides ``config.batch_size``.
        report_path: where to write the JSON frequency report (``None``: not written).
        show_progress: draw the progress bar.
        workers: image decoding threads.
    """
    mode = existing or config.existing_captions
    plan = plan_tagging(folders, config.caption_extension, mode)
    start = time.perf_counter()
    written, failed = tag_images(
        plan.jobs,
        annotator,
        config,
        batch_size=batch_size or config.batch_size,
        append=mode == "append",
        console=console,
        show_progress=show_progress,
        workers=workers,
    )
    seconds = time.perf_counter() - start
    frequency = folder_frequency(folders, config.caption_extension)
    if report_path is not None:
        write_frequency_report(report_path, frequency)
    return TagRunResult(
        written=written,
        kept=len(plan.kept),
        problems=plan.problems + tuple(failed),
        frequency=frequency,
        report_path=report_path,
        seconds=seconds,
    )
