"""Shared helpers for the network-backend tests: configs, hand-made targets, tiny models."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import ClassVar

import pytest
import torch
from torch import nn

from loraforge.backends.kohya import KohyaNetwork
from loraforge.backends.kohya_blocks import rank_plan
from loraforge.models.naming import block_index
from loraforge.recipe import section_defaults
from loraforge.recipe.types import NetworkConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The schema's defaults for the network section (schema/recipe.schema.json).
_DEFAULTS = replace(section_defaults("network"), backend="kohya")


def _make_config(**overrides: object) -> NetworkConfig:
    return replace(_DEFAULTS, **overrides)


def _randomize(network: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


@pytest.fixture
def make_config() -> Callable[..., NetworkConfig]:
    """``make_config(**fields)``: a NetworkConfig with the schema defaults and those fields."""
    return _make_config


@pytest.fixture
def randomize() -> Callable[..., None]:
    """``randomize(network, seed=0)``: non-zero random adapter weights (up starts at zero)."""
    return _randomize


class HandModel(nn.Module):
    """Tiny stand-ins for SD layers, each with the kohya name of a real layer (``NAMES``).

    sd1 block indices of those names: down attention and proj_in 1, middle 12, up blocks 14.
    """

    NAMES: ClassVar[dict[str, str]] = {
        "attn_q": "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "proj_in": "lora_unet_down_blocks_0_attentions_0_proj_in",
        "mid_q": "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q",
        "resnet_conv": "lora_unet_up_blocks_0_resnets_1_conv1",
        "up_ff": "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_ff_net_2",
        "te_q": "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    }

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.attn_q = nn.Linear(6, 5)
        self.proj_in = nn.Conv2d(6, 4, 1)
        self.mid_q = nn.Linear(6, 6, bias=False)
        self.resnet_conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.up_ff = nn.Linear(6, 7)
        self.te_q = nn.Linear(6, 6)

    def targets(self, *, conv: bool) -> dict[str, nn.Module]:
        """kohya name -> layer (the 3x3 conv only with ``conv``), like ``lora_targets``."""
        return {
            name: getattr(self, attr)
            for attr, name in self.NAMES.items()
            if conv or attr != "resnet_conv"
        }


def _hand_network(model: HandModel, **overrides: object) -> KohyaNetwork:
    config = _make_config(**overrides)
    plan = rank_plan(config, "sd1")
    return KohyaNetwork(
        config, plan, model.targets(conv=plan.uses_conv), partial(block_index, "sd1")
    )


@pytest.fixture
def hand_model() -> HandModel:
    return HandModel()


@pytest.fixture
def hand_network() -> Callable[..., KohyaNetwork]:
    """``hand_network(model, **fields)``: a KohyaNetwork on a HandModel (family sd1)."""
    return _hand_network


@pytest.fixture
def tiny_components() -> Callable[[str], dict[str, nn.Module]]:
    """``tiny_components(family)``: fresh tiny UNet and text encoders (random, seeded, eval)."""
    from loraforge.models.tiny import build_tiny_components

    def build(family: str) -> dict[str, nn.Module]:
        components = build_tiny_components(family, seed=0)
        components.pop("vae")
        return components

    return build
