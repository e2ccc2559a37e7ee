"""The native backend's targets on the flow-matching transformers (FLUX.1, SD3/SD3.5).

sd-scripts' ``networks/lora_flux.py`` / ``lora_sd3.py`` options arrive as ``network.args``:

* ``train_blocks``: FLUX ``all`` (default) | ``double`` | ``single``.
* ``train_double_block_indices`` / ``train_single_block_indices`` (FLUX) and
  ``train_block_indices`` (SD3): ``"0-4,10"``, ``all`` or ``none`` (a list of ints works too).
* per-kind ranks (0 = none): FLUX ``img_attn_dim``, ``txt_attn_dim``, ``img_mlp_dim``,
  ``txt_mlp_dim``, ``img_mod_dim``, ``txt_mod_dim``, ``single_dim``, ``single_mod_dim``; SD3
  ``context_attn_dim``, ``context_mlp_dim``, ``context_mod_dim``, ``x_attn_dim``, ``x_mlp_dim``,
  ``x_mod_dim``.
* ``train_t5xxl``: also train T5-XXL (``lora_te3_``) when text encoders are trained.
* ``in_dims`` (FLUX, 5 ranks: img, time, vector, guidance, txt) / ``emb_dims`` (SD3, 6 ranks:
  context, t, x, y, final_mod, final_linear): LoRA on the embedders / final layer, 0 = none.

Fused original layers (``qkv``, ``linear1``) become one :class:`FusedLinear` target, so the file
has exactly sd-scripts' names and shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from loraforge.backends.hooks import FusedLinear
from loraforge.backends.kohya_blocks import RankSpec
from loraforge.errors import RecipeError
from loraforge.models import transformer_naming as tn
from loraforge.recipe.capabilities import TRANSFORMER_NETWORK_ARGS

if TYPE_CHECKING:
    from torch import nn

    from loraforge.recipe.types import NetworkConfig

# sd-scripts' per-kind rank args (``type_dims``), in its order; the kind is the name minus _dim
_FLUX_KINDS = ("img_attn", "txt_attn", "img_mlp", "txt_mlp", "img_mod", "txt_mod", "single")
_SD3_KINDS = ("context_attn", "context_mlp", "context_mod", "x_attn", "x_mlp", "x_mod")
_KIND_DIMS = {
    "flux": tuple(f"{k}_dim" for k in (*_FLUX_KINDS, "single_mod")),
    "sd3": tuple(f"{k}_dim" for k in _SD3_KINDS),
}
_FAMILY_ARGS = {
    "flux": {
        "train_blocks",
        "train_double_block_indices",
        "train_single_block_indices",
        "in_dims",
        *_KIND_DIMS["flux"],
    },
    "sd3": {"train_block_indices", "emb_dims", *_KIND_DIMS["sd3"]},
}


def _selection(value: Any, total: int, field: str) -> frozenset[int] | None:
    if value is None:
        return None
    try:
        if isinstance(value, (list, tuple)):
            chosen = frozenset(int(v) for v in value)
            if any(not 0 <= v < total for v in chosen):
                raise ValueError(f"indices must be 0-{total - 1}")
            return chosen
        return tn.parse_block_selection(str(value), total)
    except ValueError as e:
        raise RecipeError(
            f"network.args.{field}: {e}", hint=f'use e.g. "0-4,7", "all" or "none" (0-{total - 1})'
        ) from e


def _dims(value: Any, count: int, field: str, what: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    items = str(value).strip("[] ").split(",") if isinstance(value, str) else list(value)
    try:
        dims = tuple(int(v) for v in items)
    except (TypeError, ValueError):
        dims = ()
    if len(dims) != count or any(d < 0 for d in dims):
        raise RecipeError(
            f"network.args.{field}: expected {count} ranks >= 0 ({what}), got {value!r}",
            hint=f"give {count} numbers, 0 for the layers to leave out",
        )
    return dims


def transformer_options(config: NetworkConfig, family: str, transformer_config: Any) -> Any:
    """The :class:`TransformerLoraOptions` that ``network.args`` ask for.

    Raises:
        RecipeError: an argument of the other family, or a malformed value.
    """
    args = config.args
    other = sorted((TRANSFORMER_NETWORK_ARGS - _FAMILY_ARGS[family] - {"train_t5xxl"}) & set(args))
    if other:
        raise RecipeError(
            f"network.args.{other[0]}: not an option of {family}",
            hint="FLUX takes train_blocks, train_double/single_block_indices, in_dims; "
            "SD3 takes train_block_indices, emb_dims",
        )
    if family == "flux":
        train_blocks = str(args.get("train_blocks", "all"))
        if train_blocks not in ("all", "double", "single"):
            raise RecipeError(
                f"network.args.train_blocks: {train_blocks!r} is not all, double or single",
                hint="use all (default), double or single",
            )
        return tn.TransformerLoraOptions(
            train_blocks=train_blocks,
            double_blocks=_selection(
                args.get("train_double_block_indices"),
                int(transformer_config["num_layers"]),
                "train_double_block_indices",
            ),
            single_blocks=_selection(
                args.get("train_single_block_indices"),
                int(transformer_config["num_single_layers"]),
                "train_single_block_indices",
            ),
            extra_dims=_dims(args.get("in_dims"), 5, "in_dims", "img, time, vector, guidance, txt"),
        )
    return tn.TransformerLoraOptions(
        joint_blocks=_selection(
            args.get("train_block_indices"),
            int(transformer_config["num_layers"]),
            "train_block_indices",
        ),
        extra_dims=_dims(
            args.get("emb_dims"), 6, "emb_dims", "context, t, x, y, final_mod, final_linear"
        ),
    )


def fused_layer(root: nn.Module, target: tn.TransformerTarget) -> Any:
    """The base layer a target's LoRA hooks: the diffusers layer, or a :class:`FusedLinear`."""
    layers = tn.resolve_parts(root, target)
    if not target.fused:
        return layers[0]
    rows: dict[str, list[int]] = {}
    by_path: dict[str, nn.Module] = {}
    for part, layer in zip(target.parts, layers, strict=True):
        feed = rows.setdefault(part.path, [-1] * layer.out_features)
        by_path[part.path] = layer
        for k in range(part.rows[1] - part.rows[0]):
            feed[part.dest + k] = part.rows[0] + k
    return FusedLinear([(by_path[p], r) for p, r in rows.items()], target.out_features)


