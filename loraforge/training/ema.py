"""An exponential moving average (EMA) of the network's trainable weights (``training.ema``).

After optimizer step ``s`` (1-based, the run's global step):

- ``s <= start_step``: the average is a copy of the weights;
- otherwise every ``every_n_steps``-th step counted from ``start_step`` is an update; the
  ``n``-th update (1-based) moves the average towards the weights with the decay ``d_n``:
  ``ema = d_n * ema + (1 - d_n) * weights``, where ``d_n = decay``, or with ``warmup``
  ``d_n = min(decay, (1 + n) / (10 + n))`` (diffusers' ``EMAModel`` without ``use_ema_warmup``),
  so the first updates are not dominated by the untrained initial weights.

The average starts as the network's weights when the run starts. It is kept in float32 (a
bf16 average would barely move at decay 0.999), on the network's device or on the CPU. Which
update a step is follows from the step alone, so a resumed run needs only the average itself
(saved in the state folder) to continue bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from loraforge.training.settings import EmaSettings

EMA_FILE = "ema.safetensors"


class NetworkEma:
    """The average of ``network``'s trainable parameters (those with ``requires_grad`` now).

    Args:
        network: the network, as built (before its first step).
        settings: decay, schedule and placement.
    """

    def __init__(self, network: nn.Module, settings: EmaSettings) -> None:
        self.settings = settings
        cpu = settings.device == "cpu"
        self.average: dict[str, torch.Tensor] = {
            name: p.detach().to(device="cpu" if cpu else p.device, dtype=torch.float32, copy=True)
            for name, p in network.named_parameters()
            if p.requires_grad
        }

    @torch.no_grad()
    def update(self, network: nn.Module, step: int) -> None:
        """Account for optimizer step ``step`` (1-based) having updated ``network``."""
        s = self.settings
        params = dict(network.named_parameters())
        if step <= s.start_step:
            for name, average in self.average.items():
                average.copy_(params[name].detach())
            return
        if (step - s.start_step) % s.every_n_steps:
            return
        weight = 1.0 - s.decay_of_update(s.updates_until(step))
        for name, average in self.average.items():
            weights = params[name].detach().to(average.device, torch.float32)
            average.lerp_(weights, weight)

    @contextlib.contextmanager
    def applied(self, network: nn.Module) -> Iterator[None]:
        """Put the averaged weights into ``network`` for the block (saving, sampling), and the
        raw ones back, exactly, afterwards."""
        params = dict(network.named_parameters())
        keep = "cpu" if self.settings.device == "cpu" else None
        with torch.no_grad():
            raw = {name: params[name].detach().to(keep, copy=True) for name in self.average}
            for name, average in self.average.items():
                params[name].copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, saved in raw.items():
                    params[name].copy_(saved)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The average, by parameter name (what a state folder stores)."""
        return dict(self.average)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore a saved average (bit for bit).

        Raises:
            ValueError: the names or shapes differ from this network's.
        """
        if set(state) != set(self.average):
            missing = sorted(set(self.average) - set(state))
            extra = sorted(set(state) - set(self.average))
            raise ValueError(
                f"the saved EMA does not fit ({len(missing)} tensors missing, "
                f"{len(extra)} unexpected)"
            )
        with torch.no_grad():
            for name, average in self.average.items():
                if state[name].shape != average.shape:
                    raise ValueError(
                        f"the saved EMA of {name} has shape {tuple(state[name].shape)}"
                    )
                average.copy_(state[name])


def ema_metadata(ema: NetworkEma | None, step: int, *, raw: bool = False) -> dict[str, Any]:
    """Metadata saying which weights a file holds (``loraforge_weights``: ``ema`` or ``raw``)
    and how many averaging updates the average has had; empty without an EMA."""
    if ema is None:
        return {}
    if raw:
        return {"loraforge_weights": "raw"}
    s = ema.settings
    return {
        "loraforge_weights": "ema",
        "loraforge_ema_decay": s.decay,
        "loraforge_ema_updates": s.updates_until(step),
    }
