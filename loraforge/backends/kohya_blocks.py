"""Per-block ranks, alphas and learning-rate weights, with sd-scripts' block layout.

sd-scripts numbers the UNet blocks (``block_index`` in loraforge.models.naming gives a module's):
- SD1/SD2: 25 blocks. 0-11 the down blocks (IN00-IN11), 12 the middle (MID), 13-24 the up
  blocks (OUT00-OUT11). ``down_lr_weight``/``up_lr_weight`` have 12 values each.
- SDXL: 23 blocks. 0 the time/label embeddings, 1-9 input blocks, 10-12 the middle block's three
  parts, 13-21 output blocks, 22 the output layer. ``down_lr_weight``/``up_lr_weight`` have 9
  values; blocks 0 and 22 always get weight 1.

As in sd-scripts, giving any per-block value switches the UNet to per-block mode: unset lists
default to the network-wide ``dim``/``alpha``/``conv_dim``/``conv_alpha``, and a block whose lr
weight is 0 gets rank 0, i.e. no module at all. Text-encoder modules never use block values.

One deliberate difference: ``mid_lr_weight`` is one number; on SDXL it applies to all three
middle parts (sd-scripts would pad ``[w]`` to ``[w, 1, 1]``, leaving the middle attention -- the
only middle part with LoRA modules unless conv is on -- at weight 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loraforge.backends.kohya_config import conv_dim_of
from loraforge.errors import RecipeError
from loraforge.models import naming
from loraforge.models.transformer_naming import TRANSFORMER_FAMILIES
from loraforge.recipe.capabilities import PER_BLOCK_FIELDS

if TYPE_CHECKING:
    from loraforge.recipe.types import NetworkConfig


@dataclass(frozen=True)
class BlockLayout:
    """How many blocks a family has and how the lr-weight lists map onto them."""

    total: int
    down_up: int
    mid: int
    edges: bool  # SDXL: one leading (embeddings) and one trailing (output layer) block


def layout_for(family: str) -> BlockLayout:
    """The block layout of a resolved family (``auto`` must be resolved before).

    Raises:
        ValueError: an unknown family.
    """
    sdxl = naming.is_sdxl(family)
    return BlockLayout(
        total=naming.num_blocks(family),
        down_up=naming.SDXL_NUM_BLOCKS if sdxl else naming.SD_NUM_BLOCKS,
        mid=3 if sdxl else 1,
        edges=sdxl,
    )


@dataclass(frozen=True)
class RankSpec:
    """Rank and alpha of one module kind (``dim`` 0 = no module)."""

    dim: int
    alpha: float | None


@dataclass(frozen=True)
class RankPlan:
    """Which rank/alpha each module gets.

    Attributes:
        linear: text encoders, and UNet Linear/1x1 modules outside per-block mode.
        conv: UNet kxk convs (LoCon); ``None`` when conv modules are off.
        blocks: per-block ``(linear, conv)`` specs in per-block mode, else ``None``.
        lr_weights: per-block lr weights (``layout.total`` values) or ``None``.
    """

    linear: RankSpec
    conv: RankSpec | None
    blocks: tuple[tuple[RankSpec, RankSpec | None], ...] | None
    lr_weights: tuple[float, ...] | None

    @property
    def uses_conv(self) -> bool:
        return self.conv is not None or (
            self.blocks is not None and any(c is not None and c.dim > 0 for _, c in self.blocks)
        )

    def spec_for(self, *, is_unet: bool, is_kxk_conv: bool, block: int | None) -> RankSpec | None:
        """The spec of one module, or ``None`` when it gets no module."""
        if is_unet and self.blocks is not None and block is not None:
            linear, conv = self.blocks[block]
            spec = conv if is_kxk_conv else linear
        else:
            spec = self.conv if is_kxk_conv else self.linear
        return spec if spec is not None and spec.dim > 0 else None

    def lr_weight(self, block: int | None) -> float:
        if self.lr_weights is None or block is None:
            return 1.0
        return self.lr_weights[block]


def _expect_len(
    field: str, values: Sequence[object], expected: int, family: str, what: str
) -> None:
    if len(values) != expected:
        raise RecipeError(
            f"network.{field}: {family} needs {expected} values ({what}), got {len(values)}",
            hint=f"give a list of exactly {expected} numbers",
        )


def lr_weights_for(
    layout: BlockLayout,
    family: str,
    down: Sequence[float] | None,
    mid: float | None,
    up: Sequence[float] | None,
) -> tuple[float, ...] | None:
    """The per-block lr weights (``layout.total`` values), or ``None`` when none is given.

    Weights <= 0 become 0 (sd-scripts' zero threshold): such blocks are not trained at all.

    Raises:
        RecipeError: a list has the wrong length for the family.
    """
    if down is None and mid is None and up is None:
        return None
    n = layout.down_up
    if down is not None:
        _expect_len("down_lr_weight", down, n, family, "one per down/input block")
    if up is not None:
        _expect_len("up_lr_weight", up, n, family, "one per up/output block")
    weights = [
        *(down if down is not None else [1.0] * n),
        *([mid if mid is not None else 1.0] * layout.mid),
        *(up if up is not None else [1.0] * n),
    ]
    if layout.edges:
        weights = [1.0, *weights, 1.0]
    return tuple(float(w) if w > 0 else 0.0 for w in weights)


def rank_plan(config: NetworkConfig, family: str) -> RankPlan:
    """Resolve a NetworkConfig's ranks for a family.

    Conv (kxk) modules are on when ``conv_dim`` is set, for algorithm ``locon`` (rank ``dim``),
    or when ``conv_block_dims`` is given; a null conv alpha means the conv rank (scale 1), except
    for DyLoRA whose conv modules use ``alpha`` as in sd-scripts.

    Raises:
        RecipeError: per-block lists of the wrong length.
    """
    linear = RankSpec(config.dim, config.alpha)
    if family in TRANSFORMER_FAMILIES:
        return _transformer_plan(config, family, linear)
    layout = layout_for(family)
    conv_dim = conv_dim_of(config)
    conv_alpha = config.alpha if config.algorithm == "dylora" else config.conv_alpha
    conv = RankSpec(conv_dim, conv_alpha) if conv_dim is not None else None
    lr_weights = lr_weights_for(
        layout, family, config.down_lr_weight, config.mid_lr_weight, config.up_lr_weight
    )
    per_block = (
        config.block_dims,
        config.block_alphas,
        config.conv_block_dims,
        config.conv_block_alphas,
    )
    if lr_weights is None and all(v is None for v in per_block):
        return RankPlan(linear, conv, None, None)
    blocks = _block_specs(config, family, layout, linear, conv, lr_weights)
    return RankPlan(linear, conv, blocks, lr_weights)


def _transformer_plan(config: NetworkConfig, family: str, linear: RankSpec) -> RankPlan:
    """FLUX/SD3: one rank for every Linear; blocks are chosen with network.args instead."""
    given = [f for f in PER_BLOCK_FIELDS if getattr(config, f) is not None]
    if given:
        raise RecipeError(
            f"network.{given[0]}: {family} has no UNet blocks",
            hint="choose blocks with network.args (FLUX: train_blocks, "
            "train_double_block_indices, train_single_block_indices; SD3: train_block_indices)",
        )
    return RankPlan(linear, None, None, None)


def _block_specs(
    config: NetworkConfig,
    family: str,
    layout: BlockLayout,
    linear: RankSpec,
    conv: RankSpec | None,
    lr_weights: tuple[float, ...] | None,
) -> tuple[tuple[RankSpec, RankSpec | None], ...]:
    n = layout.total
    what = "one per UNet block, sd-scripts order"
    for field in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"):
        values = getattr(config, field)
        if values is not None:
            _expect_len(field, values, n, family, what)
    dims = config.block_dims or [linear.dim] * n
    alphas = config.block_alphas or [linear.alpha] * n
    conv_dims = config.conv_block_dims or ([conv.dim] * n if conv is not None else None)
    conv_alpha = conv.alpha if conv is not None else config.conv_alpha
    conv_alphas = config.conv_block_alphas or [conv_alpha] * n
    specs = []
    for i in range(n):
        frozen = lr_weights is not None and lr_weights[i] == 0
        block_linear = RankSpec(0 if frozen else dims[i], alphas[i])
        block_conv = None
        if conv_dims is not None:
            block_conv = RankSpec(0 if frozen else conv_dims[i], conv_alphas[i])
        specs.append((block_linear, block_conv))
    return tuple(specs)
