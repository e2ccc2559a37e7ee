"""What ``loraforge report`` shows, read from a run's output folder: the metrics file
(:mod:`loraforge.training.metrics`) and the sample images it names. Torch-free.

:func:`locate_metrics` finds the metrics file from an output folder or a recipe;
:func:`load_run` reads it into a :class:`RunData`; the page is drawn by
:mod:`loraforge.training.report_page`.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraforge.errors import ReportError
from loraforge.training.metrics import RUN, SAMPLE, STEP, read_metrics
from loraforge.training.output_names import metrics_name

RECIPE_SUFFIXES = (".yaml", ".yml")
METRICS_SUFFIX = metrics_name("")  # "-metrics.jsonl"
THUMBNAIL = 256  # longest side of a sample image in the page, in pixels


@dataclass(frozen=True)
class SamplePoint:
    """One sampling point: the step it shows and its images by prompt index."""

    step: int
    label: str
    files: dict[int, Path]


@dataclass(frozen=True)
class RunData:
    """A run as the report shows it.

    Attributes:
        metrics_path: the metrics file read.
        output_dir: the folder it lies in (sample files are relative to it).
        name: ``output.name``.
        run: the newest ``run`` record (recipe, buckets, VRAM estimate); empty when none.
        sessions: every ``run`` record, in order (a resumed run has several).
        steps: the ``step`` records, one per step, in step order.
        validation: ``(step, validation_loss)`` from any record that has one.
        points: the sampling points, in step order.
        prompts: the prompt text by prompt index.
    """

    metrics_path: Path
    output_dir: Path
    name: str
    run: dict[str, Any]
    sessions: list[dict[str, Any]]
    steps: list[dict[str, Any]]
    validation: list[tuple[int, float]]
    points: list[SamplePoint] = field(default_factory=list)
    prompts: dict[int, str] = field(default_factory=dict)


def locate_metrics(target: Path, name: str | None = None) -> Path:
    """The metrics file of the run in output folder ``target``, or of recipe ``target``.

    Args:
        target: an output folder, or a recipe file (its ``output.dir`` and ``output.name``).
        name: the run's ``output.name`` when the folder holds several runs.

    Raises:
        ReportError: ``target`` does not exist, holds no metrics file (or several, without
            ``name``); RecipeError: the recipe does not validate.
    """
    if target.is_file() and target.suffix.lower() in RECIPE_SUFFIXES:
        from loraforge.recipe import load_recipe

        recipe = load_recipe(target)
        return _named(Path(recipe.output.dir), name or recipe.output.name)
    if not target.is_dir():
        raise ReportError(
            f"{target}: no such folder",
            hint="give the run's output folder (output.dir) or its recipe file",
        )
    if name is not None:
        return _named(target, name)
    found = sorted(target.glob(f"*{METRICS_SUFFIX}"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise ReportError(
            f"{target}: no metrics file (<name>{METRICS_SUFFIX}) in this folder",
            hint="`loraforge train RECIPE` writes it from the first step; give the run's "
            "output.dir (or its recipe)",
        )
    names = ", ".join(p.name.removesuffix(METRICS_SUFFIX) for p in found)
    raise ReportError(
        f"{target} holds the metrics of several runs: {names}",
        hint="choose one with --name NAME",
    )


def _named(folder: Path, name: str) -> Path:
    path = folder / metrics_name(name)
    if not path.is_file():
        raise ReportError(
            f"{path}: no such metrics file",
            hint="train the recipe first (`loraforge train RECIPE`), or check output.dir and "
            "output.name",
        )
    return path


def load_run(path: Path) -> RunData:
    """Read a metrics file; for a step recorded twice, the later record wins.

    Raises:
        ReportError: the file cannot be read or holds no record.
    """
    try:
        records = read_metrics(path)
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: cannot be read ({e})") from e
    if not records:
        raise ReportError(
            f"{path}: holds no metrics record",
            hint="the run had not finished its set-up; report again after its first step",
        )
    sessions = [r for r in records if r.get("kind") == RUN]
    run = sessions[-1] if sessions else {}
    steps = {r["step"]: r for r in records if r.get("kind") == STEP}
    validation = {
        r["step"]: float(r["validation_loss"])
        for r in records
        if isinstance(r.get("validation_loss"), int | float)
    }
    name = str(run.get("name") or path.name.removesuffix(METRICS_SUFFIX))
    points, prompts = _sample_points([r for r in records if r.get("kind") == SAMPLE], path.parent)
    return RunData(
        metrics_path=path,
        output_dir=path.parent,
        name=name,
        run=run,
        sessions=sessions,
        steps=[steps[s] for s in sorted(steps)],
        validation=sorted(validation.items()),
        points=points,
        prompts=prompts,
    )


def _sample_points(
    records: list[dict[str, Any]], output_dir: Path
) -> tuple[list[SamplePoint], dict[int, str]]:
    by_point: dict[tuple[str, int], SamplePoint] = {}
    prompts: dict[int, str] = {}
    for record in records:
        point, number = str(record.get("point", "step")), int(record.get("number", 0))
        files = {}
        for image in record.get("images", []):
            index = int(image.get("index", 0))
            prompts[index] = str(image.get("prompt", ""))
            files[index] = output_dir / str(image.get("file", ""))
        by_point[(point, number)] = SamplePoint(int(record["step"]), f"{point} {number}", files)
    ordered = sorted(by_point.values(), key=lambda p: (p.step, not p.label.startswith("step")))
    return ordered, prompts


def image_data_uri(path: Path, longest: int = THUMBNAIL) -> str | None:
    """The image at ``path`` as a ``data:`` URI, shrunk to ``longest`` pixels on its longest
    side (PNG for small images, JPEG for larger ones); ``None`` when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (OSError, UnidentifiedImageError):
        return None
    image.thumbnail((longest, longest))
    buffer = io.BytesIO()
    small = max(image.size) <= 128
    image.save(buffer, format="PNG" if small else "JPEG", quality=88)
    mime = "image/png" if small else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"
