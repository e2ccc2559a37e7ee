"""The traced VRAM estimate against a real `loraforge train` run: traced / measured, in one run.

Trains a recipe (default: the built-in demo project, written to a temporary folder) for three
optimizer steps with :class:`loraforge.vram.probe.MemoryProbe` attached, which measures the peak
of live tensor bytes on the training device over steps 2-3. It then traces the same recipe's
step on fake tensors (:func:`loraforge.vram.traced.trace_step`) and prints both and their ratio.
On a CUDA machine it also prints ``torch.cuda.max_memory_allocated`` over the measured steps.

Buckets are turned off (every batch at the recipe's resolution), since the trace measures the
largest bucket and a short run may not reach it. Usage:

    python benchmarks/vram_real_run.py [RECIPE.yaml] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path


def _recipe(path: Path):
    from loraforge.recipe import load_recipe

    recipe = load_recipe(path)
    dataset = dataclasses.replace(recipe.dataset, enable_bucket=False)
    training = dataclasses.replace(recipe.training, max_train_steps=3, max_train_epochs=None)
    output = dataclasses.replace(
        recipe.output, dir=str(Path(tempfile.mkdtemp(prefix="loraforge-probe-")))
    )
    sample = dataclasses.replace(
        recipe.sample, prompts=(), every_n_epochs=None, every_n_steps=None, at_first=False
    )
    return dataclasses.replace(
        recipe, dataset=dataset, training=training, output=output, sample=sample
    )


def measure(path: Path) -> None:
    import torch

    from loraforge.console import err
    from loraforge.training.display import TrainingDisplay
    from loraforge.training.loop import StopFlag, train
    from loraforge.training.setup import setup_run
    from loraforge.vram.arch import resolve_architecture
    from loraforge.vram.probe import MemoryProbe
    from loraforge.vram.settings import memory_settings
    from loraforge.vram.sizes import format_bytes
    from loraforge.vram.traced import trace_step

    recipe = _recipe(path)
    run = setup_run(recipe)
    cuda = run.device.type == "cuda"
    length = run.settings.length
    display = TrainingDisplay(
        err, total_steps=length.max_train_steps, num_epochs=length.num_epochs, start_step=0,
        device=run.device, enabled=False,
    )  # fmt: skip
    probe = MemoryProbe(run, first=2, last=3)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    train(run, display, StopFlag(), probe)
    allocated = torch.cuda.max_memory_allocated() if cuda else None
    arch = resolve_architecture(recipe.model.base, recipe.model.family, vae=recipe.model.vae)
    traced = trace_step(recipe, arch, memory_settings(recipe, arch.family), cuda_policy=cuda)
    measured = probe.tracker.peak
    print(f"recipe: {path}")
    print(f"measured live tensor bytes, steps 2-3: {format_bytes(measured)}")
    print(f"traced peak:                           {format_bytes(traced.peak_bytes)}")
    print(f"traced / measured:                     {traced.peak_bytes / measured:.4f}")
    if allocated is not None:
        print(f"torch.cuda.max_memory_allocated:       {format_bytes(allocated)}")
        print(f"traced / max_memory_allocated:         {traced.peak_bytes / allocated:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", type=Path, help="default: the built-in demo")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.recipe is not None:
        measure(args.recipe)
        return
    from loraforge.demo import write_demo_project

    with tempfile.TemporaryDirectory(prefix="loraforge-demo-") as tmp:
        measure(write_demo_project("demo", Path(tmp) / "demo", force=False))


if __name__ == "__main__":
    main()
