"""Measure the live tensor bytes of a real ``loraforge train`` run, as the trace measures its step.

:class:`MemoryProbe` is a :class:`~loraforge.training.loop.StepProbe`: handed to
:func:`loraforge.training.loop.train`, it counts what is on the training device at the start of
a chosen optimizer step (frozen weights that live there, the network, the optimizer state),
then tracks every storage created until a later step ends, with the tracker and the categories
the traced estimate uses. The tests compare its peak with the trace's; ``benchmarks/`` use it
on a GPU run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from loraforge.vram.tracker import LiveBytesTracker


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def optimizer_state_tensors(optimizer: Any) -> list[torch.Tensor]:
    """Every tensor in the optimizer's per-parameter state."""
    return [
        value
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    ]


def register_resident(
    tracker: LiveBytesTracker,
    unet: nn.Module,
    text_encoders: Sequence[nn.Module],
    vae: nn.Module | None,
    network: nn.Module,
    optimizer: Any,
    off_device: Sequence[nn.Module] = (),
) -> None:
    """Count the tensors that live on the device for the whole run.

    Args:
        text_encoders: the encoders on the device (none when their outputs are cached).
        vae: the VAE when it encodes live, else ``None``.
        off_device: parts of ``unet`` kept in CPU memory (SD3 / FLUX swapped blocks).
    """
    tracker.register(_tensors(network), "network weights")
    away = {id(t) for module in off_device for t in _tensors(module)}
    tracker.register([t for t in _tensors(unet) if id(t) not in away], "unet weights")
    for index, encoder in enumerate(text_encoders):
        tracker.register(_tensors(encoder), f"text encoder {index + 1} weights")
    if vae is not None:
        tracker.register(_tensors(vae), "vae weights")
    tracker.register(optimizer_state_tensors(optimizer), "optimizer state")


@contextlib.contextmanager
def categorize_by_module(
    tracker: LiveBytesTracker,
    unet: nn.Module,
    text_encoders: Sequence[nn.Module],
    vae: nn.Module | None,
) -> Iterator[None]:
    """Name what each model's forward (and what follows it) allocates after that model."""
    hooked: list[tuple[nn.Module, str]] = [(unet, "unet activations")]
    hooked += [(encoder, "text encoder activations") for encoder in text_encoders]
    if vae is not None:
        hooked.append((vae.encoder, "vae encode"))
    handles = [
        module.register_forward_pre_hook(lambda *_, c=category: tracker.phase(c))
        for module, category in hooked
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class MemoryProbe:
    """Peak live tensor bytes on the training device over optimizer steps ``first``..``last``.

    Args:
        run: the :class:`~loraforge.training.setup.TrainingRun` to watch.
        first, last: the optimizer steps to measure (1-based, inclusive; default 2 and 3, the
            first steady-state steps: step 1 creates the optimizer state).

    Attributes:
        tracker: the tracker; ``tracker.peak`` and ``tracker.live_at_peak()`` after the run.
        done: the measured steps have all run.
    """

    def __init__(self, run: Any, first: int = 2, last: int = 3) -> None:
        self.run = run
        self.first, self.last = first, last
        self.tracker = LiveBytesTracker()
        self.done = False
        self._stack: contextlib.ExitStack | None = None

    def _device_models(self) -> tuple[nn.Module, list[nn.Module], nn.Module | None]:
        conditioning = self.run.loss_setup.conditioning
        encoders = list(conditioning.text_encoders) if conditioning.text_cache is None else []
        vae = conditioning.vae if conditioning.latent_cache is None else None
        return self.run.loss_setup.unet, encoders, vae

    def step_starts(self, step: int) -> None:
        if step != self.first or self._stack is not None:
            return
        unet, encoders, vae = self._device_models()
        register_resident(self.tracker, unet, encoders, vae, self.run.network, self.run.optimizer)
        self.tracker.reset_peak()
        stack = contextlib.ExitStack()
        stack.enter_context(self.tracker)
        stack.enter_context(categorize_by_module(self.tracker, unet, encoders, vae))
        self.tracker.phase("inputs")
        self._stack = stack

    def step_ended(self, step: int) -> None:
        if self._stack is None:
            return
        if step >= self.last:
            self._stack.close()
            self._stack = None
            self.done = True
        else:
            self.tracker.phase("inputs")
