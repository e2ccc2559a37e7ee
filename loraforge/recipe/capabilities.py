"""What each backend, algorithm and optimizer accepts: the tables the recipe rules and the
backends share, so `loraforge check` and training agree. Pure data, no torch."""

from __future__ import annotations

# Optimizers whose step fails when parameter groups have different non-zero learning rates.
SINGLE_LR_OPTIMIZERS = ("Prodigy", "DAdaptAdam", "DAdaptLion", "DAdaptSGD")
ADAPTIVE_OPTIMIZERS = ("Prodigy", "DAdaptAdam", "DAdaptLion", "DAdaptAdaGrad", "DAdaptSGD")

_LYCORIS_COMMON = frozenset({"preset", "train_norm"})
_LYCORIS_LORA = frozenset(
    {"use_tucker", "use_scalar", "dora_wd", "weight_decompose", "wd_on_output"}
)
# Which network.args each algorithm takes: what lycoris-lora 4.x's module classes actually use
# (arguments a class accepts but ignores are left out, so a recipe cannot set something inert).
# The backends read their accepted sets from here too.
# sd-scripts' lora_flux.py / lora_sd3.py network_args choosing the FLUX/SD3 targets (the native
# backend reads them; loraforge.backends.kohya_transformer checks them per family)
TRANSFORMER_NETWORK_ARGS = frozenset(
    {
        "train_blocks",
        "train_double_block_indices",
        "train_single_block_indices",
        "train_block_indices",
        "train_t5xxl",
        "in_dims",
        "emb_dims",
        # per-kind ranks (0 = no module), sd-scripts' img_attn_dim … / context_attn_dim …
        *(f"{kind}_dim" for kind in ("img_attn", "txt_attn", "img_mlp", "txt_mlp", "img_mod")),
        *(f"{kind}_dim" for kind in ("txt_mod", "single", "single_mod", "context_attn")),
        *(f"{kind}_dim" for kind in ("context_mlp", "context_mod", "x_attn", "x_mlp", "x_mod")),
    }
)
ALGORITHM_ARGS: dict[tuple[str, str], frozenset[str]] = {
    ("kohya", "lora"): TRANSFORMER_NETWORK_ARGS,
    ("kohya", "locon"): TRANSFORMER_NETWORK_ARGS,
    ("kohya", "lora-fa"): TRANSFORMER_NETWORK_ARGS,
    ("kohya", "dylora"): frozenset({"unit", "block_size"}) | TRANSFORMER_NETWORK_ARGS,
    ("lycoris", "lora"): _LYCORIS_COMMON | _LYCORIS_LORA,
    ("lycoris", "locon"): _LYCORIS_COMMON | _LYCORIS_LORA,
    ("lycoris", "loha"): _LYCORIS_COMMON | _LYCORIS_LORA,
    ("lycoris", "lokr"): _LYCORIS_COMMON
    | _LYCORIS_LORA
    | {"factor", "decompose_both", "full_matrix"},
    ("lycoris", "ia3"): _LYCORIS_COMMON,
    ("lycoris", "dylora"): _LYCORIS_COMMON | {"block_size", "unit"},
    ("lycoris", "diag-oft"): _LYCORIS_COMMON | {"constraint", "rescaled"},
    ("lycoris", "boft"): _LYCORIS_COMMON | {"constraint", "rescaled"},
    ("lycoris", "full"): _LYCORIS_COMMON,
    ("lycoris", "glora"): _LYCORIS_COMMON | {"use_scalar"},
}
# The kohya backend's per-block fields (LyCORIS has no equivalent).
PER_BLOCK_FIELDS = (
    "block_dims",
    "block_alphas",
    "conv_block_dims",
    "conv_block_alphas",
    "down_lr_weight",
    "mid_lr_weight",
    "up_lr_weight",
)
BLOCK_COUNTS = {"sd1": 25, "sd2": 25, "sd2-v": 25, "sdxl": 23}


def algorithms_of(backend: str) -> tuple[str, ...]:
    """The algorithms ``backend`` trains, in table order."""
    return tuple(algorithm for b, algorithm in ALGORITHM_ARGS if b == backend)
