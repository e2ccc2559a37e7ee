"""What the native backend accepts from a NetworkConfig, and the metadata sd-scripts writes."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from loraforge.errors import RecipeError
from loraforge.recipe.capabilities import (
    ALGORITHM_ARGS,
    PER_BLOCK_FIELDS,
    TRANSFORMER_NETWORK_ARGS,
)

if TYPE_CHECKING:
    from loraforge.recipe.types import NetworkConfig

# The sd-scripts module each native algorithm corresponds to (LoCon is networks.lora + conv_dim).
NETWORK_MODULES = {
    "lora": "networks.lora",
    "locon": "networks.lora",
    "lora-fa": "networks.lora_fa",
    "dylora": "networks.dylora",
}


def check_config(config: NetworkConfig) -> None:
    """Refuse what the native backend cannot do, naming the field and the fix.

    Raises:
        RecipeError: a LyCORIS-only algorithm or argument, or a DyLoRA option sd-scripts' DyLoRA
            does not have.
    """
    if config.algorithm not in NETWORK_MODULES:
        raise RecipeError(
            f"network.algorithm: {config.algorithm!r} is not a native (kohya) algorithm; "
            f"the kohya backend trains {', '.join(NETWORK_MODULES)}",
            hint="set `network.backend: lycoris` to train it with the LyCORIS backend",
        )
    allowed = ALGORITHM_ARGS[("kohya", config.algorithm)]
    unknown = sorted(set(config.args) - allowed)
    if unknown:
        raise RecipeError(
            f"network.args: {', '.join(unknown)} not used by the kohya backend with "
            f"algorithm {config.algorithm!r}",
            hint="remove them, or set `network.backend: lycoris` for LyCORIS options"
            + ("" if config.algorithm == "dylora" else "; `unit` applies to dylora only"),
        )
    if config.algorithm == "dylora":
        _check_dylora(config)


def _check_dylora(config: NetworkConfig) -> None:
    dropouts = [n for n in ("dropout", "rank_dropout", "module_dropout") if getattr(config, n)]
    if dropouts:
        raise RecipeError(
            f"network.{dropouts[0]}: dylora has no dropout (sd-scripts' DyLoRA neither)",
            hint="remove the dropout settings, or use algorithm lora/locon",
        )
    blocks = [n for n in PER_BLOCK_FIELDS if getattr(config, n) is not None]
    if blocks:
        raise RecipeError(
            f"network.{blocks[0]}: dylora does not support per-block ranks or lr weights",
            hint="remove the per-block settings, or use algorithm lora/locon",
        )
    if config.conv_dim is not None and config.conv_dim != config.dim:
        raise RecipeError(
            f"network.conv_dim: dylora needs conv_dim equal to dim ({config.dim}), "
            f"got {config.conv_dim}",
            hint=f"set conv_dim: {config.dim} (or remove it to train no conv modules)",
        )
    if config.conv_alpha is not None:
        raise RecipeError(
            "network.conv_alpha: dylora's conv modules use `alpha` like its other modules",
            hint="remove conv_alpha",
        )
    unit = dylora_unit(config)
    if unit < 1 or config.dim % unit != 0:
        raise RecipeError(
            f"network.args.unit: dim {config.dim} must be a multiple of the DyLoRA unit {unit}",
            hint="choose a unit that divides dim (e.g. 4 for dim 16)",
        )


def dylora_unit(config: NetworkConfig) -> int:
    """DyLoRA's rank unit: ``args.unit`` (sd-scripts) or ``args.block_size`` (LyCORIS), else 1."""
    return int(config.args.get("unit", config.args.get("block_size", 1)))


def conv_dim_of(config: NetworkConfig) -> int | None:
    """Rank of the kxk conv modules: ``conv_dim``; algorithm ``locon`` without it uses ``dim``."""
    if config.conv_dim is not None:
        return config.conv_dim
    return config.dim if config.algorithm == "locon" else None


def _effective_alpha(alpha: float | None, dim: int) -> float:
    return float(dim) if alpha is None or alpha == 0 else float(alpha)


def _text(value: Any) -> str:
    """A network-arg value as a user would have typed it on sd-scripts' command line."""
    if isinstance(value, (list, tuple)):
        return ",".join(_text(v) for v in value)
    if isinstance(value, float):
        return format(value, "g")
    return str(value)


def network_args(config: NetworkConfig) -> dict[str, Any]:
    """The ``--network_args`` sd-scripts would have been given for this config (string values)."""
    args: dict[str, Any] = {}
    conv_dim = conv_dim_of(config)
    if conv_dim is not None:
        args["conv_dim"] = _text(conv_dim)
        conv_alpha = config.alpha if config.algorithm == "dylora" else config.conv_alpha
        args["conv_alpha"] = _text(_effective_alpha(conv_alpha, conv_dim))
    if config.algorithm == "dylora":
        args["unit"] = _text(dylora_unit(config))
    for name, value in config.args.items():
        if name in TRANSFORMER_NETWORK_ARGS:
            args[name] = _text(value)
    for name in ("rank_dropout", "module_dropout", *PER_BLOCK_FIELDS, "loraplus_lr_ratio"):
        value = getattr(config, name)
        if value is not None:
            args[name] = _text(value)
    if args and config.dropout is not None:
        # sd-scripts adds the network dropout (a number or null) to the args; readers of
        # ss_network_args expect strings, so it is written as one, and left out when unset.
        args["dropout"] = _text(config.dropout)
    return args


def network_metadata(config: NetworkConfig) -> dict[str, str]:
    """``ss_network_*`` keys as sd-scripts' train_network.py writes them.

    ``ss_network_alpha`` is the alpha the tensors carry (``dim`` when alpha is null or 0);
    ``ss_network_args`` is present only when there are network args, as in sd-scripts.
    """
    metadata = {
        "ss_network_module": NETWORK_MODULES[config.algorithm],
        "ss_network_dim": str(config.dim),
        "ss_network_alpha": str(_effective_alpha(config.alpha, config.dim)),
        "ss_network_dropout": str(config.dropout),
    }
    args = network_args(config)
    if args:
        metadata["ss_network_args"] = json.dumps(args)
    return metadata
