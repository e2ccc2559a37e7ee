"""Build, hook and load lycoris-lora modules, one per target layer.

Modules are lycoris-lora's own classes (``LoConModule``, ``LohaModule``, ``LokrModule`` …),
created with the same arguments its kohya wrapper passes, under loraforge's kohya names. Four
classes get a thin subclass here because lycoris-lora 4.1.3 cannot do what a training tool needs
with them as they are:

* DyLoRA: its ``load_state_dict`` is a no-op; its eval forward and merge still draw a random
  rank; it scales the ``b+1`` active blocks by ``alpha/(b+1)`` (not per rank), so the saved file
  (``alpha/dim`` at full rank, as every reader applies it) did not match what was trained when the
  block size is not 1; and it saves conv ``lora_up`` as ``(out, r)``, which its own LoCon reader
  cannot copy into a 1x1 conv. The subclass scales by ``alpha/active_rank``, uses the full rank
  outside training, saves ``(out, r, 1, 1)`` and loads.
* LoHa/LoKr: ``get_diff_weight`` (used by ``merge_to``) applied ``alpha/dim`` twice and left
  out the trained scalar; LoKr's rank-dropout mask was made on the CPU whatever the device.
* Full: ``apply_to`` after ``restore`` added the base weight a second time, and ``restore``
  left a CPU copy with ``requires_grad=True`` in the base layer. The subclass makes the pair
  repeatable and puts the weight back where and as it was.

This module imports lycoris; import it only after checking the package is installed.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from lycoris.modules import (
    ButterflyOFTModule,
    DiagOFTModule,
    DyLoraModule,
    FullModule,
    GLoRAModule,
    IA3Module,
    LoConModule,
    LohaModule,
    LokrModule,
    NormModule,
)
from lycoris.modules.base import LycorisBaseModule
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from loraforge.backends.lycoris_config import LycorisOptions
from loraforge.backends.lycoris_targets import Target
from loraforge.console import warn
from loraforge.errors import LoraFileError, RecipeError


class LoraforgeDyLoraModule(DyLoraModule):
    """lycoris-lora's DyLoRA with a rank-consistent scale, a deterministic eval path and loading."""

    def get_weight(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Down/up over the blocks up to ``rank`` (lower ones detached), scale alpha/active rank."""
        down, up, _ = super().get_weight(rank)
        return down, up, self.alpha / down.shape[0]

    def _rank(self, rank: int | None) -> int | None:
        # None keeps lycoris-lora's random draw, which only training should see
        return rank if rank is not None or self.training else self.lora_dim

    def get_diff_weight(self, multiplier=1, shape=None, device=None, rank=None):
        return super().get_diff_weight(multiplier, shape, device, self._rank(rank))

    def get_merged_weight(self, multiplier=1, shape=None, device=None, rank=None):
        return super().get_merged_weight(multiplier, shape, device, self._rank(rank))

    def custom_state_dict(self) -> dict[str, torch.Tensor]:
        state = super().custom_state_dict()
        up = state["lora_up.weight"]
        state["lora_up.weight"] = up.reshape(*up.shape, *([1] * (len(self.shape) - 2)))
        return state

    @torch.no_grad()
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Split full-rank ``lora_down``/``lora_up`` into the rank blocks; take ``alpha``."""
        down = state_dict["lora_down.weight"].reshape(self.lora_dim, -1)
        up = state_dict["lora_up.weight"].reshape(self.shape[0], self.lora_dim)
        size = self.block_size
        for i, (down_block, up_block) in enumerate(zip(self.down_list, self.up_list, strict=True)):
            down_block.copy_(down[i * size : (i + 1) * size])
            up_block.copy_(up[:, i * size : (i + 1) * size])
        if "alpha" in state_dict:
            self.alpha.copy_(state_dict["alpha"])
        return _IncompatibleKeys([], [])


class _ScaleOnceMixin:
    """LoHa/LoKr: ``get_diff_weight`` as their forward computes it.

    In lycoris-lora 4.1.3 ``get_weight`` already applies ``alpha/dim`` and ``get_diff_weight``
    applies it again and drops the trained scalar, so merges (and anything built on the diff)
    disagreed with the forward and with every file reader whenever ``alpha != dim``.
    """

    def get_diff_weight(self, multiplier=1, shape=None, device=None):
        weight = self.get_weight(self.shape if shape is None else shape)
        diff = weight * self.scalar.to(weight) * multiplier
        return (diff if device is None else diff.to(device)), None


class LoraforgeLohaModule(_ScaleOnceMixin, LohaModule):
    """lycoris-lora's LoHa with a merge that matches its forward."""


class LoraforgeLokrModule(_ScaleOnceMixin, LokrModule):
    """lycoris-lora's LoKr with a merge that matches its forward, and rank dropout on any device."""

    def get_weight(self, shape):
        rate = self.rank_dropout
        if not (self.training and rate):
            return super().get_weight(shape)
        # lycoris-lora draws this mask on the CPU and multiplies it into a weight on the GPU
        self.rank_dropout = 0.0
        try:
            weight = super().get_weight(shape)
        finally:
            self.rank_dropout = rate
        drop = (torch.rand(weight.size(0), device=weight.device) > rate).to(weight.dtype)
        if self.rank_dropout_scale:
            drop = drop / drop.mean()
        return weight * drop.view(-1, *[1] * (weight.dim() - 1))


class LoraforgeFullModule(FullModule):
    """lycoris-lora's full fine-tuning module, safe to apply, restore and apply again."""

    _base_requires_grad = False

    def apply_to(self, **kwargs: Any) -> None:
        base = self.org_module[0]
        self._base_requires_grad = base.weight.requires_grad
        if not self.is_diff:
            # restored earlier: self.weight holds base + diff; make it a diff again
            self.weight.data.sub_(base.weight.data.to(self.weight))
            if self.bias is not None and base.bias is not None:
                self.bias.data.sub_(base.bias.data.to(self.bias))
            self.is_diff = True
        super().apply_to(**kwargs)

    def restore(self) -> None:
        super().restore()
        base = self.org_module[0]
        for name in ("weight", "bias"):
            param = getattr(base, name, None)
            if isinstance(param, nn.Parameter):
                param.data = param.data.to(self.weight.device, copy=True)  # own storage
                param.requires_grad_(self._base_requires_grad)

    def reset_(self) -> None:
        """Make the module a no-op (before loading a diff into it)."""
        with torch.no_grad():
            if self.is_diff:
                self.weight.zero_()
                if self.bias is not None:
                    self.bias.zero_()
            else:
                self.weight.copy_(self.org_weight.to(self.weight))
                if self.bias is not None and self.org_bias is not None:
                    self.bias.copy_(self.org_bias[0].to(self.bias))


MODULE_CLASSES: dict[str, type[LycorisBaseModule]] = {
    "lora": LoConModule,
    "locon": LoConModule,
    "loha": LoraforgeLohaModule,
    "lokr": LoraforgeLokrModule,
    "ia3": IA3Module,
    "dylora": LoraforgeDyLoraModule,
    "diag-oft": DiagOFTModule,
    "boft": ButterflyOFTModule,
    "full": LoraforgeFullModule,
    "glora": GLoRAModule,
}


def build_module(target: Target, options: LycorisOptions, multiplier: float) -> LycorisBaseModule:
    """The lycoris-lora module for one target, with the arguments its kohya wrapper would pass.

    A target on the ``meta`` device (a dry run counting parameters) gets a module on ``meta``.

    Raises:
        RecipeError: lycoris-lora refuses the layer with these settings (e.g. a BOFT block size
            that does not divide the layer's width).
    """
    weight = getattr(target.module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_meta:
        return _build_on_meta(target, options, multiplier)
    return _build(target, options, multiplier)


def _build(target: Target, options: LycorisOptions, multiplier: float) -> LycorisBaseModule:
    algorithm = str(target.options.get("algo", options.algorithm))
    try:
        if target.kind == "norm":
            return NormModule(
                target.lora_name,
                target.module,
                multiplier,
                rank_dropout=options.rank_dropout,
                module_dropout=options.module_dropout,
                bypass_mode=False,
            )
        is_conv = target.kind == "conv"
        kwargs = {**options.module_kwargs}
        kwargs.update({k: v for k, v in target.options.items() if k != "algo"})
        return MODULE_CLASSES[algorithm](
            target.lora_name,
            target.module,
            multiplier,
            lora_dim=options.conv_dim if is_conv else options.dim,
            alpha=options.conv_alpha if is_conv else options.alpha,
            dropout=options.dropout,
            rank_dropout=options.rank_dropout,
            module_dropout=options.module_dropout,
            **kwargs,
        )
    except (ValueError, AssertionError) as e:
        raise RecipeError(
            f"network: lycoris-lora cannot build {algorithm} on {target.lora_name}: {e}",
            hint="change network.dim / conv_dim (for OFT/BOFT: the block size) or the preset",
        ) from e


def _build_on_meta(target: Target, options: LycorisOptions, multiplier: float) -> LycorisBaseModule:
    """Build against an uninitialised CPU copy of the layer (DoRA and Full read the base weight
    on the CPU, which a meta tensor cannot give), move the module to ``meta`` and point it back
    at the real layer, so at most one layer's worth of CPU memory is used at a time."""
    layer = target.module
    stand_in = layer
    if isinstance(layer, nn.Linear):
        stand_in = nn.utils.skip_init(
            nn.Linear, layer.in_features, layer.out_features, bias=layer.bias is not None
        )
    elif isinstance(layer, nn.Conv2d):
        stand_in = nn.utils.skip_init(
            nn.Conv2d,
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=layer.bias is not None,
        )
    module = _build(
        Target(target.lora_name, stand_in, target.is_unet, target.kind, target.options),
        options,
        multiplier,
    )
    module.to("meta")
    module.org_module = [layer]
    module.org_forward = layer.forward
    if isinstance(module, FullModule):
        module._org_weight = [layer.weight.detach()]
        module.org_bias = None if layer.bias is None else [layer.bias.detach()]
    return module


@contextlib.contextmanager
def lycoris_messages_to_console() -> Iterator[None]:
    """Route lycoris-lora's output while modules are built: its warnings (log records and
    ``print`` calls, which go to stdout, once per module) to loraforge's warnings on stderr,
    each message once; its INFO chatter is dropped. Its logger is put back as it was."""
    from lycoris.logging import logger

    seen: set[str] = set()

    def report(message: str) -> None:
        message = message.strip()
        if message and message not in seen:
            seen.add(message)
            warn(f"lycoris-lora: {message}")

    class _Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            report(record.getMessage())

    handlers, level = list(logger.handlers), logger.level
    logger.handlers = [_Forward(logging.WARNING)]
    logger.setLevel(logging.WARNING)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            yield
    finally:
        logger.handlers = handlers
        logger.setLevel(level)
        for line in printed.getvalue().splitlines():
            report(line.removeprefix("[WARN]"))


def apply_module(module: LycorisBaseModule) -> None:
    """Hook ``module`` into its base layer's forward (call once per restore)."""
    module.apply_to()


def restore_module(module: LycorisBaseModule) -> None:
    """Unhook ``module``; drop the instance ``forward`` lycoris-lora leaves on the base layer."""
    module.restore()
    base = module.org_module[0]
    left = base.__dict__.get("forward")
    if getattr(left, "__func__", None) is type(base).forward and "_lycoris_wrappers" not in (
        base.__dict__
    ):
        del base.__dict__["forward"]


def _fit(tensor: torch.Tensor, shape: torch.Size, key: str) -> torch.Tensor:
    """``tensor`` in ``shape``; differences in size-1 axes only (Linear vs 1x1 conv) reshape."""
    if tensor.shape == shape:
        return tensor
    if key.endswith(".dora_scale") and tuple(tensor.shape[:2]) != tuple(shape[:2]):
        # (out, 1) and (1, in) squeeze alike on a square layer: never reshape one into the other
        raise LoraFileError(
            f"{key}: the file's DoRA magnitude {tuple(tensor.shape)} is {_dora_axis(tensor.shape)}, "
            f"the network's {tuple(shape)} is {_dora_axis(shape)}",
            hint="set network.args.wd_on_output to true for a per-output-row file "
            "(lycoris-lora's default), leave it out for a per-input-column one",
        )
    squeeze = [d for d in tensor.shape if d != 1]
    if squeeze == [d for d in shape if d != 1]:
        return tensor.reshape(shape)
    raise LoraFileError(
        f"{key}: shape {tuple(tensor.shape)} does not fit the network's {tuple(shape)}",
        hint="the file was trained with another rank, algorithm option or model; match "
        "network.dim / conv_dim / args to the file",
    )


def _dora_axis(shape: tuple[int, ...] | torch.Size) -> str:
    return "per input column" if shape[0] == 1 and len(shape) > 1 else "per output row"


@torch.no_grad()
def load_module(module: LycorisBaseModule, tensors: Mapping[str, torch.Tensor]) -> None:
    """Load one module's tensors (suffix -> tensor, as the module saves them).

    The scale is re-derived from the file's ``alpha``, and a trained scalar (``use_scalar``,
    max-norm) is reset to 1 because the saved tensors already carry it.

    Raises:
        LoraFileError: the tensors are not the ones this module saves, or shapes do not fit.
    """
    expected = module.state_dict()
    if set(tensors) != set(expected):
        raise LoraFileError(
            f"{module.lora_name}: the file has {sorted(tensors)}, the network expects "
            f"{sorted(expected)}",
            hint="the file was trained with another algorithm or algorithm option "
            "(use_tucker, dora_wd, decompose_both, rescaled…); match network.algorithm/args",
        )
    fitted = {
        k: _fit(t, expected[k].shape, f"{module.lora_name}.{k}").to(expected[k].dtype)
        for k, t in tensors.items()
    }
    if isinstance(module, LoraforgeFullModule):
        module.reset_()
    module.load_state_dict(fitted, strict=True)
    _sync_after_load(module)


def _sync_after_load(module: LycorisBaseModule) -> None:
    scalar = getattr(module, "scalar", None)
    if isinstance(scalar, torch.Tensor):
        scalar.fill_(1.0)
    alpha = getattr(module, "alpha", None)
    if not isinstance(alpha, torch.Tensor):
        return
    if isinstance(module, DiagOFTModule | ButterflyOFTModule):
        module.constraint = float(alpha) * module.dim  # lycoris-lora: constraint * out_dim
    elif isinstance(module, LoConModule | LohaModule | LokrModule | GLoRAModule):
        module.scale = float(alpha) / module.lora_dim
