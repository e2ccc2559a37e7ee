"""What the LyCORIS backend accepts from a NetworkConfig, and the metadata it writes.

The argument sets below are what lycoris-lora 4.1.3's kohya entry point (``lycoris.kohya``)
reads and what its module classes actually use, per algorithm. Arguments a module class takes
but ignores (e.g. ``use_scalar`` on IA3, ``use_tucker`` on GLoRA, whose conv Tucker branch can
never run) are left out, so a recipe cannot believe it set something that has no effect.

Files carry the metadata sd-scripts writes when it trains with ``--network_module lycoris.kohya``:
``ss_network_args`` is the JSON of the ``--network_args`` (every value a string), so LyCORIS
users can read the algorithm and its options back; a DoRA network also says its axis
(``wd_on_output``), because lycoris.kohya's default axis is not loraforge's.

Pure module: no torch, no lycoris import at module level.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loraforge.errors import RecipeError
from loraforge.recipe.capabilities import ALGORITHM_ARGS as RECIPE_ALGORITHM_ARGS
from loraforge.recipe.capabilities import PER_BLOCK_FIELDS

if TYPE_CHECKING:
    from loraforge.recipe.types import NetworkConfig

NETWORK_MODULE = "lycoris.kohya"
DEFAULT_PRESET = "full"

# network.args each LyCORIS algorithm takes (besides the top-level dim/alpha/conv/dropout fields);
# the table lives with the recipe rules so `loraforge check` and the backend agree.
ALGORITHM_ARGS: dict[str, frozenset[str]] = {
    algorithm: args
    for (backend, algorithm), args in RECIPE_ALGORITHM_ARGS.items()
    if backend == "lycoris"
}
ALGORITHMS = tuple(ALGORITHM_ARGS)

# Algorithms whose lycoris-lora forward honours rank_dropout (IA3, DyLoRA, BOFT and GLoRA
# accept it and ignore it); no algorithm's weight-rebuild forward uses the neuron dropout.
_RANK_DROPOUT_ALGORITHMS = ("lora", "locon", "loha", "lokr", "diag-oft", "full")
# Algorithms with an up projection (``lora_up``) that LoRA+ can give a larger learning rate.
_LORAPLUS_ALGORITHMS = ("lora", "locon")
# Order the algorithm options appear in ``ss_network_args`` (after algo, preset, conv_*).
_ARG_ORDER = (
    "factor",
    "decompose_both",
    "full_matrix",
    "use_tucker",
    "use_scalar",
    "dora_wd",
    "wd_on_output",
    "block_size",
    "constraint",
    "rescaled",
    "train_norm",
)
DEFAULT_DYLORA_BLOCK_SIZE = 4  # lycoris-lora's default


@dataclass(frozen=True)
class LycorisOptions:
    """A NetworkConfig resolved into what lycoris-lora's modules take.

    Attributes:
        algorithm: the LyCORIS ``algo`` name.
        preset: the LyCORIS preset name.
        dim, alpha: rank and alpha of Linear and 1x1-conv modules (alpha ``None`` = dim).
        conv_dim, conv_alpha: rank and alpha of kxk-conv modules (when the preset enables them).
        dropout, rank_dropout, module_dropout: LyCORIS dropouts (0 = off).
        train_norm: also train LayerNorm/GroupNorm layers inside the targets.
        module_kwargs: keyword arguments every module constructor gets.
    """

    algorithm: str
    preset: str
    dim: int
    alpha: float | None
    conv_dim: int
    conv_alpha: float | None
    dropout: float
    rank_dropout: float
    module_dropout: float
    train_norm: bool
    module_kwargs: dict[str, Any]


# Fields an algorithm has no use for: setting them is refused rather than silently ignored
# (IA3 and full have no rank; OFT's strength is args.constraint, not an alpha).
_UNUSED_FIELDS = {
    "ia3": ("conv_dim", "conv_alpha"),
    "full": ("conv_dim", "conv_alpha"),
    "diag-oft": ("conv_alpha",),
    "boft": ("conv_alpha",),
}


def check_config(config: NetworkConfig) -> None:
    """Refuse what the LyCORIS backend cannot do, naming the field and the algorithm.

    Raises:
        RecipeError: an algorithm lycoris-lora does not have, an argument or field the
            algorithm does not use, a kohya-only field, or DyLoRA ranks that are not a multiple
            of its block.
    """
    if config.algorithm not in ALGORITHM_ARGS:
        raise RecipeError(
            f"network.algorithm: the lycoris backend has no algorithm {config.algorithm!r}",
            hint=f"use one of: {', '.join(ALGORITHMS)}",
        )
    takes = ALGORITHM_ARGS[config.algorithm]
    for key in sorted(config.args):
        if key not in takes:
            raise RecipeError(
                f'network.args.{key}: algorithm "{config.algorithm}" (lycoris backend) '
                f'does not take "{key}"',
                hint=f"arguments it takes: {', '.join(sorted(takes))}",
            )
    for name in _UNUSED_FIELDS.get(config.algorithm, ()):
        if getattr(config, name) is not None:
            raise RecipeError(
                f"network.{name}: algorithm {config.algorithm!r} does not use it",
                hint=f"remove network.{name}",
            )
    for name in PER_BLOCK_FIELDS:
        if getattr(config, name) is not None:
            raise RecipeError(
                f"network.{name}: per-block ranks and learning rates are a kohya-backend feature",
                hint="remove it, or use network.backend: kohya",
            )
    if config.loraplus_lr_ratio is not None and config.algorithm not in _LORAPLUS_ALGORITHMS:
        raise RecipeError(
            f"network.loraplus_lr_ratio: algorithm {config.algorithm!r} has no up matrix "
            "for LoRA+ to speed up",
            hint="remove loraplus_lr_ratio, or use algorithm lora/locon",
        )
    _check_dropouts(config)
    if "dora_wd" in config.args and "weight_decompose" in config.args:
        raise RecipeError(
            "network.args: dora_wd and weight_decompose are the same option; give one",
            hint="keep dora_wd",
        )
    if "wd_on_output" in config.args and not uses_dora(config):
        raise RecipeError(
            "network.args.wd_on_output: only chooses the DoRA axis, and DoRA is off",
            hint="remove wd_on_output, or set network.args.dora_wd: true",
        )
    if config.algorithm == "dylora":
        _check_dylora(config)


def _check_dropouts(config: NetworkConfig) -> None:
    if config.dropout:
        raise RecipeError(
            "network.dropout: lycoris-lora's modules ignore the neuron dropout "
            "(their forward rebuilds the weight; only bypass mode would use it)",
            hint="remove it; use network.rank_dropout or network.module_dropout",
        )
    if config.rank_dropout and config.algorithm not in _RANK_DROPOUT_ALGORITHMS:
        raise RecipeError(
            f"network.rank_dropout: algorithm {config.algorithm!r} ignores rank dropout "
            "in lycoris-lora",
            hint="remove it or use network.module_dropout; rank dropout works with "
            + ", ".join(_RANK_DROPOUT_ALGORITHMS),
        )


def _check_dylora(config: NetworkConfig) -> None:
    block = dylora_block_size(config)
    for field, rank in (("dim", config.dim), ("conv_dim", conv_dim_of(config))):
        if block < 1 or rank % block != 0:
            raise RecipeError(
                f"network.{field}: DyLoRA rank {rank} must be a multiple of its block size {block}",
                hint="set network.args.block_size to a divisor of dim and conv_dim "
                "(lycoris-lora's default block size is 4)",
            )


def dylora_block_size(config: NetworkConfig) -> int:
    """DyLoRA's rank block: ``args.block_size`` (LyCORIS) or ``args.unit`` (sd-scripts), else 4."""
    return int(config.args.get("block_size", config.args.get("unit", DEFAULT_DYLORA_BLOCK_SIZE)))


