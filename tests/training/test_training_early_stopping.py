"""The validation tracker: best loss, early stopping with min_delta, and its resumable state."""

from __future__ import annotations

import json
import math

from loraforge.training.early_stopping import ValidationTracker
from loraforge.training.state import recipe_fingerprint


def test_best_is_the_lowest_loss_and_early_stopping_counts_from_the_reference() -> None:
    tracker = ValidationTracker(min_delta=0.01, patience=3)
    assert tracker.metadata() == {}
    steps = [(100, 1.0), (200, 0.995), (300, 0.993), (400, 0.992), (500, 0.97)]
    new_best = [tracker.add(loss, step) for step, loss in steps[:4]]
    # every loss is a new best, but none beats the reference (1.0) by more than 0.01
    assert new_best == [True, True, True, True]
    assert tracker.best == 0.992 and tracker.best_step == 400
    assert tracker.since_improvement == 3 and tracker.should_stop
    # 0.97 < 1.0 - 0.01: an improvement resets the count and moves the reference
    fresh = ValidationTracker(min_delta=0.01, patience=5)
    for step, loss in steps:
        fresh.add(loss, step)
    assert fresh.reference == 0.97 and fresh.since_improvement == 0 and not fresh.should_stop
    assert fresh.metadata() == {"ss_validation_loss": "0.97", "ss_validation_step": "500"}


def test_a_non_finite_loss_is_never_best_and_counts_as_no_improvement() -> None:
    tracker = ValidationTracker(patience=None)
    tracker.add(0.5, 1)
    assert not tracker.add(math.nan, 2)
    assert tracker.best == 0.5 and tracker.since_improvement == 1
    assert not tracker.should_stop  # no patience: never stops


def test_the_state_round_trips_through_json_with_this_runs_settings() -> None:
    tracker = ValidationTracker(min_delta=0.1, patience=2)
    tracker.add(0.4, 10)
    tracker.add(0.45, 20)
    saved = json.loads(json.dumps(tracker.state()))
    assert "patience" not in saved and "min_delta" not in saved
    restored = ValidationTracker.restore(saved, min_delta=0.2, patience=4)
    assert restored.state() == tracker.state()
    assert (restored.min_delta, restored.patience) == (0.2, 4)
    assert ValidationTracker.restore(None, min_delta=0.0, patience=None).last is None


def test_resume_may_change_how_often_to_validate_but_not_what_is_held_out() -> None:
    recipe = {
        "dataset": {"validation_split": 0.1, "validation_seed": 0},
        "training": {
            "validate_every_n_steps": 100,
            "validate_every_n_epochs": None,
            "max_validation_steps": 4,
            "early_stopping": {"patience": 3, "min_delta": 0.0},
        },
        "output": {"keep_best": True},
    }
    fingerprint = recipe_fingerprint(recipe)
    assert set(fingerprint) == {
        "dataset.validation_split",
        "dataset.validation_seed",
        "training.max_validation_steps",
    }
