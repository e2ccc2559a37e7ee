"""What this machine offers a recipe: optional packages, a GPU, free CPU cores.

Torch-free (``loraforge check`` must stay instant): packages are looked up with
:func:`importlib.util.find_spec`, which does not import them, and a GPU is inferred from the
installed torch build and the driver's device files unless torch is already imported (then torch
answers). :func:`machine_problems` turns what a recipe needs and this machine lacks into
warnings naming the install command; they are warnings because a recipe is often checked on
another machine than the one that trains it. :func:`choose_cpu_threads` picks the intra-op thread
count of CPU training.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os
import platform
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from loraforge.recipe.problems import Problem
from loraforge.recipe.types import Recipe

# pip name -> (import name, the loraforge extra that installs it)
_PACKAGES = {
    "bitsandbytes": ("bitsandbytes", "gpu"),
    "lion-pytorch": ("lion_pytorch", "optimizers"),
    "prodigyopt": ("prodigyopt", "optimizers"),
    "dadaptation": ("dadaptation", "optimizers"),
    "schedulefree": ("schedulefree", "optimizers"),
    "lycoris-lora": ("lycoris", "lycoris"),
    "tensorboard": ("tensorboard", "logging"),
    "xformers": ("xformers", None),
}


def has_package(import_name: str) -> bool:
    """Whether ``import_name`` (a top-level module) is installed, without importing it."""
    try:
        return importlib.util.find_spec(import_name) is not None
    except (ImportError, ValueError):
        return False


def install_command(package: str) -> str:
    """How to install a pip package: ``pip install bitsandbytes, or pip install
    'loraforge[gpu]'`` (the extra that holds it, when there is one)."""
    extra = _PACKAGES.get(package, (package, None))[1]
    command = f"pip install {package}"
    return command if extra is None else f"{command}, or pip install 'loraforge[{extra}]'"


def _torch_build() -> str | None:
    """The installed torch's local version (``cpu``, ``cu124``, ``rocm6.2``), ``""`` for none
    given, ``None`` when torch is not installed."""
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None
    return version.partition("+")[2]


def cuda_available() -> bool | None:
    """Whether training here would find a CUDA (or ROCm) GPU; ``None`` when it cannot be told
    without importing torch (then nothing is reported).

    torch answers when it is already imported. Otherwise: a ``+cpu`` torch build or an empty
    ``CUDA_VISIBLE_DEVICES`` has none; on Linux the NVIDIA driver's ``/proc`` entries (``/dev/kfd``
    for ROCm builds) say whether a GPU is there.
    """
    if "torch" in sys.modules:
        return bool(sys.modules["torch"].cuda.is_available())
    build = _torch_build()
    if build is None or build == "cpu":
        return False
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    if sys.platform == "darwin":
        return False
    if sys.platform != "linux":
        return None
    if build.startswith("rocm"):
        return Path("/dev/kfd").exists()
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def gpu_available() -> bool | None:
    """Whether training here runs on a GPU (CUDA, ROCm or Apple's MPS); ``None`` if unknown."""
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return True
    return cuda_available()


def _missing(package: str, what: str, field: str) -> Problem:
    return Problem(
        "warning",
        f"{what} needs the package {package}, which is not installed here: train will stop",
        path=field,
        hint=f"install it: {install_command(package)}",
    )


def machine_problems(recipe: Recipe) -> list[Problem]:
    """What ``recipe`` needs that this machine lacks, as warnings naming the fix: the
    optimizer's package and GPU, fp16 without a GPU, xformers, LyCORIS and TensorBoard."""
    from loraforge.training.optim import canonical_name, optimizer_spec

    t = recipe.training
    problems: list[Problem] = []
    spec = optimizer_spec(t.optimizer)
    optimizer = canonical_name(t.optimizer)
    if spec.package and not has_package(spec.module.partition(".")[0]):
        problems.append(_missing(spec.package, optimizer, "training.optimizer"))
    if spec.needs_cuda and cuda_available() is False:
        problems.append(
            Problem(
                "warning",
                f"{optimizer} (8-bit) needs an NVIDIA GPU with CUDA and this machine has none: "
                "train will stop here",
                path="training.optimizer",
                hint="train on a CUDA GPU, or use optimizer: AdamW (or Adafactor) on a CPU",
            )
        )
    if t.mixed_precision == "fp16" and gpu_available() is False:
        problems.append(
            Problem(
                "warning",
                "fp16 needs a GPU and this machine has none: train will stop here",
                path="training.mixed_precision",
                hint='use mixed_precision: bf16 or "no" on a CPU',
            )
        )
    if t.attention == "xformers" and not has_package("xformers"):
        problems.append(_missing("xformers", "attention xformers", "training.attention"))
    if recipe.network.backend == "lycoris" and not has_package("lycoris"):
        problems.append(_missing("lycoris-lora", "the lycoris backend", "network.backend"))
    if recipe.logging.log_with == "tensorboard" and not has_package("tensorboard"):
        problems.append(_missing("tensorboard", "log_with tensorboard", "logging.log_with"))
    return problems


def cpu_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota
    (containers started with ``--cpus``)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def load_average() -> float:
    """Runnable processes over the last minute (0 where the system does not say)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


@dataclass(frozen=True)
class ThreadChoice:
    """Intra-op threads and data-loader processes for CPU training, and why.

    Attributes:
        threads: ``torch.set_num_threads`` value.
        workers: DataLoader worker processes (at most the recipe's ``dataset.num_workers``).
        reason: what decided it, for the log line.
    """

    threads: int
    workers: int
    reason: str


def choose_cpu_threads(
    requested: int | None,
    workers: int,
    *,
    processes: int = 1,
    limit: int | None = None,
    cores: int | None = None,
    load: float | None = None,
    environ: Mapping[str, str] | None = None,
) -> ThreadChoice:
    """Threads for CPU training: never more than the free cores.

    An explicit ``requested`` count wins, then ``OMP_NUM_THREADS``. Otherwise the free cores are
    the usable cores minus the load average (rounded, at least one), shared by the training
    processes on this machine; data workers get at most all of a process's free cores but one,
    and its training threads the rest. torch's default (one thread per physical core, whatever
    else runs) oversubscribes a busy machine: OpenMP threads then wait for each other and a step
    takes many times longer.

    Args:
        requested: ``--threads``, or ``None``.
        workers: the recipe's ``dataset.num_workers``.
        processes: training processes on this machine (``LOCAL_WORLD_SIZE``).
        limit: at most this many threads unless asked for (torch's default thread count).
        cores, load, environ: for tests (default: this machine).
    """
    environ = os.environ if environ is None else environ
    omp = environ.get("OMP_NUM_THREADS", "")
    if requested is not None:
        return ThreadChoice(max(1, requested), workers, f"--threads {requested}")
    if omp.isdigit() and int(omp) > 0:
        return ThreadChoice(int(omp), workers, f"OMP_NUM_THREADS={omp}")
    cores = cpu_cores() if cores is None else cores
    load = load_average() if load is None else load
    free = max(1, min(cores, round(cores - load)))
    share = max(1, free // max(1, processes))
    used_workers = max(0, min(workers, share - 1))
    threads = max(1, share - used_workers)
    if limit is not None:
        threads = min(threads, max(1, limit))
    reason = f"{free} of {cores} cores free, load {load:.1f}"
    if processes > 1:
        reason += f", {processes} training processes"
    if used_workers < workers:
        reason += f"; dataset.num_workers {workers} lowered to {used_workers}"
    return ThreadChoice(threads, used_workers, reason)
