"""Which layers a LyCORIS preset trains, under loraforge's kohya names.

lycoris-lora's kohya wrapper picks layers by class name (``unet_target_module``: every layer
inside a ``Transformer2DModel``, ``ResnetBlock2D``…) and by module path (``unet_target_name``:
``conv_in``, ``time_embedding.linear_1``…), and names them from ``named_modules()``. We read
the same preset definitions from ``lycoris.config.PRESET`` (copies: nothing is written to
lycoris-lora's class-level state, so two networks in one process cannot leak settings), select
the layers the same way, and name each one with :mod:`loraforge.models.naming` so SDXL UNet
layers get SGM names and text-encoder layers ``text_model_encoder_…`` whatever transformers
calls them. A layer reached twice (by class and by name, as diffusers' ``time_embedding`` is
with the ``full`` preset) is taken once, which is what lycoris-lora's own duplicate-name
assertion trips over on a diffusers UNet.

Two readings differ from lycoris-lora on purpose, so presets mean on a diffusers UNet what they
mean on sd-scripts' UNet: the attention classes sd-scripts calls ``CrossAttention`` /
``SelfAttention`` are diffusers' ``Attention``; and a target name also matches a path that ends
with it (``to_k`` matches ``…attn1.to_k``), as the ``ia3`` preset intends.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from loraforge.errors import RecipeError

if TYPE_CHECKING:
    from torch import nn

# sd-scripts' UNet class names -> the diffusers class that plays the part
_CLASS_ALIASES = {"CrossAttention": "Attention", "SelfAttention": "Attention"}
_SUPPORTED_PRESET_KEYS = frozenset(
    {
        "enable_conv",
        "unet_target_module",
        "unet_target_name",
        "text_encoder_target_module",
        "text_encoder_target_name",
        "name_algo_map",
    }
)


@dataclass(frozen=True)
class PresetSpec:
    """The parts of a LyCORIS preset loraforge uses (see ``lycoris.config``)."""

    name: str
    enable_conv: bool
    unet_classes: frozenset[str]
    unet_names: tuple[str, ...]
    te_classes: frozenset[str]
    te_names: tuple[str, ...]
    name_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Target:
    """One layer to adapt.

    Attributes:
        lora_name: kohya name (``lora_unet_…``, ``lora_te1_…``).
        module: the base layer (Linear, Conv2d, LayerNorm or GroupNorm).
        is_unet: whether it belongs to the UNet.
        kind: ``linear`` (Linear and 1x1 conv), ``conv`` (kxk conv) or ``norm``.
        options: per-layer overrides from the preset's ``name_algo_map`` (may hold ``algo``).
    """

    lora_name: str
    module: nn.Module
    is_unet: bool
    kind: str
    options: Mapping[str, Any] = field(default_factory=dict)


def load_preset(name: str) -> PresetSpec:
    """Read a built-in preset (a fresh copy; lycoris-lora's state is not touched).

    Raises:
        RecipeError: an unknown preset, or one using keys loraforge does not implement.
    """
    from lycoris.config import PRESET

    if name not in PRESET:
        raise RecipeError(
            f"network.args.preset: lycoris-lora has no preset {name!r}",
            hint=f"use one of: {', '.join(PRESET)}",
        )
    data = PRESET[name]
    unknown = sorted(set(data) - _SUPPORTED_PRESET_KEYS)
    if unknown:
        raise RecipeError(
            f"network.args.preset: preset {name!r} uses {', '.join(unknown)}, "
            "which loraforge does not implement",
            hint="choose another preset",
        )

    def classes(key: str) -> frozenset[str]:
        return frozenset(_CLASS_ALIASES.get(c, c) for c in data.get(key, ()))

    return PresetSpec(
        name=name,
        enable_conv=bool(data.get("enable_conv", True)),
        unet_classes=classes("unet_target_module"),
        unet_names=tuple(data.get("unet_target_name", ())),
        te_classes=classes("text_encoder_target_module"),
        te_names=tuple(data.get("text_encoder_target_name", ())),
        name_overrides={k: dict(v) for k, v in data.get("name_algo_map", {}).items()},
    )


def _name_matches(pattern: str, path: str) -> bool:
    return path == pattern or path.endswith("." + pattern) or re.match(pattern, path) is not None


def _layer_kind(module: nn.Module, *, enable_conv: bool, train_norm: bool) -> str | None:
    from torch import nn

    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        if all(k == 1 for k in module.kernel_size):
            return "linear"
        return "conv" if enable_conv else None
    if isinstance(module, nn.LayerNorm | nn.GroupNorm):
        return "norm" if train_norm else None
    return None


def _candidates(
    root: nn.Module, classes: frozenset[str], names: Sequence[str]
) -> Iterable[tuple[str, nn.Module]]:
    """``(path, layer)`` of every layer under a module of a target class, and of named layers.

    A module whose path matches a target name is taken itself and not searched as a class,
    as in lycoris-lora.
    """
    for path, module in root.named_modules():
        if not path:
            continue
        if any(_name_matches(n, path) for n in names):
            yield path, module
        elif type(module).__name__ in classes:
            for child_path, child in module.named_modules():
                yield (f"{path}.{child_path}" if child_path else path), child


def _overrides_for(path: str, spec: PresetSpec) -> Mapping[str, Any]:
    for pattern, options in spec.name_overrides.items():
        if _name_matches(pattern, path):
            return options
    return {}


def select_targets(
    spec: PresetSpec,
    family: str,
    unet: nn.Module | None,
    text_encoders: Sequence[nn.Module],
    *,
    train_norm: bool,
) -> list[Target]:
    """The layers the preset adapts, text encoders first (lycoris-lora's order), kohya-named.

    Args:
        spec: the preset.
        family: the resolved model family.
        unet: the diffusers UNet, or ``None`` to leave it out.
        text_encoders: the text encoders to adapt, in order (empty to leave them out).
        train_norm: also take LayerNorm/GroupNorm layers.

    Raises:
        ValueError: a layer has no kohya name, or two layers get one name (naming bugs).
    """
    from loraforge.models import naming

    targets: dict[str, Target] = {}
    seen: set[int] = set()

    def add(path: str, module: nn.Module, name_of: Callable[[str], str], is_unet: bool) -> None:
        kind = _layer_kind(module, enable_conv=spec.enable_conv, train_norm=train_norm)
        if kind is None or id(module) in seen:
            return
        lora_name = name_of(path)
        if lora_name in targets:
            raise ValueError(f"two layers get the kohya name {lora_name!r} (second one: {path})")
        seen.add(id(module))
        targets[lora_name] = Target(lora_name, module, is_unet, kind, _overrides_for(path, spec))

    for index, encoder in enumerate(text_encoders):
        te_name = partial(naming.text_encoder_lora_name, family, index)
        for path, module in _candidates(encoder, spec.te_classes, spec.te_names):
            add(path, module, te_name, False)
    if unet is not None:
        config = dict(getattr(unet, "config", {}) or {}) if naming.is_sdxl(family) else {}
        unet_name = partial(naming.unet_lora_name, family, unet_config=config or None)
        for path, module in _candidates(unet, spec.unet_classes, spec.unet_names):
            add(path, module, unet_name, True)
    return list(targets.values())
