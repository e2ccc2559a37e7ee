"""Resumable state: exact resume, atomic writes, compatibility checks; checkpoint names/rotation."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from loraforge.errors import TrainingError
from loraforge.training import output_names as ck
from loraforge.training.optim import build_optimizer
from loraforge.training.resume import find_latest_state
from loraforge.training.schedulers import build_scheduler
from loraforge.training.state import (
    TrainingProgress,
    load_training_state,
    read_state_document,
    recipe_fingerprint,
    save_training_state,
)

RECIPE = {
    "training": {"learning_rate": 1e-2, "optimizer": "AdamW", "optimizer_args": {}},
    "network": {"dim": 4, "block_dims": None},
    "dataset": {"num_workers": 2, "resolution": (512, 512)},
    "sample": {"steps": 20},
    "output": {"dir": "/a", "name": "lora", "save_last_n": None},
}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build(init_seed: int):
    torch.manual_seed(init_seed)
    model = torch.nn.Linear(4, 3)
    optimizer = build_optimizer("AdamW", model.parameters(), lr=1e-2)
    scheduler = build_scheduler("cosine", optimizer, 10, 2)
    generator = torch.Generator().manual_seed(123)
    return model, optimizer, scheduler, generator


def train(model, optimizer, scheduler, generator, steps: int, start: int = 0) -> None:
    """Uses every RNG a loop may touch -- a generator, torch's global RNG, Python's and NumPy's --
    re-seeded for every step from where it is in the run, as ``training.step`` seeds a batch; so a
    state needs no saved RNG states to resume exactly."""
    for step in range(start, start + steps):
        seed_everything(1000 + step)
        generator.manual_seed(2000 + step)
        x = torch.randn(5, 4, generator=generator)
        target = torch.randn(5, 3)
        jitter = 1.0 + random.random() + float(np.random.rand())
        loss = ((model(x) - target) ** 2).mean() * jitter
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    seed_everything(0)
    model, optimizer, scheduler, generator = build(1)
    train(model, optimizer, scheduler, generator, 6)
    uninterrupted = {k: v.clone() for k, v in model.state_dict().items()}

    seed_everything(0)
    model, optimizer, scheduler, generator = build(1)
    train(model, optimizer, scheduler, generator, 3)
    path = save_training_state(
        tmp_path / ck.step_state_name("lora", 3),
        network_state=model.state_dict(),
        optimizer=optimizer,
        scheduler=scheduler,
        progress=TrainingProgress(global_step=3, epoch=1, step_in_epoch=1),
        recipe=RECIPE,
        extra={"loss_history": [0.5, 0.4]},
    )
    seed_everything(999)  # a new process: different RNGs and a different initialisation
    model, optimizer, scheduler, generator = build(2)
    resumed = load_training_state(
        path,
        recipe=RECIPE,
        optimizer=optimizer,
        scheduler=scheduler,
    )
    model.load_state_dict(resumed.network_state)
    assert resumed.progress == TrainingProgress(3, 1, 1)
    assert resumed.extra == {"loss_history": [0.5, 0.4]}
    train(model, optimizer, scheduler, generator, 3, start=3)
    for key, value in model.state_dict().items():
        assert torch.equal(value, uninterrupted[key]), key


def save_small(directory, recipe=RECIPE, step=1, optimizer=None, scheduler=None):
    model, opt, sched, _ = build(0)
    return save_training_state(
        directory,
        network_state=model.state_dict(),
        optimizer=optimizer or opt,
        scheduler=scheduler or sched,
        progress=TrainingProgress(step, 0, step),
        recipe=recipe,
    )


def test_state_folder_layout_and_document(tmp_path):
    path = save_small(tmp_path / "lora-step00000001-state")
    assert sorted(p.name for p in path.iterdir()) == [
        "network.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "state.json",
    ]
    document = read_state_document(path)
    assert document["format"] == 1 and document["progress"]["global_step"] == 1
    assert "sample.steps" not in document["recipe"] and "output.dir" not in document["recipe"]
    assert document["recipe"]["training.learning_rate"] == 1e-2
    assert [p.name for p in tmp_path.iterdir()] == ["lora-step00000001-state"]


def test_a_changed_recipe_is_refused_naming_the_field(tmp_path):
    path = save_small(tmp_path / "s")
    changed = json.loads(json.dumps(RECIPE))
    changed["training"]["learning_rate"] = 2e-2
    _, optimizer, scheduler, _ = build(0)
    with pytest.raises(TrainingError, match=r"training\.learning_rate: 0\.01 -> 0\.02") as info:
        load_training_state(path, recipe=changed, optimizer=optimizer, scheduler=scheduler)
    assert "without --resume" in str(info.value)


def test_ignored_fields_may_change_between_save_and_resume(tmp_path):
    path = save_small(tmp_path / "s")
    changed = json.loads(json.dumps(RECIPE))  # tuples became lists: still the same recipe
    changed["sample"]["steps"] = 30
    changed["output"]["dir"] = "/elsewhere"
    changed["dataset"]["num_workers"] = 8
    _, optimizer, scheduler, _ = build(0)
    load_training_state(path, recipe=changed, optimizer=optimizer, scheduler=scheduler)
    assert "dataset.resolution" in recipe_fingerprint(changed)


def test_a_different_optimizer_layout_is_a_training_error(tmp_path):
    path = save_small(tmp_path / "s")
    other = torch.nn.Linear(4, 3)
    extra = torch.nn.Parameter(torch.zeros(2))
    optimizer = build_optimizer("AdamW", [*other.parameters(), extra], lr=1e-2)
    scheduler = build_scheduler("cosine", optimizer, 10, 2)
    with pytest.raises(TrainingError, match="optimizer state does not fit"):
        load_training_state(path, recipe=RECIPE, optimizer=optimizer, scheduler=scheduler)


def test_not_a_state_folder_and_unknown_format(tmp_path):
    with pytest.raises(TrainingError, match="not a loraforge training state"):
        read_state_document(tmp_path)
    path = save_small(tmp_path / "s")
    document = json.loads((path / "state.json").read_text())
    document["format"] = 99
    (path / "state.json").write_text(json.dumps(document))
    with pytest.raises(TrainingError, match="format 99"):
        read_state_document(path)


def test_saving_over_an_existing_state_replaces_it(tmp_path):
    save_small(tmp_path / "lora-state", step=1)
    save_small(tmp_path / "lora-state", step=2)
    assert read_state_document(tmp_path / "lora-state")["progress"]["global_step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["lora-state"]


def test_a_failed_save_keeps_the_old_state_and_leaves_no_temporary(tmp_path):
    save_small(tmp_path / "lora-state", step=1)

    class Broken:
        def state_dict(self):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_small(tmp_path / "lora-state", step=2, scheduler=Broken())
    assert read_state_document(tmp_path / "lora-state")["progress"]["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["lora-state"]


def test_find_latest_state_by_global_step(tmp_path):
    assert find_latest_state(tmp_path / "missing", "lora") is None
    save_small(tmp_path / ck.epoch_state_name("lora", 2), step=40)
    save_small(tmp_path / ck.step_state_name("lora", 50), step=50)
    save_small(tmp_path / ck.step_state_name("lora-v2", 90), step=90)  # another run
    assert find_latest_state(tmp_path, "lora") == tmp_path / "lora-step00000050-state"
    # Issue 12: an unreadable state newer than the best readable one is not skipped quietly
    # (that would train again from an older step): the error names both and how to choose.
    broken = tmp_path / ck.step_state_name("lora", 70)
    broken.mkdir()
    with pytest.raises(TrainingError) as info:
        find_latest_state(tmp_path, "lora")
    message = str(info.value)
    assert f"the newest state {broken} cannot be read" in message
    assert f"--resume {tmp_path / 'lora-step00000050-state'}" in message
    os.utime(broken, (1, 1))  # an old broken state does not stand in the way
    assert find_latest_state(tmp_path, "lora") == tmp_path / "lora-step00000050-state"
    save_small(tmp_path / ck.last_state_name("lora"), step=60)
    assert find_latest_state(tmp_path, "lora") == tmp_path / "lora-state"
    (tmp_path / "lora-state" / "optimizer.pt").unlink()  # a state with a file missing
    with pytest.raises(TrainingError, match=r"optimizer\.pt missing"):
        find_latest_state(tmp_path, "lora")


def test_checkpoint_names_match_sd_scripts():
    assert ck.epoch_ckpt_name("lora", 4) == "lora-000004.safetensors"
    assert ck.step_ckpt_name("lora", 100) == "lora-step00000100.safetensors"
    assert ck.last_ckpt_name("lora") == "lora.safetensors"
    assert ck.epoch_state_name("lora", 4) == "lora-000004-state"
    assert ck.step_state_name("lora", 100) == "lora-step00000100-state"
    assert ck.last_state_name("lora") == "lora-state"


def test_rotation_keeps_the_newest_n_of_each_kind_and_nothing_else(tmp_path):
    names = [
        *(ck.epoch_ckpt_name("lora", e) for e in (1, 2, 3, 10)),
        *(ck.step_ckpt_name("lora", s) for s in (100, 200, 300)),
        "lora.safetensors",
        "lora-v2-000001.safetensors",
        "lora-000001.safetensors.tmp",
        "notes.txt",
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = ck.rotate(tmp_path, "lora", "epoch", keep_last=2)
    assert sorted(p.name for p in removed) == ["lora-000001.safetensors", "lora-000002.safetensors"]
    removed = ck.rotate(tmp_path, "lora", "step", keep_last=1)
    assert sorted(p.name for p in removed) == [
        "lora-step00000100.safetensors",
        "lora-step00000200.safetensors",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [
            "lora-000003.safetensors",
            "lora-000010.safetensors",
            "lora-step00000300.safetensors",
            "lora.safetensors",
            "lora-v2-000001.safetensors",
            "lora-000001.safetensors.tmp",
            "notes.txt",
        ]
    )
    assert ck.rotate(tmp_path, "lora", "epoch", keep_last=None) == []
    with pytest.raises(ValueError):
        ck.rotate(tmp_path, "lora", "epoch", keep_last=0)


def test_state_folder_rotation(tmp_path):
    for step in (10, 20, 30):
        (tmp_path / ck.step_state_name("lora", step)).mkdir()
        (tmp_path / ck.step_state_name("lora", step) / "state.json").write_text("{}")
    (tmp_path / "lora-state").mkdir()
    removed = ck.rotate(tmp_path, "lora", "step", keep_last=2, states=True)
    assert [p.name for p in removed] == ["lora-step00000010-state"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "lora-state",
        "lora-step00000020-state",
        "lora-step00000030-state",
    ]


def test_a_state_save_on_a_full_disk_is_one_clear_error_and_keeps_the_old_state(
    tmp_path, monkeypatch
) -> None:
    """Issue 17: torch.save reports a full disk as a RuntimeError without the path."""
    import torch

    from loraforge.errors import OutputWriteError
    from loraforge.training.state import TrainingProgress, save_training_state

    net = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    kwargs = {
        "network_state": net.state_dict(),
        "optimizer": optimizer,
        "scheduler": scheduler,
        "recipe": {"a": 1},
    }
    folder = tmp_path / "t-state"
    save_training_state(folder, progress=TrainingProgress(1, 0, 1), **kwargs)

    def full(*args, **kw):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(
        "loraforge.fileio.shutil.disk_usage", lambda _p: type("U", (), {"free": 1024})()
    )
    with pytest.raises(OutputWriteError, match=r"cannot write .*t-state: .*1\.0 KiB free"):
        save_training_state(folder, progress=TrainingProgress(2, 0, 2), **kwargs)
    assert json.loads((folder / "state.json").read_text())["progress"]["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["t-state"]  # no temporary folder left


def test_the_output_folder_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    import socket
    import subprocess
    import sys

    from loraforge.training.lock import LOCK_NAME, hold_output_folder

    lock = tmp_path / LOCK_NAME
    with hold_output_folder(tmp_path, "t"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with (
            pytest.raises(TrainingError, match=f"process {os.getpid()} on"),
            hold_output_folder(tmp_path, "t"),
        ):
            pass
    assert not lock.exists()  # released
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    (tmp_path / ".t-step00000010-state.abcd1234.tmp").mkdir()
    (tmp_path / ".t.safetensors.x1y2z3.tmp").write_bytes(b"half")
    (tmp_path / ".other.safetensors.q.tmp").write_bytes(b"another run's")
    with hold_output_folder(tmp_path, "t"):  # a stale lock: its process has ended
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            ".loraforge.lock",
            ".other.safetensors.q.tmp",
        ]
    lock.write_text(json.dumps({"pid": 1, "host": "another-machine"}))
    with pytest.raises(TrainingError, match="another-machine"), hold_output_folder(tmp_path, "t"):
        pass


def test_a_nan_loss_says_what_was_saved_and_names_a_recipe_value_as_the_cause(tmp_path):
    """Issue 17: the message advised --resume when nothing was saved and blamed the learning
    rate when a recipe value (network.alpha) was the cause."""
    from loraforge.recipe import parse_recipe_text
    from loraforge.training.divergence import divergence_error, suspect_values

    base = "model: {base: a/b}\ndataset: {subsets: [{dir: d}]}\n"
    recipe = parse_recipe_text(base + "network: {dim: 4, alpha: 4000}\n", base_dir=tmp_path)
    suspects = suspect_values(recipe)
    assert len(suspects) == 1 and suspects[0].startswith("network.alpha 4000 is 1000x network.dim")
    error = divergence_error(float("nan"), 5, saved_lora=None, saved_state=None, suspects=suspects)
    assert "nothing was saved yet" in error.message and "--resume" not in str(error)
    assert "network.alpha" in error.hint and "learning rate" not in error.hint
    state = tmp_path / "t-step00000004-state"
    error = divergence_error(
        float("inf"), 5, saved_lora=tmp_path / "t.safetensors", saved_state=state, suspects=()
    )
    assert f"resumable state {state}" in error.message and "learning rate" in error.hint
    first = divergence_error(float("nan"), 1, saved_lora=None, saved_state=None, suspects=())
    assert "not the cause" in first.hint  # no update happened yet
    assert suspect_values(parse_recipe_text(base, base_dir=tmp_path)) == ()
    fast = parse_recipe_text(base + "training: {learning_rate: 0.5}\n", base_dir=tmp_path)
    assert [s.split(" ")[0] for s in suspect_values(fast)] == ["training.learning_rate"]
