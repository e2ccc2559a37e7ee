"""`loraforge train` at the CLI boundary: --dry-run, --force, a NaN loss, bad --resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from loraforge.cli import run


def cli(*args: str) -> int:
    return run(list(args))


def stderr_of(capsys) -> str:
    """stderr with the console's line wrapping undone."""
    return " ".join(capsys.readouterr().err.split())


def _lora_parameter_count(model_dir: Path, dim: int) -> int:
    """dim * (in + out) for every layer sd-scripts adapts, counted on the diffusers models."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
    total = 0
    for model, classes in (
        (unet, ("Transformer2DModel",)),
        (encoder, ("CLIPAttention", "CLIPMLP")),
    ):
        for module in model.modules():
            if type(module).__name__ not in classes:
                continue
            for child in module.modules():
                if isinstance(child, nn.Linear):
                    total += dim * (child.in_features + child.out_features)
                elif isinstance(child, nn.Conv2d) and child.kernel_size == (1, 1):
                    total += dim * (child.in_channels + child.out_channels)
    return total


def test_dry_run_json_resolves_everything_and_writes_nothing(
    write_recipe, tmp_path, tiny_sd1_dir, capsys
) -> None:
    recipe = write_recipe(
        {
            "training": {
                "max_train_steps": None,
                "max_train_epochs": 2,
                "gradient_accumulation_steps": 2,
            },
            "output": {"save_every_n_epochs": 1, "save_state": True},
            "sample": {"every_n_epochs": 1, "prompts": [{"prompt": "a red circle", "seed": 3}]},
        }
    )
    assert cli("train", str(recipe), "--dry-run", "--format", "json") == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["family"] == "sd1" and not plan["v_prediction"]
    # 6 images x 3 repeats in three 2-image buckets: 3 buckets x 3 batches of 2 = 9 batches
    assert plan["length"] == {
        "batches_per_epoch": 9,
        "steps_per_epoch": 5,
        "max_train_steps": 10,
        "num_epochs": 2,
    }
    assert [(b["width"], b["height"], b["images"]) for b in plan["buckets"]] == [
        (64, 64, 2),
        (64, 128, 2),
        (128, 64, 2),
    ]
    assert plan["network"]["trainable_parameters"] == _lora_parameter_count(tiny_sd1_dir, 4)
    out = tmp_path / "out"
    files = [
        (f["step"], f["kind"], Path(f["path"]).relative_to(out).as_posix()) for f in plan["files"]
    ]
    assert files == [
        (1, "metrics", "t-metrics.jsonl"),  # appended to by a resumed run
        (5, "lora", "t-000001.safetensors"),
        (5, "state", "t-000001-state"),
        (5, "sample", "sample/t_e000001_00_3.png"),
        (5, "sample", "sample/t_grid.png"),  # rewritten at every sampling point
        (10, "sample", "sample/t_e000002_00_3.png"),
        (10, "lora", "t.safetensors"),
        (10, "state", "t-state"),
    ]
    assert plan["optimizer"] == "torch.optim.adamw.AdamW" and plan["existing"] == []
    assert not out.exists()
    # the VRAM estimate `check --vram` gives for the same recipe, itemised
    from loraforge.recipe import load_recipe
    from loraforge.vram import estimate_vram

    vram = plan["vram"]
    assert vram["total_bytes"] == estimate_vram(load_recipe(recipe)).total_bytes
    components = " | ".join(row["component"] for row in vram["rows"])
    assert "network weights" in components and "optimizer state (AdamW)" in components


def test_dry_run_table_names_the_plan(write_recipe, capsys) -> None:
    assert cli("train", str(write_recipe()), "--dry-run") == 0
    text = capsys.readouterr().out
    for expected in (
        "sd1", "trainable parameters", "64x128", "t.safetensors", "AdamW", "4 steps", "VRAM",
    ):  # fmt: skip
        assert expected in text


def test_existing_outputs_need_force(write_recipe, tmp_path, capsys) -> None:
    recipe = str(write_recipe({"training": {"max_train_steps": 2}}))
    assert cli("train", recipe) == 0
    final = tmp_path / "out" / "t.safetensors"
    before = final.read_bytes()
    capsys.readouterr()
    assert cli("train", recipe) == 2
    stderr = stderr_of(capsys)
    assert "t.safetensors" in stderr and "--force" in stderr
    assert final.read_bytes() == before
    assert cli("train", recipe, "--force") == 0


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_save(
    write_recipe, tmp_path, monkeypatch, capsys
) -> None:
    import loraforge.training.step as step

    real, calls = step.batch_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) >= 3 else loss

    monkeypatch.setattr(step, "batch_loss", poisoned)
    recipe = write_recipe({"training": {"max_train_steps": 5}, "output": {"save_every_n_steps": 2}})
    assert cli("train", str(recipe)) == 2
    stderr = stderr_of(capsys)
    # issue 17: it said "continue with --resume" although no state was saved; now it says
    # what was kept
    assert "nan at step 3" in stderr and "--resume" not in stderr
    assert "kept: last LoRA file" in stderr and "t-step00000002.safetensors" in stderr
    out = tmp_path / "out"
    kept = out / "t-step00000002.safetensors"
    assert kept.is_file() and not (out / "t.safetensors").exists()
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(kept)).values())


def test_resume_of_a_missing_folder_is_a_user_error(write_recipe, tmp_path, capsys) -> None:
    assert cli("train", str(write_recipe()), "--resume", str(tmp_path / "nope")) == 2
    assert "no such state folder" in stderr_of(capsys)


def test_resume_auto_without_a_state_starts_fresh(write_recipe, tmp_path, capsys) -> None:
    assert (
        cli("train", str(write_recipe({"training": {"max_train_steps": 1}})), "--resume", "auto")
        == 0
    )
    assert "starting a new run" in stderr_of(capsys)
    assert (tmp_path / "out" / "t.safetensors").is_file()


@pytest.mark.parametrize(
    ("training", "message"),
    [
        ({"mixed_precision": "fp16"}, "fp16 needs a GPU"),
        ({"attention": "xformers"}, "xformers"),
    ],
)
def test_unsupported_settings_on_this_machine_are_clear_errors(
    write_recipe, capsys, training, message
) -> None:
    assert cli("train", str(write_recipe({"training": training}))) == 2
    assert message in stderr_of(capsys)


@pytest.mark.slow
def test_ctrl_c_saves_a_state_and_resume_auto_finishes(write_recipe, tmp_path) -> None:
    import os
    import signal
    import subprocess
    import sys

    recipe = str(write_recipe({"training": {"max_train_steps": 40}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "loraforge", "train", recipe]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    seen = []
    for line in process.stderr:  # a plain progress line every 4 steps (stderr is not a tty)
        seen.append(line)
        if line.startswith("step "):
            process.send_signal(signal.SIGINT)
            break
    rest = process.communicate(timeout=120)[1]
    assert process.returncode == 130, "".join(seen) + rest
    assert "--resume auto" in " ".join(rest.split())
    out = tmp_path / "out"
    assert (out / "t-state" / "state.json").is_file() and not (out / "t.safetensors").exists()
    finished = subprocess.run(
        [*command, "--resume", "auto"], capture_output=True, text=True, env=env, timeout=300
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "resuming from" in finished.stderr and (out / "t.safetensors").is_file()


@pytest.mark.parametrize(
    ("training", "warned"), [({}, True), ({"v_parameterization": False}, False)]
)
def test_sd2_checkpoint_of_unknown_prediction_type_is_named(
    write_recipe, monkeypatch, capsys, training, warned
) -> None:
    # An SD 2.x single file without a v_pred marker says neither epsilon nor v.
    import dataclasses

    import loraforge.training.setup as setup

    real = setup.load_base_model
    monkeypatch.setattr(
        setup,
        "load_base_model",
        lambda recipe: dataclasses.replace(real(recipe), prediction_known=False),
    )
    recipe = write_recipe({"training": {"max_train_steps": 1, **training}})
    assert cli("train", str(recipe)) == 0
    stderr = stderr_of(capsys)
    assert ("does not say whether it predicts epsilon or v" in stderr) is warned
    assert ("model.family: sd2-v" in stderr) is warned


@pytest.mark.parametrize("save_state", [True, False])
def test_a_second_ctrl_c_says_what_was_kept(
    write_recipe, tmp_path, monkeypatch, capsys, save_state
):
    import loraforge.training.step as step

    real, calls = step.batch_loss, []

    def aborted_in_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # as the SIGINT handler does on a second Ctrl-C
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(step, "batch_loss", aborted_in_step_3)
    recipe = write_recipe(
        {
            "training": {"max_train_steps": 6},
            "output": {"save_every_n_steps": 2, "save_state": save_state},
        }
    )
    assert cli("train", str(recipe)) == 130
    stderr = stderr_of(capsys)
    out = tmp_path / "out"
    assert "aborted at step 2 (second Ctrl-C)" in stderr
    assert f"kept: {out / 't-step00000002.safetensors'} (step 2)" in stderr
    if save_state:
        assert f"{out / 't-step00000002-state'} (step 2)" in stderr
        assert f"continue from step 2 with: loraforge train {recipe} --resume auto" in stderr
    else:
        assert "--resume" not in stderr


def test_a_second_ctrl_c_before_any_save_says_nothing_was_saved(
    write_recipe, monkeypatch, capsys
) -> None:
    import loraforge.training.step as step

    def aborted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(step, "batch_loss", aborted)
    assert cli("train", str(write_recipe())) == 130
    assert "aborted at step 0 (second Ctrl-C): this run saved nothing yet" in stderr_of(capsys)


def _garbage_pixels_png(path: Path) -> Path:
    """A PNG whose header reads (size, IEND) but whose pixel data is broken."""
    from PIL import Image

    Image.new("RGB", (96, 96), (10, 200, 30)).save(path)
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 8
    data[start : start + 20] = b"\xff" * 20
    path.write_bytes(bytes(data))
    return path


def test_bad_image_files_are_reported_and_skipped_never_a_mid_run_abort(
    write_recipe, tmp_path, shapes_dataset, capsys
) -> None:
    """Issue 17: a PNG with garbage pixels passed `bucket` and aborted `train` at step 16 with
    nothing saved; dangling links and folders named x.png were ignored without a word."""
    import shutil

    data = tmp_path / "dataset"
    shutil.copytree(shapes_dataset, data)
    folder = next(data.iterdir())
    _garbage_pixels_png(folder / "zz_garbage.png")
    (folder / "zz_dangling.png").symlink_to(tmp_path / "gone.png")
    (folder / "zz_folder.png").mkdir()
    recipe = write_recipe(
        {"dataset": {"subsets": [{"dir": str(data)}]}, "training": {"max_train_steps": 2}}
    )
    assert cli("train", str(recipe)) == 0  # the bad image is decoded before training starts
    stderr = stderr_of(capsys)
    assert "3 image file(s) skipped" in stderr and "zz_garbage.png: cannot be decoded" in stderr
    assert "bucket RECIPE --verify" in stderr
    assert cli("bucket", str(recipe), "--verify", "--format", "json") == 0
    listed = {
        Path(s["path"]).name: s["reason"] for s in json.loads(capsys.readouterr().out)["skipped"]
    }
    assert set(listed) == {"zz_garbage.png", "zz_dangling.png", "zz_folder.png"}
    assert "does not exist" in listed["zz_dangling.png"] and "folder" in listed["zz_folder.png"]
