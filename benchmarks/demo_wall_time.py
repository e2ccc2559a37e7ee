"""How long the README's quick start takes: `loraforge init --preset demo` + `loraforge train`.

Writes the demo project into a temporary folder and times `loraforge train demo/recipe.yaml` as a
user runs it (a fresh process, the thread count loraforge picks), wall clock from start to exit.
With ``--compare`` it also times the same run with torch's default thread count (one per
physical core, what loraforge used before it looked at the free cores) and prints the ratio
measured in this one run. It prints the machine it ran on (cores, load, torch) with the numbers,
since the wall time depends on both. Usage:

    python benchmarks/demo_wall_time.py
    python benchmarks/demo_wall_time.py --compare          # also torch's default threads
    python benchmarks/demo_wall_time.py --preset demo-sdxl
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loraforge.machine import cpu_cores, load_average


def loraforge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loraforge", *args], capture_output=True, text=True, env=env
    )


def timed_train(recipe: Path, *extra: str) -> float:
    """Seconds of one `loraforge train` process (outputs overwritten with --force)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    start = time.perf_counter()
    result = loraforge("train", str(recipe), "--force", *extra, env=env)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"loraforge train failed:\n{result.stderr[-3000:]}")
    chosen = [line for line in result.stderr.splitlines() if "training on the CPU" in line]
    print(f"  {seconds:6.1f} s  {chosen[0].strip() if chosen else ''}")
    return seconds


def torch_default_threads() -> int:
    code = "import torch; print(torch.get_num_threads())"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return int(subprocess.check_output([sys.executable, "-c", code], text=True, env=env))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo", choices=("demo", "demo-sdxl"))
    parser.add_argument(
        "--compare", action="store_true", help="also time torch's default thread count"
    )
    args = parser.parse_args()
    import torch

    print(
        f"machine: {platform.machine()}, {cpu_cores()} usable cores, load {load_average():.1f}, "
        f"torch {torch.__version__}, python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "demo"
        made = loraforge("init", "--preset", args.preset, "--dir", str(project))
        if made.returncode != 0:
            sys.exit(made.stderr)
        recipe = project / "recipe.yaml"
        print(f"loraforge train {args.preset}/recipe.yaml (threads chosen by loraforge):")
        chosen = timed_train(recipe)
        if args.compare:
            default = torch_default_threads()
            print(f"the same with torch's default threads (--threads {default}):")
            baseline = timed_train(recipe, "--threads", str(default))
            print(f"torch's default / loraforge's choice: {baseline / chosen:.2f}x the wall time")
    print(f"demo wall time: {chosen:.0f} s")


if __name__ == "__main__":
    main()
