"""GPU truth: peak memory against the VRAM estimates, and training speed, on a real card.

One script for a short GPU session: it starts no row after ``--budget-s`` (450 s by default)
and stops a row at its own limit, so that it ends inside 8 minutes on one H100/H200; it writes
``OUT/gpu_truth.json`` after every row, so a session cut short still leaves results. It

1. builds full-size SD 1.5 and SDXL models with random weights from the configs shipped with
   loraforge (no download; on the GPU, written as fp16 diffusers folders) and draws a small
   dataset at 512 and 1024 px;
2. for each of ``char-8gb``, ``char-12gb``, ``sdxl-char-12gb``, ``sdxl-char-24gb`` as shipped,
   then with the other precision (fp16/bf16), the other optimizer (AdamW/AdamW8bit) and the
   other attention kernel (SDPA/xformers), runs the real ``loraforge train`` path for
   ``--steps`` steps in a fresh process (:mod:`truth_row`, time-boxed) and records
   ``max_memory_allocated``/``max_memory_reserved`` and the CUDA context against the analytic
   and traced estimates (computed meanwhile on the CPU in two side processes), steady-state
   seconds per step, the same step in a hand-written minimal loop (:mod:`minimal_loop`; the
   framework-overhead ratio) and the UNet's forward + backward FLOPs per step over the step
   time (achieved TFLOP/s).

What a row changes must run on this machine, else the row is skipped with the reason
(``environment.packages`` says which packages were present). The presets' other settings that
cannot run here get stand-ins, recorded per row under ``adjusted``: fp16/bf16 -> no (on a CPU),
AdamW8bit -> AdamW (without bitsandbytes), xformers -> sdpa; a row that then repeats an earlier
row is skipped. So a bare CUDA machine without bitsandbytes still measures every preset (with
AdamW, whose state the estimates then count). Rows that no longer fit in the budget are listed
as ``not run``.

``--smoke`` runs the same script end to end on the CPU with the built-in tiny models at 64 px,
the presets only (with the CPU's stand-ins), for CI. Usage::

    python benchmarks/gpu_truth.py OUT_DIR                 # on a GPU machine
    python benchmarks/gpu_truth.py OUT_DIR --smoke         # anywhere, seconds to a minute
    python benchmarks/gpu_truth.py OUT_DIR --only char-8gb --only sdxl-char-12gb+fp16
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from truth_plan import PRESETS, plan_rows, ratios, row_plan

HERE = Path(__file__).resolve().parent
SIZES = {"sd1": 512, "sdxl": 1024}
SMOKE_SIZE = 64
MIN_ROW_S = 45  # a row is not started with less than this left of the budget


# ---- side processes ---------------------------------------------------------------------------


def _python(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def probe_environment() -> dict[str, Any]:
    """Versions, the GPU and the optional packages (run in a side process: no CUDA context here)."""
    import importlib.metadata as metadata
    import platform

    import torch

    packages: dict[str, str | None] = {}
    for name in ("bitsandbytes", "xformers"):
        try:
            __import__(name)
            packages[name] = metadata.version(name)
        except Exception as e:  # a broken install is reported like a missing one
            packages[name] = None
            packages[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]  # type: ignore[assignment]
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_device": torch.cuda.get_device_name() if cuda else None,
        "cuda_memory": torch.cuda.get_device_properties(0).total_memory if cuda else None,
        "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported()),
        "cpu_count": os.cpu_count(),
        "packages": packages,
    }


def estimate_rows(result_path: Path, recipes: list[Path]) -> None:
    """Analytic and traced estimates of ``recipes`` into ``result_path`` (after each one)."""
    from loraforge.recipe import load_recipe
    from loraforge.vram import estimate_vram

    done: dict[str, Any] = {}
    for path in recipes:
        recipe = load_recipe(path)
        entry: dict[str, Any] = {}
        for method in ("analytic", "traced"):
            started = time.perf_counter()
            estimate = estimate_vram(recipe, method=method)  # type: ignore[arg-type]
            entry[method] = {
                "tensor_bytes": estimate.tensor_bytes,
                "total_bytes": estimate.total_bytes,
                "seconds": time.perf_counter() - started,
            }
        done[str(path)] = entry
        write_json(result_path, done)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1), "utf-8")
    tmp.replace(path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None


# ---- the run ----------------------------------------------------------------------------------


class Truth:
    """The results file and the clock of one run."""

    def __init__(self, out: Path, args: argparse.Namespace) -> None:
        self.out, self.args = out, args
        self.started = time.monotonic()
        self.path = out / "gpu_truth.json"
        self.data: dict[str, Any] = {
            "script": "benchmarks/gpu_truth.py",
            "smoke": args.smoke,
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "finished": None,
            "budget_s": args.budget_s,
            "steps": args.steps,
            "environment": {},
            "models": {},
            "rows": [],
        }

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.started)

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.started, 1)
        write_json(self.path, self.data)

    def side(self, args: list[str], timeout: float, env: dict[str, str] | None = None) -> Any:
        """Run this script with ``args``; its stdout's last line as JSON (or an error text)."""
        try:
            done = subprocess.run(
                _python(*args), capture_output=True, text=True, timeout=max(1, timeout), env=env
            )
        except subprocess.TimeoutExpired:
            return f"timed out after {timeout:.0f} s"
        if done.returncode != 0:
            return (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return json.loads(done.stdout.strip().splitlines()[-1])


def _cpu_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH", "")]))
    return env


def prepare(truth: Truth) -> dict[str, Path]:
    """Environment, models and datasets; returns the model folder of each family."""
    from truth_inputs import write_dataset

    args, work = truth.args, truth.out / "work"
    env = truth.side(["--probe"], timeout=120)
    truth.data["environment"] = env if isinstance(env, dict) else {"error": env}
    truth.save()
    models = {}
    for family in ("sd1", "sdxl"):
        folder = work / "models" / family
        started = time.monotonic()
        if not (folder / "model_index.json").is_file():
            built = truth.side(["--build", family, str(folder), *(["--smoke"] if args.smoke else [])], timeout=truth.left())  # fmt: skip
            if built != "ok":
                raise SystemExit(f"gpu_truth: building the {family} model failed: {built}")
        truth.data["models"][family] = {"path": str(folder), "seconds": time.monotonic() - started}
        size = SMOKE_SIZE if args.smoke else SIZES[family]
        if not (work / "data" / str(size)).is_dir():
            write_dataset(work / "data" / str(size), size)
        models[family] = folder
        truth.save()
    return models


def plan(truth: Truth, models: dict[str, Path]) -> list[dict[str, Any]]:
    """Row records with their recipes written, or the reason each cannot run."""
    from truth_inputs import preset_data, row_recipe, write_recipe

    args, env = truth.args, truth.data["environment"]
    presets = {name: preset_data(name) for name in PRESETS}
    records, planned = [], {}
    for row in plan_rows(presets):
        excluded = bool(args.only) and row.name not in args.only
        settings, adjusted, reason = row_plan(
            row, presets[row.preset], env, {} if excluded else planned
        )
        record: dict[str, Any] = {"name": row.name, "preset": row.preset, "family": row.family}
        record.update({"changes": row.changes, "adjusted": adjusted, "settings": settings})
        record.update({"status": "planned", "reason": None})
        changes = {**row.changes, **adjusted}
        if args.smoke and row.changes:
            reason = reason or "--smoke runs the presets only"
        if excluded:
            reason = "not in --only"
        size = SMOKE_SIZE if args.smoke else SIZES[row.family]
        data = row_recipe(
            row.preset, changes, model=models[row.family],
            dataset=truth.out / "work" / "data" / str(size),
            out=truth.out / "work" / "runs" / row.name, steps=args.steps,
            resolution=SMOKE_SIZE if args.smoke else None,
        )  # fmt: skip
        path = write_recipe(truth.out / "recipes" / f"{row.name}.yaml", data)
        record["recipe"] = str(path.relative_to(truth.out))
        if reason:
            record.update(status="skipped", reason=reason)
        records.append(record)
    return records


def start_estimates(truth: Truth, records: list[dict[str, Any]]) -> list[subprocess.Popen]:
    """Two CPU side processes estimating the rows that will run (SD 1.5 and SDXL)."""
    procs = []
    for family in ("sd1", "sdxl"):
        recipes = [str(truth.out / r["recipe"]) for r in records if r["family"] == family and r["status"] == "planned"]  # fmt: skip
        if recipes:
            target = truth.out / "work" / f"estimates-{family}.json"
            command = _python("--estimate", str(target), *recipes)
            threads = max(1, min(4, (os.cpu_count() or 2) // 4))
            procs.append(subprocess.Popen(command, env=_cpu_env(threads), stdout=subprocess.DEVNULL))  # fmt: skip
    return procs


def merge_estimates(truth: Truth, records: list[dict[str, Any]]) -> None:
    found: dict[str, Any] = {}
    for family in ("sd1", "sdxl"):
        found.update(_read_json(truth.out / "work" / f"estimates-{family}.json") or {})
    for record in records:
        estimate = found.get(str(truth.out / record["recipe"]))
        if estimate is not None:
            record["estimate"] = estimate
        record["ratios"] = ratios(record.get("estimate", {}), record.get("measured", {}))


def run_row(truth: Truth, record: dict[str, Any]) -> None:
    """Train one row in a fresh process, time-boxed; partial results are kept."""
    limit = min(truth.args.row_timeout, truth.left())
    result_file = truth.out / "work" / "rows" / f"{record['name']}.json"
    result_file.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(HERE / "truth_row.py"), str(truth.out / record["recipe"]), str(result_file)]  # fmt: skip
    started = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit)
        status = "ok" if done.returncode == 0 else "failed"
        reason = None if status == "ok" else (done.stderr.strip().splitlines() or ["?"])[-1]
    except subprocess.TimeoutExpired:
        status, reason = "timeout", f"stopped at its time limit ({limit:.0f} s)"
    record.update(status=status, reason=reason, seconds=round(time.monotonic() - started, 1))
    record["measured"] = _read_json(result_file) or {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path, nargs="?", help="folder for gpu_truth.json")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU (CI)")
    parser.add_argument("--steps", type=int, help="training steps per row (default 20; smoke 6)")
    parser.add_argument(
        "--budget-s", type=float, help="time for everything (default 450 s; smoke 1800 s)"
    )
    parser.add_argument(
        "--row-timeout", type=float, help="time limit of one row (default 150 s; smoke 900 s)"
    )
    parser.add_argument("--only", action="append", help="run only these rows (repeatable)")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--build", nargs=2, metavar=("FAMILY", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--estimate", nargs="+", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(probe_environment()))
        return 0
    if args.build:
        import torch
        from truth_inputs import write_model

        device = "cuda" if torch.cuda.is_available() else "cpu"
        write_model(args.build[0], Path(args.build[1]), smoke=args.smoke, device=device)
        print(json.dumps("ok"))
        return 0
    if args.estimate:
        estimate_rows(Path(args.estimate[0]), [Path(p) for p in args.estimate[1:]])
        return 0
    if args.out is None:
        parser.error("the output folder is required")
    args.steps = args.steps or (6 if args.smoke else 20)
    args.budget_s = args.budget_s or (1800.0 if args.smoke else 450.0)
    args.row_timeout = args.row_timeout or (900.0 if args.smoke else 150.0)
    args.out.mkdir(parents=True, exist_ok=True)
    truth = Truth(args.out.resolve(), args)
    records = truth.data["rows"]
    records.extend(plan(truth, prepare(truth)))
    truth.save()
    estimators = start_estimates(truth, records)
    for record in records:
        if record["status"] != "planned":
            continue
        if truth.left() < (0 if args.smoke else MIN_ROW_S):
            record.update(status="not run", reason="the time budget ran out")
        else:
            run_row(truth, record)
        merge_estimates(truth, records)
        truth.save()
        print(f"{record['name']}: {record['status']} {record.get('reason') or ''}", flush=True)
    for proc in estimators:
        try:
            proc.wait(timeout=max(1.0, truth.left()))
        except subprocess.TimeoutExpired:
            proc.kill()
    merge_estimates(truth, records)
    truth.data["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    truth.save()
    print(f"wrote {truth.path}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
