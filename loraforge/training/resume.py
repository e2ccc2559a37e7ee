"""``--resume``: find the state to continue from and put a freshly built run back into it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraforge.console import info
from loraforge.errors import TrainingError
from loraforge.training.output_names import last_state_name, list_numbered
from loraforge.training.settings import OutputSettings
from loraforge.training.state import (
    NETWORK_FILE,
    OPTIMIZER_FILE,
    SCHEDULER_FILE,
    STATE_JSON,
    TrainingProgress,
    check_recipe_compatible,
    load_training_state,
    read_state_document,
)

AUTO = "auto"


def resolve_resume(
    resume: str | Path | None,
    output: OutputSettings,
    recipe: Mapping[str, Any],
    *,
    max_train_steps: int | None = None,
) -> Path | None:
    """The state folder ``--resume`` names: a path, or ``auto`` for the latest state of the run.

    ``auto`` without any saved state starts a new run (and says so). The state is checked
    against ``recipe`` here, before anything heavy is loaded; with ``max_train_steps`` (the
    run's length), a state at or past the end is refused (raise the length to extend a run).

    Raises:
        TrainingError: a path that is not a state folder, a state of another recipe, an
            unreadable newest state (``auto``), or a state with no step left to train.
    """
    if resume is None:
        return None
    if str(resume) == AUTO:
        path = find_latest_state(output.dir, output.name)
        if path is None:
            info(
                f"--resume auto: no saved state of {output.name!r} in {output.dir}; "
                "starting a new run"
            )
            return None
    else:
        path = Path(resume)
        if not path.is_dir():
            raise TrainingError(
                f"--resume {resume}: no such state folder",
                hint=f"pass a folder like {output.dir}/{output.name}-state, or --resume auto",
            )
    document = read_state_document(path)
    check_recipe_compatible(document, recipe, path)
    step = int(document["progress"]["global_step"])
    if max_train_steps is not None and step >= max_train_steps:
        raise TrainingError(
            f"--resume: {path} is at step {step} and the recipe's run ends at step "
            f"{max_train_steps}: nothing is left to train",
            hint="to train longer, raise training.max_train_steps (or max_train_epochs) and "
            "resume again",
        )
    return path


def saved_step(state_dir: Path | None) -> int:
    """The global step a state folder was saved at (0 without one)."""
    if state_dir is None:
        return 0
    return int(read_state_document(state_dir)["progress"]["global_step"])


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues and the loop's own saved data."""

    progress: TrainingProgress
    extra: Mapping[str, Any] = field(default_factory=dict)


def restore_run(
    state_dir: Path | None,
    *,
    recipe: Mapping[str, Any],
    network: Any,
    optimizer: Any,
    scheduler: Any,
    scaler: Any | None,
    ema: Any = None,
) -> ResumePoint:
    """Load a state into the run's network, optimizer, scheduler, grad scaler and weight
    average (in place).

    Without ``state_dir``, the run starts at step 0.

    Raises:
        TrainingError: the state belongs to another recipe or does not fit the network.
    """
    if state_dir is None:
        return ResumePoint(TrainingProgress(0, 0, 0))
    resumed = load_training_state(
        state_dir, recipe=recipe, optimizer=optimizer, scheduler=scheduler
    )
    missing, unexpected = network.load_state_dict(resumed.network_state, strict=False)
    if missing or unexpected:
        raise TrainingError(
            f"{state_dir}: the saved network does not fit this run's network "
            f"({len(missing)} tensors missing, {len(unexpected)} unexpected)",
            hint="resume with the recipe that wrote this state",
        )
    if ema is not None:
        _restore_ema(ema, resumed.ema_state, state_dir)
    if scaler is not None and "scaler" in resumed.extra:
        scaler.load_state_dict(resumed.extra["scaler"])
    info(f"resuming from {state_dir} at step {resumed.progress.global_step}")
    return ResumePoint(resumed.progress, resumed.extra)


def _restore_ema(ema: Any, state: Any, state_dir: Path) -> None:
    if state is None:
        raise TrainingError(
            f"{state_dir} holds no weight average (training.ema was off when it was saved)",
            hint="resume with the recipe that wrote this state",
        )
    try:
        ema.load_state_dict(state)
    except ValueError as e:
        raise TrainingError(
            f"{state_dir}: {e}", hint="resume with the recipe that wrote this state"
        ) from e


def find_latest_state(output_dir: Path | str, name: str) -> Path | None:
    """The newest state folder of run ``name`` in ``output_dir``, if any.

    Looks at ``name-NNNNNN-state``, ``name-stepNNNNNNNN-state`` and ``name-state``; the newest
    readable one (highest global step) is returned.

    Raises:
        TrainingError: a state folder newer than that one cannot be read: resuming from the
            older one would quietly train again from an earlier step. The message names both
            and how to choose.
    """
    output_dir = Path(output_dir)
    candidates = [path for _, path in list_numbered(output_dir, name, "epoch", states=True)]
    candidates += [path for _, path in list_numbered(output_dir, name, "step", states=True)]
    last = output_dir / last_state_name(name)
    if last.is_dir():
        candidates.append(last)
    readable: list[tuple[int, float, Path]] = []
    broken: list[tuple[float, Path, str]] = []
    for path in candidates:
        mtime = path.stat().st_mtime
        try:
            step = int(read_state_document(path)["progress"]["global_step"])
            missing = [f for f in _STATE_FILES if not (path / f).is_file()]
            if missing:
                raise TrainingError(f"{path}: {', '.join(missing)} missing")
        except (TrainingError, KeyError, TypeError, ValueError) as e:
            broken.append((mtime, path, str(e).split("\n")[0]))
            continue
        readable.append((step, mtime, path))
    best = max(readable, default=None)
    newer = [b for b in broken if best is None or b[0] >= best[1]]
    if newer:
        _, path, why = max(newer)
        fallback = (
            f"the newest readable state is {best[2]} (step {best[0]}); to continue from it, "
            f"pass --resume {best[2]}"
            if best is not None
            else "no other state of this run is readable"
        )
        raise TrainingError(
            f"--resume auto: the newest state {path} cannot be read ({why}); {fallback}",
            hint="or move the broken state away, or start a new run with --force",
        )
    return None if best is None else best[2]


_STATE_FILES = (STATE_JSON, NETWORK_FILE, OPTIMIZER_FILE, SCHEDULER_FILE)