def conv_dim_of(config: NetworkConfig) -> int:
    """Rank of kxk convs: ``conv_dim``, else ``dim`` (lycoris-lora's default)."""
    return config.conv_dim if config.conv_dim is not None else config.dim


def conv_alpha_of(config: NetworkConfig) -> float | None:
    """Alpha of kxk convs: ``conv_alpha``, else ``alpha`` (lycoris-lora's default)."""
    return config.conv_alpha if config.conv_alpha is not None else config.alpha


def _flag(config: NetworkConfig, *names: str) -> bool:
    return any(bool(config.args.get(name, False)) for name in names)


def uses_dora(config: NetworkConfig) -> bool:
    """Whether the network is weight-decomposed (``dora_wd`` / ``weight_decompose``)."""
    return _flag(config, "dora_wd", "weight_decompose")


def dora_on_output(config: NetworkConfig) -> bool:
    """Whether DoRA normalises per output row (lycoris-lora's ``wd_on_output=True``).

    loraforge's default is the input-axis layout (``dora_scale`` ``(1, in)``, one magnitude per
    input column), the only one A1111, ComfyUI and Forge all apply the way training does; the
    output axis is an explicit ``network.args.wd_on_output: true``.
    """
    return uses_dora(config) and _flag(config, "wd_on_output")


