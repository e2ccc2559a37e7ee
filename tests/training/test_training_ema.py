"""The weight average (``training.ema``) against a float64 computation written from its rules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loraforge.training.ema import NetworkEma, ema_metadata
from loraforge.training.settings import EmaSettings


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(3, 4))
        self.b = nn.Parameter(torch.zeros(5))
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)


def _expected(history, settings: EmaSettings):
    """The average after each step, in float64: ``history[0]`` is the initial weights,
    ``history[s]`` the weights after step ``s``."""
    ema = history[0].double()
    updates = 0
    for step in range(1, len(history)):
        w = history[step].double()
        if step <= settings.start_step:
            ema = w.clone()
        elif (step - settings.start_step) % settings.every_n_steps == 0:
            updates += 1
            d = settings.decay
            if settings.warmup:
                d = min(d, (1 + updates) / (10 + updates))
            ema = d * ema + (1 - d) * w
    return ema


@pytest.mark.parametrize(
    "settings",
    [
        EmaSettings(decay=0.9, warmup=False),
        EmaSettings(decay=0.99, warmup=True),
        EmaSettings(decay=0.8, warmup=True, start_step=3, every_n_steps=2),
        EmaSettings(decay=0.95, warmup=False, start_step=0, every_n_steps=3, device="cpu"),
    ],
)
def test_average_matches_the_rules(settings: EmaSettings) -> None:
    torch.manual_seed(0)
    net = Tiny()
    with torch.no_grad():
        net.a.normal_()
        net.b.normal_()
    ema = NetworkEma(net, settings)
    assert set(ema.average) == {"a", "b"}  # frozen parameters are not averaged
    history = [torch.cat([net.a.detach().flatten(), net.b.detach()]).clone()]
    for step in range(1, 12):
        with torch.no_grad():
            net.a.add_(torch.randn_like(net.a))
            net.b.mul_(1.1).add_(0.3)
        history.append(torch.cat([net.a.detach().flatten(), net.b.detach()]).clone())
        ema.update(net, step)
    got = torch.cat([ema.average["a"].flatten(), ema.average["b"]]).double()
    assert ema.average["a"].dtype == torch.float32
    assert torch.allclose(got, _expected(history, settings), rtol=1e-5, atol=1e-6)


def test_counts_and_decays() -> None:
    s = EmaSettings(decay=0.999, warmup=True, start_step=10, every_n_steps=5)
    assert [s.updates_until(step) for step in (0, 10, 14, 15, 19, 20, 100)] == [
        0,
        0,
        0,
        1,
        1,
        2,
        18,
    ]
    assert s.decay_of_update(1) == pytest.approx(2 / 11)
    assert s.decay_of_update(10**6) == 0.999
    assert EmaSettings(decay=0.5, warmup=False).decay_of_update(1) == 0.5


def test_applied_swaps_in_the_average_and_restores_the_weights_exactly() -> None:
    torch.manual_seed(1)
    net = Tiny().to(torch.bfloat16)
    with torch.no_grad():
        net.a.normal_()
    ema = NetworkEma(net, EmaSettings(decay=0.5, warmup=False))
    raw = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.a.add_(1.0)
    ema.update(net, 1)
    after = {k: v.clone() for k, v in net.state_dict().items()}
    with ema.applied(net):
        assert torch.equal(net.a, ema.average["a"].to(torch.bfloat16))
        assert not torch.equal(net.a, after["a"]) and not torch.equal(net.a, raw["a"])
    for key, value in net.state_dict().items():
        assert torch.equal(value, after[key])


def test_state_round_trip_is_exact_and_checked() -> None:
    net = Tiny()
    ema = NetworkEma(net, EmaSettings())
    with torch.no_grad():
        ema.average["a"].normal_()
    other = NetworkEma(Tiny(), EmaSettings())
    other.load_state_dict(ema.state_dict())
    assert all(torch.equal(other.average[k], ema.average[k]) for k in ema.average)
    with pytest.raises(ValueError, match="does not fit"):
        other.load_state_dict({"a": ema.average["a"]})
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict({"a": torch.zeros(1), "b": ema.average["b"]})


def test_metadata_says_which_weights_a_file_holds() -> None:
    ema = NetworkEma(Tiny(), EmaSettings(decay=0.99, every_n_steps=2))
    assert ema_metadata(None, 10) == {}
    assert ema_metadata(ema, 10) == {
        "loraforge_weights": "ema",
        "loraforge_ema_decay": 0.99,
        "loraforge_ema_updates": 5,
    }
    assert ema_metadata(ema, 10, raw=True) == {"loraforge_weights": "raw"}
