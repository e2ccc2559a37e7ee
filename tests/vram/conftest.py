"""Helpers for the VRAM tests: recipes from small dicts, the tiny architectures."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from loraforge.recipe import Recipe, parse_recipe_text


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def recipe_from(sections: dict[str, Any], family: str = "sd1") -> Recipe:
    """A valid recipe: a hub-style base of ``family`` plus ``sections`` (merged in)."""
    doc = {
        "model": {"base": "example/model", "family": family},
        "dataset": {"resolution": 512, "subsets": [{"dir": "images"}]},
        "network": {"dim": 8, "alpha": 4},
    }
    text = yaml.safe_dump(_merge(doc, sections))
    return parse_recipe_text(text, base_dir=Path("/tmp"))


def tiny_architecture(family: str):
    """The tiny model's architecture (configs only, nothing written)."""
    from loraforge.models.tiny import tiny_component_configs
    from loraforge.vram.arch import COMPONENTS, Architecture

    configs = tiny_component_configs(family)
    return Architecture(family, {k: v for k, v in configs.items() if k in COMPONENTS}, "tiny")