def resolve_options(config: NetworkConfig) -> LycorisOptions:
    """Translate an accepted config (see :func:`check_config`) into lycoris-lora's terms."""
    args = config.args
    kwargs: dict[str, Any] = {
        "use_tucker": _flag(config, "use_tucker"),
        "use_scalar": _flag(config, "use_scalar"),
        "weight_decompose": uses_dora(config),
        "wd_on_out": dora_on_output(config),
        "decompose_both": _flag(config, "decompose_both"),
        "full_matrix": _flag(config, "full_matrix"),
        "factor": int(args.get("factor", -1)),
        "constraint": float(args.get("constraint", 0.0)),
        "rescaled": _flag(config, "rescaled"),
        # bypass_mode=False: every algorithm runs its weight-rebuild forward (exact, mergeable)
        "bypass_mode": False,
    }
    if config.algorithm == "dylora":
        kwargs["block_size"] = dylora_block_size(config)
    return LycorisOptions(
        algorithm=config.algorithm,
        preset=str(args.get("preset", DEFAULT_PRESET)),
        dim=config.dim,
        alpha=config.alpha or None,
        conv_dim=conv_dim_of(config),
        conv_alpha=conv_alpha_of(config) or None,
        dropout=float(config.dropout or 0.0),
        rank_dropout=float(config.rank_dropout or 0.0),
        module_dropout=float(config.module_dropout or 0.0),
        train_norm=_flag(config, "train_norm"),
        module_kwargs=kwargs,
    )


def _text(value: Any) -> str:
    """A value as it would have been typed in sd-scripts' ``--network_args key=value``."""
    if isinstance(value, float):
        return format(value, "g")
    return str(value)


def network_args(config: NetworkConfig, *, conv_enabled: bool) -> dict[str, Any]:
    """The ``--network_args`` sd-scripts + lycoris.kohya would have been given for ``config``.

    Args:
        config: an accepted network config.
        conv_enabled: whether the preset trains kxk convs (then ``conv_dim``/``conv_alpha``
            are written with their effective values).
    """
    args: dict[str, Any] = {"algo": config.algorithm}
    args["preset"] = str(config.args.get("preset", DEFAULT_PRESET))
    if conv_enabled and config.algorithm not in ("ia3", "full"):
        args["conv_dim"] = _text(conv_dim_of(config))
        conv_alpha = conv_alpha_of(config)
        args["conv_alpha"] = _text(float(conv_alpha) if conv_alpha else conv_dim_of(config))
    given = dict(config.args)
    if "weight_decompose" in given:
        given["dora_wd"] = given.pop("weight_decompose")  # the name lycoris.kohya reads
    if config.algorithm == "dylora":
        given.pop("unit", None)
        given["block_size"] = dylora_block_size(config)
    if uses_dora(config):
        # lycoris.kohya's default axis is the output one: say which axis the file has
        given["wd_on_output"] = dora_on_output(config)
    for name in _ARG_ORDER:
        if name in given:
            args[name] = _text(given[name])
    for name in ("rank_dropout", "module_dropout", "loraplus_lr_ratio"):
        value = getattr(config, name)
        if value is not None:
            args[name] = _text(value)
    # sd-scripts adds the network dropout itself, as a number or null; readers of
    # ss_network_args expect strings, so it is written as one, and left out when unset
    if config.dropout is not None:
        args["dropout"] = _text(config.dropout)
    return args


def network_metadata(config: NetworkConfig, *, conv_enabled: bool) -> dict[str, str]:
    """``ss_network_*`` metadata as sd-scripts writes it for a lycoris.kohya network."""
    alpha = float(config.alpha) if config.alpha else float(config.dim)
    return {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": str(config.dim),
        "ss_network_alpha": str(alpha),
        "ss_network_dropout": str(config.dropout),
        "ss_network_args": json.dumps(network_args(config, conv_enabled=conv_enabled)),
    }
