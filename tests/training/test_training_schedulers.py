"""LR schedules at chosen steps against the closed-form formulas."""

from __future__ import annotations

import math

import pytest
import torch

from loraforge.errors import RecipeError
from loraforge.training.optim import build_optimizer
from loraforge.training.schedulers import build_scheduler, resolve_warmup_steps

TOTAL = 100


def lrs(name: str, warmup: float = 0, lr: float = 1.0, **kwargs) -> list[float]:
    """The learning rate in effect at steps 0..TOTAL (before each optimizer step)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = build_scheduler(name, optimizer, TOTAL, warmup, **kwargs)
    seen = []
    for _ in range(TOTAL + 1):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_constant():
    assert set(lrs("constant", lr=3e-4)) == {3e-4}


def test_constant_with_warmup():
    seen = lrs("constant_with_warmup", warmup=10)
    assert seen[0] == 0.0 and seen[5] == pytest.approx(0.5) and seen[10] == 1.0 and seen[90] == 1.0


def test_linear_warmup_then_decay():
    seen = lrs("linear", warmup=10)
    # warmup s/10, then (100 - s) / 90
    assert seen[5] == pytest.approx(0.5)
    assert seen[10] == pytest.approx(1.0)
    assert seen[55] == pytest.approx(45 / 90)
    assert seen[100] == pytest.approx(0.0)


def test_cosine():
    seen = lrs("cosine", warmup=10)
    assert seen[10] == pytest.approx(1.0)
    assert seen[55] == pytest.approx(0.5)
    assert seen[40] == pytest.approx(0.5 * (1 + math.cos(math.pi * 30 / 90)))
    assert seen[100] == pytest.approx(0.0, abs=1e-12)


def test_cosine_with_restarts():
    seen = lrs("cosine_with_restarts", warmup=10, num_cycles=2)
    # two hard restarts over 90 decay steps: progress p, value 0.5 (1 + cos(pi * (2p mod 1)))
    assert seen[10] == pytest.approx(1.0)
    assert seen[55] == pytest.approx(1.0)  # p = 0.5 -> restart
    assert seen[32] == pytest.approx(0.5 * (1 + math.cos(math.pi * ((2 * 22 / 90) % 1))))
    assert seen[77] == pytest.approx(0.5 * (1 + math.cos(math.pi * ((2 * 67 / 90) % 1))))
    assert seen[100] == 0.0


def test_polynomial_power_two():
    lr, end = 2e-3, 1e-7
    seen = lrs("polynomial", warmup=0, lr=lr, power=2.0)
    for step in (0, 30, 75, 100):
        expected = (lr - end) * (1 - step / TOTAL) ** 2 + end
        assert seen[step] == pytest.approx(expected, rel=1e-9)


def test_warmup_ratio_below_one_is_a_share_of_total_steps():
    assert resolve_warmup_steps(0.1, 100) == 10
    assert resolve_warmup_steps(0.05, 250) == 12
    assert resolve_warmup_steps(0, 100) == 0
    assert resolve_warmup_steps(30.0, 100) == 30
    seen = lrs("linear", warmup=0.2)
    assert seen[10] == pytest.approx(0.5) and seen[20] == pytest.approx(1.0)


@pytest.mark.parametrize("warmup", [12.5, -1])
def test_bad_warmup_values(warmup):
    with pytest.raises(RecipeError, match="lr_warmup_steps"):
        resolve_warmup_steps(warmup, 100)


def test_constant_with_warmup_steps_is_an_error_with_the_fix():
    with pytest.raises(RecipeError, match="constant_with_warmup"):
        lrs("constant", warmup=10)


def test_unknown_scheduler_name():
    with pytest.raises(RecipeError, match="unknown scheduler 'cosin'"):
        lrs("cosin")


def test_polynomial_with_a_tiny_learning_rate_is_a_recipe_error():
    with pytest.raises(RecipeError, match="polynomial"):
        lrs("polynomial", lr=1e-8)


def test_schedule_free_optimizers_get_a_constant_scheduler(capsys):
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = build_optimizer("AdamWScheduleFree", [param], lr=1e-3)
    scheduler = build_scheduler("cosine", optimizer, TOTAL, 10)
    assert "schedule-free" in " ".join(capsys.readouterr().err.split())
    for _ in range(5):
        param.grad = torch.ones_like(param)
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr() == [1e-3]


def test_relative_step_adafactor_gets_its_own_schedule():
    from transformers.optimization import AdafactorSchedule

    param = torch.nn.Parameter(torch.full((3, 3), 0.5))
    optimizer = build_optimizer("Adafactor", [param], lr=1e-3)
    scheduler = build_scheduler("constant", optimizer, TOTAL, learning_rate=1e-3)
    assert isinstance(scheduler, AdafactorSchedule)
    assert scheduler.get_last_lr() == [1e-3]
    # relative step, no warmup_init, scale_parameter: min(1e-2, 1/sqrt(step)) * max(1e-3, RMS(p))
    # with RMS taken before the update
    rms = param.detach().pow(2).mean().sqrt().item()
    param.grad = torch.ones_like(param)
    optimizer.step()
    scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-2 * max(1e-3, rms), rel=1e-5)


def test_scheduler_state_round_trips():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = build_scheduler("cosine", optimizer, TOTAL, 10)
    for _ in range(37):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    optimizer2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler2 = build_scheduler("cosine", optimizer2, TOTAL, 10)
    scheduler2.load_state_dict(state)
    optimizer2.step()
    scheduler2.step()
    optimizer.step()
    scheduler.step()
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
