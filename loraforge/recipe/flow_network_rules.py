"""Cross-field rules of the network section for the flow-matching families (FLUX.1, SD3).

sd-scripts' FLUX/SD3 network args (``train_blocks`` …) choose layers of one family only, the
UNet families' per-block fields have no meaning on a transformer, and the LyCORIS backend cannot
write sd-scripts' FLUX/SD3 names yet. Findings as in :mod:`loraforge.recipe.rules`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from loraforge.recipe.capabilities import PER_BLOCK_FIELDS, TRANSFORMER_NETWORK_ARGS
from loraforge.recipe.types import Recipe

Finding = tuple[str, tuple[Any, ...], str, str | None]

_FLUX_ONLY = ("train_blocks", "train_double_block_indices", "train_single_block_indices", "in_dims")
_FLUX_ONLY += tuple(
    f"{k}_dim"
    for k in ("img_attn", "txt_attn", "img_mlp", "txt_mlp", "img_mod", "txt_mod", "single")
)
_FLUX_ONLY += ("single_mod_dim",)
_SD3_ONLY = ("train_block_indices", "emb_dims")
_SD3_ONLY += tuple(
    f"{k}_dim" for k in ("context_attn", "context_mlp", "context_mod", "x_attn", "x_mlp", "x_mod")
)


def flow_network_problems(r: Recipe) -> Iterator[Finding]:
    """Findings for FLUX/SD3 network options used where they cannot apply."""
    n, family = r.network, r.model.family
    flow_args = [k for k in n.args if k in TRANSFORMER_NETWORK_ARGS]
    if family in ("flux", "sd3"):
        if n.backend == "lycoris":
            yield (
                "error",
                ("network", "backend"),
                f"LyCORIS algorithms are not available for {family} yet",
                "use network.backend: kohya (lora, lora-fa or dylora) for sd-scripts' names",
            )
        for field in PER_BLOCK_FIELDS:
            if getattr(n, field) is not None:
                yield (
                    "error",
                    ("network", field),
                    f"{family} has no UNet blocks",
                    "choose blocks with network.args (FLUX: train_double_block_indices, "
                    "train_single_block_indices; SD3: train_block_indices)",
                )
        other = _SD3_ONLY if family == "flux" else _FLUX_ONLY
        for key in flow_args:
            if key in other:
                yield ("error", ("network", "args", key), f"not an option of {family}", None)
    elif family != "auto":
        for key in flow_args:
            yield (
                "error",
                ("network", "args", key),
                f"a FLUX/SD3 option, not one of {family}",
                "remove it",
            )
