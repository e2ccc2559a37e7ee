"""One row of ``gpu_truth.py``, in its own process: a real ``loraforge train`` run, measured.

``python benchmarks/truth_row.py RECIPE.yaml RESULT.json`` trains the recipe with
:func:`loraforge.training.setup.setup_run` and :func:`loraforge.training.loop.train` (what
``loraforge train`` runs, without the live display) and writes ``RESULT.json`` after each phase,
so a row killed by its time limit still leaves what it measured:

* ``setup_s``: model loading, latent/text caching, network and optimizer set-up;
* ``live_tensor_peak``: :class:`loraforge.vram.probe.MemoryProbe`'s peak of live tensor bytes
  over steps 2-3 (the quantity the traced estimate computes);
* ``cuda``: ``max_memory_allocated``/``max_memory_reserved`` of set-up and steps 1-3
  (``until_step_3``: caching, first optimizer state) and of the steady-state steps from step 4
  on (``steady``), and ``context`` (device memory in use beyond PyTorch's reserve, i.e. the
  CUDA context, measured before set-up);
* ``s_per_step``: seconds per optimizer step from step 4 to the last (steady state);
* ``minimal``: the same step in :mod:`minimal_loop` (its seconds per step and CUDA peaks);
* ``unet_flops``: the UNet's forward + backward FLOPs of one step.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FIRST_TIMED_STEP = 4


class RowProbe:
    """A :class:`~loraforge.training.loop.StepProbe`: memory over steps 2-3, then step times.

    From step :data:`FIRST_TIMED_STEP` on it resets the CUDA peak counters and records the time
    at the end of every step (after a device synchronisation).
    """

    def __init__(self, run: Any) -> None:
        from loraforge.vram.probe import MemoryProbe

        self.memory = MemoryProbe(run, first=2, last=3)
        self.device = run.device
        self.ends: list[float] = []
        self.before_steady: dict[str, int] | None = None  # CUDA peaks of set-up and steps 1-3

    def step_starts(self, step: int) -> None:
        import torch

        self.memory.step_starts(step)
        if step == FIRST_TIMED_STEP and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.before_steady = cuda_peaks()
            torch.cuda.reset_peak_memory_stats(self.device)

    def step_ended(self, step: int) -> None:
        import torch

        self.memory.step_ended(step)
        if step >= FIRST_TIMED_STEP - 1:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.ends.append(time.perf_counter())

    def s_per_step(self) -> float | None:
        if len(self.ends) < 2:
            return None
        return (self.ends[-1] - self.ends[0]) / (len(self.ends) - 1)


def cuda_peaks() -> dict[str, int]:
    import torch

    return {
        "max_memory_allocated": torch.cuda.max_memory_allocated(),
        "max_memory_reserved": torch.cuda.max_memory_reserved(),
    }


def measure(recipe_path: Path, result_path: Path) -> dict[str, Any]:
    """Train and measure one row; ``result_path`` is rewritten after every phase."""
    import torch

    from loraforge.console import err
    from loraforge.recipe import load_recipe
    from loraforge.training.display import TrainingDisplay
    from loraforge.training.loop import StopFlag, train
    from loraforge.training.setup import setup_run
    from loraforge.training.step import text_encoder_trains

    result: dict[str, Any] = {"phase": "start"}

    def save(phase: str) -> None:
        result["phase"] = phase
        tmp = result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1), "utf-8")
        tmp.replace(result_path)

    recipe = load_recipe(recipe_path)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.empty(1, device="cuda")
        free, total = torch.cuda.mem_get_info()
        result["cuda"] = {"context": total - free - torch.cuda.memory_reserved()}
    started = time.perf_counter()
    run = setup_run(recipe, force=True)
    result["setup_s"] = time.perf_counter() - started
    result["device"] = str(run.device)
    save("set up")

    length = run.settings.length
    display = TrainingDisplay(
        err, total_steps=length.max_train_steps, num_epochs=length.num_epochs, start_step=0,
        device=run.device, enabled=False,
    )  # fmt: skip
    probe = RowProbe(run)
    train_text_encoder = text_encoder_trains(run.optimizer)
    trained = train(run, display, StopFlag(), probe)
    result["steps"] = trained.progress.global_step
    result["final_loss"] = trained.losses[-1] if trained.losses else None
    result["s_per_step"] = probe.s_per_step()
    result["timed_steps"] = max(0, len(probe.ends) - 1)
    result["live_tensor_peak"] = probe.memory.tracker.peak
    if cuda:
        result["cuda"]["until_step_3"] = probe.before_steady
        result["cuda"]["steady"] = cuda_peaks()
    save("trained")

    from minimal_loop import time_minimal_loop, unet_flops

    optimizer = recipe.training.optimizer
    result["minimal"] = time_minimal_loop(
        run, optimizer, train_text_encoder, steps=length.max_train_steps
    )
    save("minimal loop")
    result["unet_flops"] = unet_flops(run, optimizer)
    del run, trained
    gc.collect()
    save("done")
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    result = measure(Path(args[0]), Path(args[1]))
    finite = all(math.isfinite(v) for v in (result["s_per_step"] or math.nan, result["unet_flops"]))
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
