"""Adapter modules that ride on a base layer's ``forward`` without replacing it in the model.

Like sd-scripts' ``org_forward`` trick: the base module stays where it is (so its state-dict keys,
``.to()`` moves and checkpoint loading are untouched); we only set an instance attribute
``forward`` on it that calls the original forward and adds the adapter's output.
:meth:`HookedAdapter.restore` puts the original back, so hooks can be removed and re-applied
(and stack, last in first out, with another network hooked onto the same layer).

A :class:`FusedLinear` target is several Linears that read the same input and together are one
layer of another layout (FLUX's fused ``qkv``, ``linear1``; a layer whose output halves the two
layouts order differently): the adapter's output rows are split among them, as if the LoRA sat
on the fused layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn


class FusedLinear:
    """Linears reading one input, seen as one Linear of ``out_features`` rows.

    Args:
        layers: ``(linear, rows)`` per diffusers layer: ``rows[k]`` is the fused row that feeds
            the layer's output row ``k`` (every row of every layer is fed exactly once).
        out_features: rows of the fused layer.
    """

    def __init__(self, layers: Sequence[tuple[nn.Linear, Sequence[int]]], out_features: int):
        widths = {layer.in_features for layer, _ in layers}
        if len(widths) != 1:
            raise ValueError(f"fused layers must share their input width, got {sorted(widths)}")
        self.in_features = widths.pop()
        self.out_features = out_features
        self.layers = [(layer, _row_selector(rows, layer.out_features)) for layer, rows in layers]

    @property
    def weight(self) -> torch.Tensor:
        """The first layer's weight (for device and dtype)."""
        return self.layers[0][0].weight


def _row_selector(rows: Sequence[int], out_features: int) -> slice | torch.Tensor:
    if len(rows) != out_features:
        raise ValueError(f"a fused part must feed all {out_features} rows, got {len(rows)}")
    start = rows[0]
    if list(rows) == list(range(start, start + len(rows))):
        return slice(start, start + len(rows))
    return torch.tensor(list(rows), dtype=torch.long)


def target_shapes(target: Any) -> tuple[int, int, tuple[int, ...]]:
    """``(in_features, out_features, kernel_size)`` of a Linear or :class:`FusedLinear`
    (kernel ``()``) or Conv2d.

    Raises:
        TypeError: for anything else, or a grouped convolution (no SD model has one as a target).
    """
    if isinstance(target, nn.Linear | FusedLinear):
        return target.in_features, target.out_features, ()
    if isinstance(target, nn.Conv2d):
        if target.groups != 1:
            raise TypeError(f"grouped Conv2d (groups={target.groups}) cannot carry a LoRA")
        return target.in_channels, target.out_channels, tuple(target.kernel_size)
    raise TypeError(f"a LoRA target must be nn.Linear or nn.Conv2d, got {type(target).__name__}")


