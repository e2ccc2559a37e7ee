"""Resumable training state: save to a folder atomically, load it back with compatibility checks.

A state folder (named by :mod:`loraforge.training.output_names`, e.g. ``lora-step00000100-state``)
holds:

- ``state.json``: format version, progress (global step, epoch, position in the epoch), the
  recipe fingerprint and its hash, and loop-defined ``extra`` data;
- ``network.safetensors``: the trainable network weights;
- ``ema.safetensors``: the average of the weights, float32 (only with ``training.ema``);
- ``optimizer.pt`` and ``scheduler.pt``: their ``state_dict()``, read back with
  ``torch.load(weights_only=True)`` (no arbitrary unpickling).

No random-generator states are saved: every batch re-seeds its generators from where it is in
the run (:func:`loraforge.training.step.batch_seed`), and every sample's augmentation from its own
seed, so a resumed run draws what the uninterrupted one would (the resume tests are bit-exact).
States written by earlier versions carry an ``rng`` entry and ``rng.safetensors``; both are
ignored.

The folder is written under a temporary name and renamed into place, so an interrupted save
never leaves a half-written state under the real name.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from loraforge import __version__
from loraforge.errors import TrainingError
from loraforge.fileio import atomic_folder

STATE_FORMAT = 1
STATE_JSON = "state.json"
NETWORK_FILE = "network.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
EMA_FILE = "ema.safetensors"

# Recipe fields that may change between an interruption and the resume without changing what
# is trained: where and how often files are written, sampling, logging, tagging, loader workers,
# how often the validation loss is computed and what it decides (the held-out images and
# max_validation_steps must match: they define the validation loss the state's best refers to).
RESUME_IGNORED_FIELDS: tuple[str, ...] = (
    "sample",
    "logging",
    "tagging",
    "output.dir",
    "output.save_every_n_epochs",
    "output.save_every_n_steps",
    "output.save_last_n",
    "output.save_precision",
    "output.save_state",
    "output.metadata",
    "output.keep_best",
    "training.validate_every_n_steps",
    "training.validate_every_n_epochs",
    "training.early_stopping",
    "dataset.num_workers",
    "cache.dir",
    "cache.vae_batch_size",
    "training.ema.device",
    "training.ema.save_raw",
)


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


@dataclass(frozen=True)
class TrainingProgress:
    """Where training stands.

    Attributes:
        global_step: optimizer steps done.
        epoch: 0-based index of the epoch in progress (equal to the number of finished epochs
            when ``step_in_epoch`` is 0).
        step_in_epoch: batches of ``epoch`` already consumed (the data loader position).
    """

    global_step: int
    epoch: int
    step_in_epoch: int = 0


@dataclass(frozen=True)
class LoadedState:
    """What :func:`load_training_state` gives back (optimizer and scheduler are restored
    in place).

    Attributes:
        path: the state folder.
        progress: where to continue.
        network_state: trainable weights to load into the network.
        extra: the loop's own JSON data saved with the state.
        ema_state: the weight average (``training.ema``), or ``None`` when none was saved.
    """

    path: Path
    progress: TrainingProgress
    network_state: dict[str, torch.Tensor]
    extra: dict[str, Any] = field(default_factory=dict)
    ema_state: dict[str, torch.Tensor] | None = None


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def recipe_fingerprint(
    recipe: Mapping[str, Any], ignore: tuple[str, ...] = RESUME_IGNORED_FIELDS
) -> dict[str, Any]:
    """The recipe's fields that must match for a resume, flattened to dotted keys.

    Args:
        recipe: the resolved recipe (``Recipe.to_dict()``).
        ignore: dotted fields or sections left out (default :data:`RESUME_IGNORED_FIELDS`).
    """
    flat = _flatten(recipe)
    return {
        key: value
        for key, value in flat.items()
        if not any(key == skip or key.startswith(f"{skip}.") for skip in ignore)
    }


def recipe_hash(fingerprint: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the fingerprint as canonical JSON."""
    text = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def save_training_state(
    directory: Path | str,
    *,
    network_state: Mapping[str, torch.Tensor],
    optimizer: Stateful,
    scheduler: Stateful,
    progress: TrainingProgress,
    recipe: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    ema_state: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write a resumable state folder atomically (an existing one is replaced).

    Args:
        directory: the state folder, e.g. ``output/lora-step00000100-state``.
        network_state: the trainable weights (any device; saved as CPU tensors).
        optimizer, scheduler: anything with ``state_dict()`` (accelerate wrappers too).
        progress: where training stands.
        recipe: the resolved recipe (``Recipe.to_dict()``).
        extra: JSON-serialisable loop data (sampler state, loss history...).
        ema_state: the weight average, saved as it is (float32), or ``None``.

    Returns:
        The state folder path.
    """
    directory = Path(directory)
    fingerprint = recipe_fingerprint(recipe)
    document = {
        "format": STATE_FORMAT,
        "loraforge_version": __version__,
        "progress": asdict(progress),
        "recipe_hash": recipe_hash(fingerprint),
        "recipe": fingerprint,
        "extra": dict(extra or {}),
    }
    from safetensors.torch import save_file

    def on_cpu(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.detach().cpu().contiguous().clone() for key, value in tensors.items()}

    with atomic_folder(directory, force=True) as tmp:
        save_file(on_cpu(network_state), str(tmp / NETWORK_FILE))
        if ema_state is not None:
            save_file(on_cpu(ema_state), str(tmp / EMA_FILE))
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        text = json.dumps(document, indent=1, default=str)
        (tmp / STATE_JSON).write_text(text, encoding="utf-8")
    return directory


def read_state_document(directory: Path | str) -> dict[str, Any]:
    """The parsed ``state.json`` of a state folder.

    Raises:
        TrainingError: not a loraforge state folder, or a newer/unknown format.
    """
    directory = Path(directory)
    path = directory / STATE_JSON
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise TrainingError(
            f"{directory} is not a loraforge training state (no {STATE_JSON})",
            hint="pass a folder named like <name>-step00000100-state written with save_state",
        ) from e
    except (OSError, json.JSONDecodeError) as e:
        raise TrainingError(f"cannot read {path}: {e}", hint="the state is damaged") from e
    if document.get("format") != STATE_FORMAT:
        raise TrainingError(
            f"{directory}: state format {document.get('format')!r} is not supported "
            f"(this loraforge reads format {STATE_FORMAT})",
            hint="resume with the loraforge version that wrote it, or start a new run",
        )
    return document


def _describe_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    missing = "<unset>"
    return [
        f"{key}: {saved.get(key, missing)!r} -> {current.get(key, missing)!r}"
        for key in keys
        if saved.get(key, missing) != current.get(key, missing)
    ]


#: fields a resume may change: a finished (or interrupted) run is extended by raising them
LENGTH_FIELDS = ("training.max_train_steps", "training.max_train_epochs")


def check_recipe_compatible(
    document: Mapping[str, Any], recipe: Mapping[str, Any], where: Path
) -> None:
    """Raise :class:`TrainingError` naming the changed fields when the recipe differs from the
    one that wrote the state (fields in :data:`RESUME_IGNORED_FIELDS` may differ, and the run's
    length, :data:`LENGTH_FIELDS`, may change: the caller checks that steps are left)."""
    fingerprint = recipe_fingerprint(recipe)
    if recipe_hash(fingerprint) == document.get("recipe_hash"):
        return
    # JSON round-trips tuples as lists; compare in that form.
    current = json.loads(json.dumps(fingerprint, default=str))
    saved = {k: v for k, v in document.get("recipe", {}).items() if k not in LENGTH_FIELDS}
    changes = _describe_changes(saved, {k: v for k, v in current.items() if k not in LENGTH_FIELDS})
    if not changes and document.get("recipe"):
        return
    shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
    raise TrainingError(
        f"{where} was written by a different recipe: {shown or 'the recipe hash differs'}",
        hint="resume with the recipe that wrote this state (only training.max_train_steps or "
        "max_train_epochs may change, to train longer), or start a new run without --resume",
    )


def _torch_load(path: Path) -> Any:
    from loraforge.models.pickles import load_weights_only

    return load_weights_only(path, TrainingError, hint="the state is damaged")


def load_training_state(
    directory: Path | str,
    *,
    recipe: Mapping[str, Any],
    optimizer: Stateful,
    scheduler: Stateful,
) -> LoadedState:
    """Check a state folder against the recipe and restore the optimizer and scheduler.

    Args:
        directory: a folder written by :func:`save_training_state`.
        recipe: the resolved recipe of this run (``Recipe.to_dict()``).
        optimizer, scheduler: built exactly as in the run that saved; restored in place.

    Returns:
        Progress, the network weights to load, and the loop's extra data.

    Raises:
        TrainingError: not a state folder, unsupported format, a different recipe (naming the
            changed fields), or an optimizer/scheduler that does not match the saved one.
    """
    directory = Path(directory)
    document = read_state_document(directory)
    check_recipe_compatible(document, recipe, directory)
    from safetensors.torch import load_file

    network_state = load_file(str(directory / NETWORK_FILE))
    for label, target, filename in (
        ("optimizer", optimizer, OPTIMIZER_FILE),
        ("scheduler", scheduler, SCHEDULER_FILE),
    ):
        try:
            target.load_state_dict(_torch_load(directory / filename))
        except (ValueError, KeyError, RuntimeError) as e:
            raise TrainingError(
                f"{directory}: the saved {label} state does not fit this run's {label}: {e}",
                hint="resume with the same network and optimizer settings that wrote the state",
            ) from e
    progress = TrainingProgress(**document["progress"])
    ema_path = directory / EMA_FILE
    ema_state = load_file(str(ema_path)) if ema_path.is_file() else None
    extra = dict(document.get("extra", {}))
    return LoadedState(directory, progress, network_state, extra, ema_state)
