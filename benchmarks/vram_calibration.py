"""Calibrate the VRAM estimator against a real GPU: estimate / measured ratios per setting.

For each setting (the shipped presets and a few variants) it runs one steady-state training step
on the GPU with the full-size architecture from ``loraforge/models/configs`` (random weights,
no download) and the step code the traced estimate uses, in a fresh process per setting, and
prints:

* ``analytic`` and ``traced``: the two estimates' tensor peaks (what ``max_memory_allocated``
  measures) and their totals (with the CUDA-context and allocator terms);
* ``allocated`` / ``reserved``: ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` of
  the measured step; ``context``: device memory in use beyond PyTorch's reserve
  (``mem_get_info``), i.e. the CUDA context;
* the ratios traced/allocated, analytic/allocated and total-estimate/(reserved + context).

8-bit optimizers are stood in for by their state size (bitsandbytes is not required). Without
CUDA the script says so and exits 0. Usage:

    python benchmarks/vram_calibration.py [--only sdxl-char-12gb] [--skip-traced]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from typing import Any

from loraforge.presets import list_presets
from loraforge.recipe import Recipe, load_recipe

GIB = 2**30


def _section(recipe: Recipe, name: str, **changes: Any) -> Recipe:
    return replace(recipe, **{name: replace(getattr(recipe, name), **changes)})


def settings() -> dict[str, Recipe]:
    """The settings measured: every preset, plus variants that exercise other terms."""
    cases = {p.name: load_recipe(p.path) for p in list_presets() if p.vram}
    base = cases.get("char-12gb")
    if base is not None:
        cases["char-12gb+checkpointing"] = _section(base, "training", gradient_checkpointing=True)
        cases["char-12gb+eager"] = _section(base, "training", attention="eager")
        cases["char-12gb+live-vae"] = _section(base, "cache", latents="none")
        cases["char-12gb+fp32"] = _section(base, "training", mixed_precision="no")
    xl = cases.get("sdxl-char-12gb")
    if xl is not None:
        cases["sdxl-char-12gb-no-checkpointing"] = _section(
            xl, "training", gradient_checkpointing=False
        )
        cases["sdxl-char-12gb+fp8"] = _section(xl, "training", fp8_base=True)
    return cases


def measure(name: str, skip_traced: bool) -> dict[str, Any]:
    """Estimate and measure one setting (run in its own process for clean allocator stats)."""
    import torch

    from loraforge.vram import estimate_vram
    from loraforge.vram.arch import resolve_architecture
    from loraforge.vram.settings import memory_settings
    from loraforge.vram.step import run_training_step
    from loraforge.vram.traced import _quiet
    from loraforge.vram.tracker import LiveBytesTracker

    recipe = settings()[name]
    analytic = estimate_vram(recipe)
    traced = None if skip_traced else estimate_vram(recipe, method="traced")
    arch = resolve_architecture(recipe.model.base, recipe.model.family, vae=recipe.model.vae)
    s = memory_settings(recipe, arch.family)
    torch.cuda.init()
    torch.empty(1, device="cuda")
    free, total = torch.cuda.mem_get_info()
    context = total - free - torch.cuda.memory_reserved()
    tracker = LiveBytesTracker()
    with _quiet(), torch.device("cuda"):
        step = run_training_step(
            recipe, arch, s, tracker, device="cuda", before_step=torch.cuda.reset_peak_memory_stats
        )  # train's own step (loraforge.vram.step), on real CUDA tensors
    torch.cuda.synchronize()
    return {
        "name": name,
        "analytic": analytic.tensor_bytes,
        "analytic_total": analytic.total_bytes,
        "traced": None if traced is None else traced.tensor_bytes,
        "traced_total": None if traced is None else traced.total_bytes,
        "tracked": step.peak_bytes,
        "allocated": torch.cuda.max_memory_allocated(),
        "reserved": torch.cuda.max_memory_reserved(),
        "context": context,
        "device": torch.cuda.get_device_name(),
    }


def _ratio(a: float | None, b: float) -> str:
    return "-" if a is None or not b else f"{a / b:.3f}"


def report(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'setting':34} {'analytic':>9} {'traced':>9} {'alloc':>9} {'reserved':>9} "
        f"{'context':>8} {'tr/alloc':>8} {'an/alloc':>8} {'total/used':>10}"
    )
    print(f"device: {rows[0]['device']}" if rows else "no results")
    print(head)
    for r in rows:
        used = r["reserved"] + r["context"]
        best_total = r["traced_total"] or r["analytic_total"]
        traced = "-" if r["traced"] is None else f"{r['traced'] / GIB:.2f}"
        print(
            f"{r['name']:34} {r['analytic'] / GIB:9.2f} {traced:>9} {r['allocated'] / GIB:9.2f} "
            f"{r['reserved'] / GIB:9.2f} {r['context'] / GIB:8.2f} "
            f"{_ratio(r['traced'], r['allocated']):>8} {_ratio(r['analytic'], r['allocated']):>8} "
            f"{_ratio(best_total, used):>10}"
        )
    print("(GiB; tensor peaks compare with max_memory_allocated, totals with reserved + context)")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", action="append", help="measure only these settings")
    parser.add_argument("--skip-traced", action="store_true", help="only the analytic estimate")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one setting, JSON out
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("vram_calibration: no CUDA GPU here; nothing to measure (run it on a GPU machine)")
        return 0
    if args.case:
        print(json.dumps(measure(args.case, args.skip_traced)))
        return 0
    names = args.only or list(settings())
    rows = []
    for name in names:
        command = [sys.executable, __file__, "--case", name]
        if args.skip_traced:
            command.append("--skip-traced")
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or ["?"]
            print(f"{name}: failed ({tail[0]})", file=sys.stderr)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    report(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