def transformer_network_targets(
    config: NetworkConfig,
    family: str,
    transformer: nn.Module,
    text_encoders: Sequence[nn.Module | None],
) -> tuple[dict[str, Any], dict[str, RankSpec]]:
    """kohya name -> base layer (or FusedLinear), and the rank of each ``in_dims``/``emb_dims``
    target (the others use ``network.dim``); transformer targets first, as sd-scripts orders
    them after the text encoders' in its module list but saves them by name either way.

    Raises:
        RecipeError: a malformed ``network.args`` option.
    """
    options = transformer_options(config, family, transformer.config)
    targets: dict[str, Any] = {}
    ranks: dict[str, RankSpec] = {}
    for target in tn.transformer_targets(family, transformer.config, options):
        if options.extra_dims is not None and target.kind == "embed":
            dim: int | None = tn.extra_dim_of(family, target, options.extra_dims)
        else:
            dim = config.args.get(f"{target.kind}_dim")
        if dim is not None:
            if int(dim) == 0:
                continue
            ranks[target.name] = RankSpec(int(dim), config.alpha)
        targets[target.name] = fused_layer(transformer, target)
    train_t5 = str(config.args.get("train_t5xxl", False)).lower() in ("true", "1")
    targets.update(tn.text_encoder_targets(family, text_encoders, train_t5xxl=train_t5))
    return targets, ranks
