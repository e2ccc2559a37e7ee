"""Fixtures for the LyCORIS backend tests: configs, tiny SD1/SDXL models, one torch thread."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest

from loraforge.recipe import section_defaults
from loraforge.recipe.types import NetworkConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The schema's network defaults, with a small rank for tiny models.
_DEFAULTS = replace(section_defaults("network"), backend="lycoris", dim=4, alpha=2)


@pytest.fixture
def lyco_config() -> Callable[..., NetworkConfig]:
    """``make(**overrides)``: a lycoris NetworkConfig (dim 4, alpha 2) with fields changed."""

    def make(**overrides: Any) -> NetworkConfig:
        return replace(_DEFAULTS, **overrides)

    return make


@dataclass
class TinyModels:
    """A tiny model's UNet and text encoders (random weights, seeded)."""

    family: str
    unet: Any
    text_encoders: list[Any]


_CACHE: dict[str, dict[str, Any]] = {}


@pytest.fixture
def tiny_models() -> Callable[[str], TinyModels]:
    """``build(family)``: a fresh copy of the tiny ``sd1``/``sdxl`` model (same weights each time)."""
    from loraforge.models.tiny import build_tiny_components

    def build(family: str) -> TinyModels:
        if family not in _CACHE:
            _CACHE[family] = build_tiny_components(family, seed=0)
        parts = copy.deepcopy(_CACHE[family])
        encoders = [parts[k] for k in ("text_encoder", "text_encoder_2") if k in parts]
        return TinyModels(family, parts["unet"], encoders)

    return build


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """Tiny tensors on a shared 2-core machine run several times faster on one thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
