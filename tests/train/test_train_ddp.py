"""Two-process data-parallel training on the CPU (gloo), started with ``accelerate launch``.

The worker script trains in each process, then gathers every rank's final network weights:
they must be identical (gradients averaged every step, same initial weights), and each rank must
have taken half the steps of a single process (the data is sharded).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

WORKER = """
import sys, torch, torch.distributed as dist
torch.set_num_threads(1)
from loraforge.console import err
from loraforge.recipe import load_recipe
from loraforge.training.display import TrainingDisplay
from loraforge.training.loop import StopFlag, train
from loraforge.training.setup import setup_run

run = setup_run(load_recipe(sys.argv[1]))
length = run.settings.length
display = TrainingDisplay(err, total_steps=length.max_train_steps, num_epochs=1, start_step=0,
                          device=run.device, enabled=False)
result = train(run, display, StopFlag())
flat = torch.cat([p.detach().reshape(-1) for p in run.network.parameters()])
gathered = [torch.empty_like(flat) for _ in range(run.num_processes)]
dist.all_gather(gathered, flat)
same = all(torch.equal(gathered[0], g) for g in gathered)
ups = [p for name, p in run.network.named_parameters() if "lora_up" in name]
moved = all(bool(p.abs().sum() > 0) for p in ups)  # up starts at zero: training moved it
# One file per rank: the processes share stdout, where their lines can run together.
with open(f"rank{run.rank}.txt", "w", encoding="utf-8") as report:
    report.write(f"RANK {run.rank} OF {run.num_processes} STEPS {result.progress.global_step} "
                 f"SAME {same} MOVED {moved}")
"""


@pytest.mark.slow
def test_two_processes_train_in_sync_on_sharded_data(write_recipe, tmp_path) -> None:
    recipe = write_recipe(
        {
            "cache": {"latents": "memory"},
            "training": {"max_train_steps": None, "max_train_epochs": 1, "learning_rate": 3e-3},
            "network": {"dropout": 0.1},
        }
    )
    script = tmp_path / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # Through the interpreter, not PATH: CI runs `.venv/bin/python -m pytest` without activating.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", str(script), str(recipe)]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [(tmp_path / f"rank{rank}.txt").read_text(encoding="utf-8") for rank in (0, 1)]
    # 6 images x 3 repeats = 9 batches of 2 per epoch, shared by two ranks: 5 each (padded)
    assert lines == [
        "RANK 0 OF 2 STEPS 5 SAME True MOVED True",
        "RANK 1 OF 2 STEPS 5 SAME True MOVED True",
    ], done.stdout + done.stderr[-2000:]
    final = tmp_path / "out" / "t.safetensors"
    assert final.is_file()
    from loraforge.ops.lora_file import read_lora_file

    meta = read_lora_file(final).metadata
    assert meta["ss_total_batch_size"] == "4" and meta["ss_steps"] == "5"