def updown(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The weight-shaped product ``up @ down`` of a kohya LoRA pair, in the dtype given.

    Linear: down ``(r, in)``, up ``(out, r)`` -> ``(out, in)``.
    Conv: down ``(r, in, kh, kw)``, up ``(out, r, 1, 1)`` -> ``(out, in, kh, kw)``.
    """
    if down.dim() == 2:
        return up @ down
    if down.shape[2:] == (1, 1):
        return (up.flatten(1) @ down.flatten(1))[:, :, None, None]
    # A conv with a 1x1 up is the same as contracting the rank axis of the two kernels.
    return torch.einsum("or,rihw->oihw", up.flatten(1), down)


class HookedAdapter(nn.Module, ABC):
    """Base of every native adapter module: hooking, multiplier, module dropout and weights.

    Args:
        lora_name: the kohya module name (``lora_unet_…``, ``lora_te1_…``).
        target: the base ``nn.Linear``/``nn.Conv2d`` or a :class:`FusedLinear`; kept by reference,
            not as a submodule, so it is neither saved with the network nor moved by
            ``network.to()``.
        dim: rank.
        alpha: scale numerator; ``None`` or 0 means ``dim`` (scale 1), as in sd-scripts.
        multiplier: strength applied in ``forward``.
        module_dropout: probability of skipping the whole module for one forward while training.
    """

    def __init__(
        self,
        lora_name: str,
        target: nn.Module,
        dim: int,
        alpha: float | None,
        *,
        multiplier: float = 1.0,
        module_dropout: float | None = None,
    ) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"{lora_name}: rank must be >= 1, got {dim}")
        self.lora_name = lora_name
        self.in_features, self.out_features, self.kernel_size = target_shapes(target)
        # object.__setattr__ bypasses nn.Module registration: the base layer is not ours.
        object.__setattr__(self, "target", target)
        self.dim = dim
        effective_alpha = float(dim) if alpha is None or alpha == 0 else float(alpha)
        self.register_buffer("alpha", torch.tensor(effective_alpha, device=target.weight.device))
        self.scale = effective_alpha / dim
        self.multiplier = multiplier
        self.module_dropout = module_dropout
        self._org_forward: Callable[..., torch.Tensor] | None = None
        # per hooked layer: (layer, its forward before us, whether that was an instance attribute)
        self._hooked: list[tuple[nn.Module, Callable[..., torch.Tensor], bool]] = []
        # fused target: [input, adapter output (None = module dropout), layers still to read it]
        self._shared: list[Any] | None = None

    # ---- hooking -------------------------------------------------------------------------
    def apply_to(self) -> None:
        """Route the target's forward (each fused layer's) through this module (idempotent)."""
        if self._hooked:
            return
        if isinstance(self.target, FusedLinear):
            layers = [(layer, rows) for layer, rows in self.target.layers]
        else:
            layers = [(self.target, None)]
        for layer, rows in layers:
            org = layer.forward
            self._hooked.append((layer, org, "forward" in layer.__dict__))
            layer.forward = (
                self.forward if rows is None else partial(self._fused_forward, org, rows)
            )
        self._org_forward = self._hooked[0][1]

    def restore(self) -> None:
        """Give the target(s) their own forward back (idempotent)."""
        for layer, org, had_own in reversed(self._hooked):
            if had_own:
                layer.forward = org
            else:
                del layer.__dict__["forward"]
        self._hooked = []
        self._org_forward = None
        self._shared = None

    def _fused_forward(
        self,
        org: Callable[..., torch.Tensor],
        rows: slice | torch.Tensor,
        x: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        """One fused layer: its base output plus its rows of the adapter output.

        The layers of one fused target read the same tensor; the adapter output (with its
        dropout draws) is computed once for it and shared, as on the fused original layer, and
        let go when the last layer has read it (it must not outlive the step).
        """
        base = org(x, *args, **kwargs)
        shared = self._shared
        if shared is None or shared[0] is not x:
            drop = (
                self.training and self.module_dropout and torch.rand(1).item() < self.module_dropout
            )
            shared = [x, None if drop else self.adapter_output(x), len(self._hooked)]
            self._shared = shared
        out = shared[1]
        shared[2] -= 1
        if shared[2] <= 0:
            self._shared = None
        if out is None:
            return base
        return base + out[..., rows].to(base.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus the adapter's.

        x: ``(B, …, in)`` for a Linear target, ``(B, in, H, W)`` for a Conv2d. Extra arguments
        go to the base forward only (some wrappers pass e.g. a ``scale``).
        """
        if self._org_forward is None:
            raise RuntimeError(f"{self.lora_name}: call apply_to() before running the adapter")
        base = self._org_forward(x, *args, **kwargs)
        if self.training and self.module_dropout and torch.rand(1).item() < self.module_dropout:
            return base
        return base + self.adapter_output(x).to(base.dtype)

    # ---- what each algorithm provides ---------------------------------------------------------
    @abstractmethod
    def adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        """``up(down(x)) * scale * multiplier`` (with the algorithm's training-time variations)."""

    @abstractmethod
    def down_weight(self) -> torch.Tensor:
        """The full ``lora_down.weight`` (kohya layout), detached."""

    @abstractmethod
    def up_weight(self) -> torch.Tensor:
        """The full ``lora_up.weight`` (kohya layout), detached."""

    @abstractmethod
    def load_down_up(self, down: torch.Tensor, up: torch.Tensor) -> None:
        """Copy kohya-layout tensors into the parameters (shapes already checked)."""

    @abstractmethod
    def scale_weights_(self, ratio: float) -> None:
        """Multiply the delta ``up @ down`` by ``ratio`` in place (max-norm regularisation)."""

    @abstractmethod
    def up_parameters(self) -> list[nn.Parameter]:
        """Parameters of the up projection (LoRA+ trains these with a larger lr)."""

    # ---- shared ------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimizer may update."""
        return list(self.parameters())

    def down_shape(self) -> tuple[int, ...]:
        return (self.dim, self.in_features, *self.kernel_size)

    def up_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.dim) + ((1, 1) if self.kernel_size else ())

    def delta_weight(self, multiplier: float | None = None) -> torch.Tensor:
        """The change this module makes to the target weight, float32, target-weight shaped.

        Args:
            multiplier: strength; ``None`` uses the module's current multiplier.
        """
        strength = self.multiplier if multiplier is None else multiplier
        product = updown(self.down_weight().float(), self.up_weight().float())
        return product * (self.scale * strength)

    @torch.no_grad()
    def merge_into_target(self, multiplier: float | None = None) -> None:
        """Add :meth:`delta_weight` to the target's weight (float32 sum, its own dtype); a fused
        target's layers each get their rows."""
        delta = self.delta_weight(multiplier)
        if isinstance(self.target, FusedLinear):
            layers = self.target.layers
        else:
            layers = [(self.target, slice(None))]
        for layer, rows in layers:
            weight = layer.weight
            part = delta[rows].to(weight.device)
            weight.copy_((weight.float() + part).to(weight.dtype))

    def kohya_tensors(self) -> dict[str, torch.Tensor]:
        """The three tensors sd-scripts saves for this module, keyed by suffix."""
        return {
            "lora_down.weight": self.down_weight(),
            "lora_up.weight": self.up_weight(),
            "alpha": self.alpha.detach(),
        }
