"""Resume equals uninterrupted: an interrupted run, resumed, ends with bit-identical weights.

The run crosses an epoch boundary, accumulates gradients over two batches, trains the text
encoder, uses network and rank dropout, caption shuffling, flips and a data-loader worker, and
keeps a weight average (EMA, saved files hold it): everything random must replay exactly after
a resume, and the average must continue exactly. A third of the images are held out for a
validation loss every two steps, with the best file and early stopping (patient enough not to
stop): the validation history, the best file and the files' validation metadata must replay
too. The interruption goes through the same path as Ctrl-C (the stop
flag is raised and the loop saves ``<name>-state``); a real SIGINT is tested in the CLI tests.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraforge.console import err
from loraforge.recipe import load_recipe
from loraforge.training.display import TrainingDisplay
from loraforge.training.loop import StopFlag, train
from loraforge.training.run import ctrl_c_stops, run_training
from loraforge.training.setup import setup_run

OVERRIDES = {
    "dataset": {
        "num_workers": 1,
        "validation_split": 0.34,
        "subsets": [{"shuffle_caption": True, "flip_aug": True}],
    },
    "network": {"dropout": 0.1, "rank_dropout": 0.1},
    "training": {
        "max_train_steps": 7,
        "gradient_accumulation_steps": 2,
        "text_encoder_lr": 5e-4,
        "learning_rate": 2e-3,
        "lr_scheduler": "cosine",
        "ema": {"decay": 0.9, "start_step": 2, "save_raw": True},
        "validate_every_n_steps": 2,
        "max_validation_steps": 1,
        "early_stopping": {"patience": 50},
    },
    "output": {"save_state": True, "save_every_n_steps": 5, "keep_best": True},
}


class StopAtStep(StopFlag):
    """Raises the stop flag when the loop asks at its ``step``-th optimizer step."""

    def __init__(self, step: int) -> None:
        self.asked = 0
        self.step = step

    @property
    def requested(self) -> bool:  # type: ignore[override]
        self.asked += 1
        return self.asked >= self.step


def _quiet(run) -> TrainingDisplay:
    length = run.settings.length
    return TrainingDisplay(
        err, total_steps=length.max_train_steps, num_epochs=length.num_epochs,
        start_step=run.start.global_step, device=run.device, enabled=False,
    )  # fmt: skip


def _final_network(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "t-state" / "network.safetensors"))


def _final_ema(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "t-state" / "ema.safetensors"))


def _validation_state(state: Path) -> dict:
    import json

    return json.loads((state / "state.json").read_text())["extra"]["validation"]


def _validation_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return {k: v for k, v in meta.items() if "validation" in k}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, make_recipe) -> Path:
    """The uninterrupted run's output folder."""
    folder = tmp_path_factory.mktemp("reference")
    result = run_training(load_recipe(make_recipe(folder, OVERRIDES, out=folder / "ref")))
    assert result.progress.global_step == 7 and result.progress.epoch == 2
    return folder / "ref"


def test_stop_mid_epoch_then_resume_auto_equals_uninterrupted(
    reference, write_recipe, tmp_path
) -> None:
    cut_out = tmp_path / "cut"
    recipe = load_recipe(write_recipe(OVERRIDES, name="cut.yaml", out=cut_out))
    run = setup_run(recipe)
    stopped = train(run, _quiet(run), StopAtStep(3))
    assert stopped.interrupted and stopped.progress.global_step == 3
    assert stopped.progress.step_in_epoch == 6  # mid-epoch: 3 steps x 2 batches
    assert stopped.final_path == cut_out / "t-state"
    assert not (cut_out / "t.safetensors").exists()

    assert (cut_out / "t-state" / "ema.safetensors").is_file()

    resumed = run_training(recipe, resume="auto")
    assert not resumed.interrupted and resumed.progress.global_step == 7
    _assert_same(_final_network(reference), _final_network(cut_out))
    _assert_same(_final_ema(reference), _final_ema(cut_out))
    # the files (the EMA weights, and the raw ones beside them), and the step-5 checkpoint
    # written after the resume, equal the reference's
    for name in ("t", "t-raw", "t-step00000005", "t-step00000005-raw"):
        _assert_same(
            load_file(str(reference / f"{name}.safetensors")),
            load_file(str(cut_out / f"{name}.safetensors")),
        )
    # the validation history (best, early-stopping count) and the best file replay exactly
    assert _validation_state(cut_out / "t-state") == _validation_state(reference / "t-state")
    assert _validation_state(reference / "t-state")["last_step"] == 7
    _assert_same(
        load_file(str(reference / "t-best.safetensors")),
        load_file(str(cut_out / "t-best.safetensors")),
    )
    for name in ("t-best.safetensors", "t.safetensors", "t-step00000005.safetensors"):
        assert _validation_metadata(reference / name) == _validation_metadata(cut_out / name)


