"""The small protocol every network backend implements (native kohya family, LyCORIS).

A backend turns a ``NetworkConfig`` plus the loaded models into a :class:`Network`: a
``torch.nn.Module`` holding only the adapter parameters. The training loop, sampling, saving and
the merge command talk to that object only through the methods below.

Lifecycle::

    network = get_backend(config.backend).create(config, family, unet, text_encoders)
    network.apply_to()                      # hook into the base layers (they stay in the model)
    network.load_weights(load_file(path))   # optional: continue from / resume a LoRA
    optimizer = AdamW(network.param_groups(unet_lr, text_encoder_lr))
    ... train; network.apply_max_norm(...) after each step if asked ...
    tensors = network.state_dict_for_save(torch.float16)
    save_file(tensors, path, metadata={**network.metadata(), ...})

Everything the adapter needs from the recipe (per-block lr weights, LoRA+ ratio, dropouts,
multiplier) is read once in ``create``: per-block weights also decide which modules exist
(weight 0 = no module), so they cannot be a late argument of ``param_groups``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from loraforge.recipe.types import NetworkConfig


class MaxNormResult(NamedTuple):
    """What max-norm regularisation did (sd-scripts logs these three numbers).

    Attributes:
        keys_scaled: how many modules were scaled down.
        mean_norm: mean norm of the module deltas after scaling.
        max_norm: largest norm after scaling.
    """

    keys_scaled: int
    mean_norm: float
    max_norm: float


@dataclass(frozen=True)
class LoadResult:
    """Keys a non-strict :meth:`Network.load_weights` could not match.

    Attributes:
        missing: module names of the network that the state dict has no tensors for.
        unexpected: keys of the state dict that belong to no module of the network.
    """

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()


class Network(nn.Module, ABC):
    """An adapter network hooked onto a UNet and its text encoders.

    Parameters live in this module; the base models are only referenced. ``train()``/``eval()``
    switch the adapter's training-only behaviour (dropouts, DyLoRA rank sampling).
    """

    @abstractmethod
    def apply_to(self) -> None:
        """Hook every module into its base layer's forward (idempotent)."""

    @abstractmethod
    def restore(self) -> None:
        """Remove the hooks: the base model computes exactly what it did before (idempotent)."""

    @abstractmethod
    def set_multiplier(self, multiplier: float) -> None:
        """Strength of the adapter in the hooked forward (0 = off, 1 = as trained)."""

    @abstractmethod
    def param_groups(self, unet_lr: float, text_encoder_lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups: ``{"params": [...], "lr": float, "name": str}``.

        Groups whose lr comes out as 0 are left out and their parameters frozen. ``name`` is a
        label for logging (``textencoder``, ``unet``, ``unet_block5``, ``… plus`` for LoRA+).
        """

    @abstractmethod
    def state_dict_for_save(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The tensors to write, on the CPU, contiguous, in ``dtype``, with interop key names."""

    @abstractmethod
    def load_weights(
        self, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True
    ) -> LoadResult:
        """Load tensors in the saved format (a file written by this backend or by sd-scripts).

        Raises:
            LoraFileError: a tensor's shape does not fit, or (``strict``) keys are missing or
                left over.
        """

    @abstractmethod
    def merge_into_base(self, multiplier: float = 1.0) -> None:
        """Add the adapter's weight delta into the base layers and remove the hooks."""

    @abstractmethod
    def apply_max_norm(self, max_norm: float) -> MaxNormResult:
        """sd-scripts' ``scale_weight_norms``: shrink modules whose delta norm > ``max_norm``."""

    @abstractmethod
    def metadata(self) -> dict[str, str]:
        """``ss_network_module``, ``ss_network_dim``, ``ss_network_alpha`` (and ``ss_network_args``
        when sd-scripts would write it) exactly as sd-scripts writes them for this algorithm."""

    def trainable_parameter_count(self) -> int:
        """Number of scalars the optimizer will update."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


class NetworkBackend(Protocol):
    """Builds networks of one backend."""

    name: str

    def create(
        self,
        config: NetworkConfig,
        family: str,
        unet: nn.Module,
        text_encoders: Sequence[nn.Module],
    ) -> Network:
        """A new, not yet applied network for a resolved family.

        Args:
            config: the recipe's network section.
            family: the resolved model family.
            unet: the diffusers UNet.
            text_encoders: one text encoder (SD1/SD2) or two (SDXL), in order.

        Raises:
            RecipeError: the config asks for something this backend cannot do.
            DependencyError: the backend's package is missing.
        """
        ...
