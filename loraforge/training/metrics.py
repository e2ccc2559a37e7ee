"""The metrics file of a run: one JSON object per line in ``<output.dir>/<name>-metrics.jsonl``.

Every record has ``kind`` and ``step`` (the global optimizer step it belongs to). Kinds:

* ``run``: a training session starts (fresh or resumed): ``time``, ``resumed``, ``recipe`` (the
  resolved recipe), ``recipe_file``, ``device``, ``peak_memory_kind``, ``length``, ``buckets``
  and ``totals`` (the bucket report), ``vram_estimate`` (the analytic estimate ``check --vram``
  prints, or ``{"error": ...}``).
* ``step``: one optimizer step: ``epoch`` (1-based), ``loss``, ``average`` (moving average over
  the last epoch's steps, as shown live), ``lr`` (per named parameter group), ``grad_norm``,
  ``max_norm`` (``{keys_scaled, mean_norm, max_norm}`` with ``scale_weight_norms``, else null),
  ``skipped`` (fp16 found inf/NaN gradients and skipped the update), ``seconds`` (wall time of
  the step: data, forward, backward, update; saving and sampling are not counted) and
  ``peak_memory`` (bytes; see :func:`peak_memory_bytes`).
* ``sample``: sample images were written: ``point`` (``step``/``epoch``), ``number`` and
  ``images`` (``file`` relative to the output folder, ``prompt``, ``index``, ``seed``).
* anything else other code records with :meth:`MetricsLog.record`, e.g.
  ``{"kind": "validation", "step": 200, "validation_loss": 0.093}``.

``grad_norm`` is the total L2 norm of the trainable parameters' gradients before clipping (what
``clip_grad_norm_`` returns). Without clipping it is computed the same way (one reduction over
the network's small gradients), under fp16 divided by the loss scale; null when the gradients
were not finite (a skipped fp16 step).

A resumed run appends: records after the resumed step are dropped first (they belonged to the
interrupted future the resume replaces), so every step appears once. A fresh run starts the file
anew (an existing one is an output of an earlier run, refused without ``--force``). Either
happens at the session's first record, so a run that fails before it changes nothing.
Non-finite numbers are written as ``null``, so every line is strict JSON.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from loraforge.fileio import atomic_path
from loraforge.training.output_names import metrics_name

#: the record kinds loraforge writes itself (other code may add its own)
RUN, STEP, SAMPLE, VALIDATION = "run", "step", "sample", "validation"


def json_ready(value: Any) -> Any:
    """``value`` with non-finite floats as ``None`` and tuples as lists (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def peak_memory_bytes(device: Any) -> int | None:
    """The run's peak memory in bytes: ``torch.cuda.max_memory_allocated`` on a CUDA device
    (comparable with the VRAM estimate's tensor bytes); elsewhere the process's peak resident
    memory (``ru_maxrss``, which includes the Python process itself), or ``None`` where the
    platform does not tell."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return None
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, KiB


def peak_memory_kind(device: Any) -> str:
    """What :func:`peak_memory_bytes` measures on ``device``."""
    return "cuda_max_allocated" if getattr(device, "type", "cpu") == "cuda" else "process_peak_rss"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file, in order. A line that is not a JSON object (a run killed
    while writing its last line) is skipped.

    Raises:
        OSError: the file cannot be read.
    """
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def kept_on_resume(records: Iterable[dict[str, Any]], resume_step: int) -> list[dict[str, Any]]:
    """The records a run resumed at ``resume_step`` keeps: everything up to that step, except
    the starts of sessions at or after it (the resumed session writes its own)."""
    return [
        r
        for r in records
        if r["step"] < resume_step or (r["step"] == resume_step and r.get("kind") != RUN)
    ]


class MetricsLog:
    """Appends records to a run's metrics file (only the main process writes one).

    Args:
        path: the metrics file, or ``None`` for a log that writes nothing (other ranks).
        clock: seconds, for the step time (tests pass a fake one).
    """

    def __init__(self, path: Path | None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.path = path
        self.clock = clock
        self.mark = clock()
        self._session: dict[str, Any] | None = None  # the run record not written yet
        self._resumed_at: int | None = None

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def begin(self, start_step: int, *, resumed: bool, facts: Mapping[str, Any]) -> None:
        """Start a session. The file is touched at the session's first record: a fresh run then
        starts it anew, a resumed one drops the records after ``start_step``, and the ``run``
        record with ``facts`` comes first. A session that fails before recording anything (out
        of memory at the first step) leaves the file as it was."""
        if self.path is None:
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._session = {"kind": RUN, "step": start_step, "time": stamp, "resumed": resumed}
        self._session.update(facts)
        self._resumed_at = start_step if resumed else None
        self.restart_clock()

    def record(self, kind: str, step: int, **fields: Any) -> None:
        """Append one record ``{"kind": kind, "step": step, **fields}`` (e.g.
        ``record("validation", 200, validation_loss=0.093)``); non-finite floats become null."""
        if self.path is None:
            return
        if self._session is not None:
            self._start_file(self._session)
            self._session = None
        with self.path.open("a", encoding="utf-8") as f:
            f.write(_line({"kind": kind, "step": step, **fields}))

    def _start_file(self, session: Mapping[str, Any]) -> None:
        assert self.path is not None
        kept = []
        if self._resumed_at is not None and self.path.is_file():
            kept = kept_on_resume(read_metrics(self.path), self._resumed_at)
        with atomic_path(self.path, force=True) as tmp:
            tmp.write_text("".join(_line(r) for r in [*kept, session]), encoding="utf-8")

    def restart_clock(self) -> None:
        """The next step's time starts now (called after saving and sampling)."""
        self.mark = self.clock()

    def step(
        self,
        report: Any,
        *,
        grad_norm: Any = None,
        skipped: bool = False,
        device: Any = None,
    ) -> None:
        """Append the ``step`` record of one optimizer step.

        Args:
            report: the step's :class:`~loraforge.training.display.StepReport`.
            grad_norm: the pre-clip total gradient norm (a float or 0-dim tensor), or ``None``.
            skipped: fp16 scaling skipped the update.
            device: the training device, for the peak memory.
        """
        if self.path is None:
            return
        now = self.clock()
        seconds, self.mark = now - self.mark, now
        max_norm = report.max_norm
        self.record(
            STEP,
            report.step,
            epoch=report.epoch,
            loss=float(report.loss),
            average=float(report.average),
            lr={name: float(lr) for name, lr in report.lrs.items()},
            grad_norm=None if grad_norm is None else float(grad_norm),
            max_norm=None
            if max_norm is None
            else {
                "keys_scaled": int(max_norm.keys_scaled),
                "mean_norm": float(max_norm.mean_norm),
                "max_norm": float(max_norm.max_norm),
            },
            skipped=skipped,
            seconds=round(seconds, 6),
            peak_memory=peak_memory_bytes(device),
        )

    def samples(
        self, step: int, point: str, number: int, specs: Sequence[Any], files: Sequence[Path]
    ) -> None:
        """Append the ``sample`` record of one sampling point.

        Args:
            step: the global step the samples show.
            point: ``step`` or ``epoch``; ``number``: the step or epoch in the file names.
            specs: the prompts (:class:`~loraforge.training.settings.SampleSpec`), in order.
            files: the image written for each prompt (inside the output folder).
        """
        if self.path is None:
            return
        root = self.path.parent
        images = [
            {
                "file": Path(os.path.relpath(file, root)).as_posix(),
                "prompt": spec.prompt,
                "index": spec.index,
                "seed": spec.seed,
            }
            for spec, file in zip(specs, files, strict=True)
        ]
        self.record(SAMPLE, step, point=point, number=number, images=images)


def open_metrics(
    recipe: Any,
    data: Any,
    settings: Any,
    device: Any,
    *,
    start_step: int,
    resumed: bool,
    is_main: bool,
) -> MetricsLog:
    """The run's metrics log, its session begun (a log that writes nothing off the main
    process)."""
    if not is_main:
        return MetricsLog(None)
    log = MetricsLog(settings.output.dir / metrics_name(settings.output.name))
    log.begin(start_step, resumed=resumed, facts=session_facts(recipe, data, settings, device))
    return log


def session_facts(recipe: Any, data: Any, settings: Any, device: Any) -> dict[str, Any]:
    """What a ``run`` record says about a session: the resolved recipe, the device, the run's
    length, the bucket histogram and the analytic VRAM estimate (see the module docstring)."""
    from dataclasses import asdict

    from loraforge.data.report import bucket_report

    buckets = bucket_report(
        data.discovery,
        data.plan,
        batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.accumulation,
    )
    return {
        "name": settings.output.name,
        "recipe_file": recipe.source,
        "recipe": recipe.to_dict(),
        "device": str(device),
        "peak_memory_kind": peak_memory_kind(device),
        "length": asdict(settings.length),
        "buckets": buckets["buckets"],
        "totals": buckets["totals"],
        "vram_estimate": vram_estimate(recipe),
    }


def vram_estimate(recipe: Any) -> dict[str, Any]:
    """The analytic VRAM estimate ``check --vram`` prints, as a dict, or ``{"error": why}``."""
    from loraforge.vram import estimate_vram, vram_to_dict

    try:
        return vram_to_dict(estimate_vram(recipe))
    except Exception as e:  # the estimate is information: training goes on without it
        return {"error": f"{type(e).__name__}: {e}"}


def _line(record: Mapping[str, Any]) -> str:
    return json.dumps(json_ready(record), allow_nan=False, ensure_ascii=False) + "\n"