def test_resume_from_a_numbered_state_in_the_second_epoch(
    reference, write_recipe, tmp_path
) -> None:
    cut_out = tmp_path / "cut"
    cut_out.mkdir()
    shutil.copytree(reference / "t-step00000005-state", cut_out / "t-step00000005-state")
    recipe = load_recipe(write_recipe(OVERRIDES, name="cut.yaml", out=cut_out))
    result = run_training(recipe, resume=str(cut_out / "t-step00000005-state"))
    assert result.progress.global_step == 7
    _assert_same(_final_network(reference), _final_network(cut_out))
    _assert_same(_final_ema(reference), _final_ema(cut_out))


def test_resume_refuses_a_state_of_another_recipe(reference, write_recipe) -> None:
    from loraforge.errors import TrainingError

    changed = {**OVERRIDES, "network": {"dim": 8, "alpha": 8}}
    recipe = load_recipe(write_recipe(changed, out=reference))
    with pytest.raises(TrainingError, match=r"network\.dim"):
        run_training(recipe, resume=str(reference / "t-step00000005-state"))


def test_ctrl_c_handler_sets_the_flag_then_aborts_on_the_second() -> None:
    flag = StopFlag()
    with ctrl_c_stops(flag):
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def _state_step(folder: Path) -> int:
    import json

    return json.loads((folder / "state.json").read_text())["progress"]["global_step"]


def test_resume_to_the_end_updates_the_state_and_a_finished_run_can_be_extended(
    write_recipe, tmp_path
) -> None:
    """Issue 16: after Ctrl-C and a resumed run to the end, `t-state` still said the Ctrl-C step
    and `--resume auto` then advised `--resume auto`; extending a finished run was refused."""
    from loraforge.errors import TrainingError

    overrides = {**OVERRIDES, "output": {"save_state": False, "save_every_n_steps": 5}}
    out = tmp_path / "out"
    recipe = load_recipe(write_recipe(overrides, name="r.yaml", out=out))
    run = setup_run(recipe)
    assert train(run, _quiet(run), StopAtStep(3)).interrupted
    assert _state_step(out / "t-state") == 3

    assert run_training(recipe, resume="auto").progress.global_step == 7
    assert _state_step(out / "t-state") == 7  # the state says where the run ended

    with pytest.raises(TrainingError, match="nothing is left to train") as info:
        run_training(recipe, resume="auto")
    assert "--resume auto" not in (info.value.hint or "") and "max_train_steps" in info.value.hint

    longer = {**overrides, "training": {**overrides["training"], "max_train_steps": 9}}
    extended = load_recipe(write_recipe(longer, name="r.yaml", out=out))
    result = run_training(extended, resume="auto")  # no --force: the outputs are its own
    assert result.progress.global_step == 9 and _state_step(out / "t-state") == 9

    changed = {**longer, "network": {**longer["network"], "dim": 8, "alpha": 8}}
    with pytest.raises(TrainingError, match=r"network\.dim"):
        run_training(load_recipe(write_recipe(changed, name="r.yaml", out=out)), resume="auto")


def test_resume_after_a_kill_owns_the_outputs_and_removes_half_written_saves(
    reference, write_recipe, tmp_path
) -> None:
    """Issue 17: after a SIGKILL the resume was refused as overwriting outputs (advising the
    command just run) and `.NAME-state.*.tmp` folders were never cleaned."""
    killed = tmp_path / "killed"
    shutil.copytree(reference, killed)
    shutil.rmtree(killed / "t-state")  # killed before the end...
    half = killed / ".t-state.k2j4h5.tmp"  # ...while writing the final state
    half.mkdir()
    (half / "network.safetensors").write_bytes(b"half")
    recipe = load_recipe(write_recipe(OVERRIDES, name="k.yaml", out=killed))
    result = run_training(recipe, resume="auto")  # no --force needed
    assert result.progress.global_step == 7 and not half.exists()
    _assert_same(_final_network(reference), _final_network(killed))


def test_a_second_run_on_the_same_output_folder_is_refused(write_recipe, tmp_path) -> None:
    """Issue 17: two runs in one project wrote the same output/NAME.safetensors."""
    import json
    import socket

    from loraforge.errors import TrainingError
    from loraforge.training.lock import LOCK_NAME

    out = tmp_path / "out"
    out.mkdir()
    lock = out / LOCK_NAME
    alive = {"pid": os.getppid(), "host": socket.gethostname(), "started": 0}
    lock.write_text(json.dumps(alive))
    recipe = load_recipe(write_recipe(OVERRIDES, name="l.yaml", out=out))
    with pytest.raises(TrainingError, match="in use by another training run") as info:
        run_training(recipe)
    assert str(lock) in info.value.hint
    assert not (out / "t.safetensors").exists()
