"""Network backends behind one protocol (see :mod:`loraforge.backends.base`).

``kohya``: the native LoRA family (:mod:`loraforge.backends.kohya`); ``lycoris``: LyCORIS
algorithms through the lycoris-lora package (:mod:`loraforge.backends.lycoris`, class
``LycorisBackend``). Backends are imported only when asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from loraforge.errors import RecipeError

if TYPE_CHECKING:
    from torch import nn

    from loraforge.backends.base import Network, NetworkBackend
    from loraforge.recipe.types import NetworkConfig

_BACKENDS = {
    "kohya": ("loraforge.backends.kohya", "KohyaBackend"),
    "lycoris": ("loraforge.backends.lycoris", "LycorisBackend"),
}


def get_backend(name: str) -> NetworkBackend:
    """The backend called ``name`` (``network.backend`` in the recipe).

    Raises:
        RecipeError: no such backend.
    """
    if name not in _BACKENDS:
        raise RecipeError(
            f"network.backend: unknown backend {name!r}",
            hint=f"use one of: {', '.join(_BACKENDS)}",
        )
    module_name, class_name = _BACKENDS[name]
    return getattr(importlib.import_module(module_name), class_name)()


_CONFIG_CHECKS = {
    "kohya": "loraforge.backends.kohya_config",
    "lycoris": "loraforge.backends.lycoris_config",
}


def check_network_config(config: NetworkConfig) -> None:
    """What the backend itself refuses, without building anything (torch-free; for `check`).

    Raises:
        RecipeError: naming the field and the fix.
    """
    if config.backend not in _CONFIG_CHECKS:
        get_backend(config.backend)  # raises the unknown-backend error
    importlib.import_module(_CONFIG_CHECKS[config.backend]).check_config(config)


def create_network(
    config: NetworkConfig,
    family: str,
    unet: nn.Module,
    text_encoders: Sequence[nn.Module],
) -> Network:
    """Build the (not yet applied) network the recipe's network section asks for.

    Args:
        config: the recipe's network section.
        family: the resolved model family (``sd1``, ``sd2``, ``sd2-v``, ``sdxl``).
        unet: the diffusers UNet.
        text_encoders: one (SD1/SD2) or two (SDXL) text encoders, in order.

    Raises:
        RecipeError: the backend cannot do what the config asks.
        DependencyError: the backend's package is missing.
    """
    return get_backend(config.backend).create(config, family, unet, text_encoders)
