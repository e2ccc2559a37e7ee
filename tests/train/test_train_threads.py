"""CPU training picks its thread count from the free cores (never more), unless told."""

from __future__ import annotations

import pytest
import torch

from loraforge.cli import run
from loraforge.machine import choose_cpu_threads


@pytest.mark.parametrize(
    ("cores", "load", "workers", "threads", "kept_workers"),
    [
        (2, 1.3, 0, 1, 0),  # a busy 2-core machine: one thread (torch's default is 2)
        (2, 0.0, 0, 2, 0),
        (8, 0.2, 0, 8, 0),
        (8, 2.6, 2, 3, 2),  # 5 free: 2 data workers, 3 training threads
        (2, 1.6, 2, 1, 0),  # no core to spare for data workers
        (4, 9.0, 0, 1, 0),  # overloaded: still one thread
    ],
)
def test_threads_never_exceed_the_free_cores(cores, load, workers, threads, kept_workers) -> None:
    choice = choose_cpu_threads(None, workers, cores=cores, load=load, environ={})
    assert (choice.threads, choice.workers) == (threads, kept_workers)
    assert choice.threads + choice.workers <= max(1, round(cores - load))


def test_an_explicit_count_and_omp_num_threads_win() -> None:
    busy = {"cores": 2, "load": 1.9}
    assert choose_cpu_threads(6, 2, environ={}, **busy).threads == 6
    omp = choose_cpu_threads(None, 2, environ={"OMP_NUM_THREADS": "3"}, **busy)
    assert (omp.threads, omp.workers) == (3, 2)
    assert "OMP_NUM_THREADS=3" in omp.reason
    assert choose_cpu_threads(4, 0, environ={"OMP_NUM_THREADS": "3"}, **busy).threads == 4


def test_processes_on_one_machine_share_the_cores() -> None:
    choice = choose_cpu_threads(None, 0, processes=2, cores=8, load=0.0, environ={})
    assert choice.threads == 4
    assert choose_cpu_threads(None, 0, limit=2, cores=8, load=0.0, environ={}).threads == 2


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_training_on_a_busy_machine_uses_the_free_cores(
    write_recipe, monkeypatch, capsys, restore_threads
) -> None:
    import loraforge.training.setup as setup

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("loraforge.machine.cpu_cores", lambda: 4)
    monkeypatch.setattr("loraforge.machine.load_average", lambda: 1.2)
    monkeypatch.setattr(setup, "_TORCH_DEFAULT_THREADS", 4)  # torch's default on 4 cores
    seen = []
    real = setup.prepare_data

    def spy(recipe, accelerator, num_workers):
        seen.append(torch.get_num_threads())
        return real(recipe, accelerator, num_workers)

    monkeypatch.setattr(setup, "prepare_data", spy)
    recipe = write_recipe({"training": {"max_train_steps": 1}})
    assert run(["train", str(recipe)]) == 0
    assert seen == [3]  # 4 cores, load 1.2: 3 free
    assert "with 3 thread(s)" in " ".join(capsys.readouterr().err.split())
    assert run(["train", str(recipe), "--threads", "1", "--force"]) == 0
    assert seen[-1] == 1
    assert "(--threads 1;" in " ".join(capsys.readouterr().err.split())
