"""FLUX.1 and SD3/SD3.5 LoRA targets: sd-scripts' names on the original layouts, mapped onto
diffusers' ``FluxTransformer2DModel`` / ``SD3Transformer2DModel`` (see
:mod:`loraforge.models.transformer_naming` for the types and the rules). Pure: no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from loraforge.models.transformer_naming import (
    FLUX_IN_DIMS,
    SD3_EMB_DIMS,
    UNET_PREFIX,
    Part,
    TransformerLoraOptions,
    TransformerTarget,
)


def _linear(name: str, path: str, n_in: int, n_out: int, kind: str, block: Any = None):
    return TransformerTarget(
        UNET_PREFIX + name, (Part(path, (0, n_out)),), n_in, n_out, kind, block
    )


def _fused(name: str, paths: Sequence[tuple[str, int]], n_in: int, kind: str, block: Any):
    parts, start = [], 0
    for path, width in paths:
        parts.append(Part(path, (start, start + width)))
        start += width
    return TransformerTarget(UNET_PREFIX + name, tuple(parts), n_in, start, kind, block)


def _swapped_halves(name: str, path: str, width: int, kind: str, block: Any = None):
    """Original (shift, scale) rows feeding diffusers' (scale, shift) ``AdaLayerNormContinuous``."""
    parts = (Part(path, (0, width), width), Part(path, (width, 2 * width), 0))
    return TransformerTarget(UNET_PREFIX + name, parts, width, 2 * width, kind, block)


def flux_targets(
    config: Mapping[str, Any], options: TransformerLoraOptions = TransformerLoraOptions()
) -> list[TransformerTarget]:
    """The LoRA targets of a ``FluxTransformer2DModel`` with this diffusers config, in
    sd-scripts' order (double blocks, single blocks, then ``in_dims`` layers)."""
    hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    mlp = 4 * hidden
    targets: list[TransformerTarget] = []
    if options.train_blocks in ("all", "double"):
        for i in range(int(config["num_layers"])):
            if options.double_blocks is not None and i not in options.double_blocks:
                continue
            targets += _flux_double(i, hidden, mlp)
    if options.train_blocks in ("all", "single"):
        for i in range(int(config["num_single_layers"])):
            if options.single_blocks is not None and i not in options.single_blocks:
                continue
            b, d = ("single", i), f"single_transformer_blocks.{i}."
            qkv_mlp = [(d + p, hidden) for p in ("attn.to_q", "attn.to_k", "attn.to_v")]
            targets += [
                _fused(
                    f"single_blocks_{i}_linear1",
                    [*qkv_mlp, (d + "proj_mlp", mlp)],
                    hidden,
                    "single",
                    b,
                ),
                _linear(
                    f"single_blocks_{i}_linear2", d + "proj_out", hidden + mlp, hidden, "single", b
                ),
                _linear(
                    f"single_blocks_{i}_modulation_lin",
                    d + "norm.linear",
                    hidden,
                    3 * hidden,
                    "single_mod",
                    b,
                ),
            ]
    if options.extra_dims is not None:
        targets += _flux_embedders(config, hidden)
    return targets


def _flux_double(i: int, hidden: int, mlp: int) -> list[TransformerTarget]:
    b, d, n = ("double", i), f"transformer_blocks.{i}.", f"double_blocks_{i}_"
    out: list[TransformerTarget] = []
    for stream, norm, attn, proj, ff in (
        ("img", "norm1", ("to_q", "to_k", "to_v"), "to_out.0", "ff"),
        (
            "txt",
            "norm1_context",
            ("add_q_proj", "add_k_proj", "add_v_proj"),
            "to_add_out",
            "ff_context",
        ),
    ):
        out += [
            _linear(
                f"{n}{stream}_mod_lin", d + norm + ".linear", hidden, 6 * hidden, f"{stream}_mod", b
            ),
            _fused(
                f"{n}{stream}_attn_qkv",
                [(d + "attn." + p, hidden) for p in attn],
                hidden,
                f"{stream}_attn",
                b,
            ),
            _linear(
                f"{n}{stream}_attn_proj", d + "attn." + proj, hidden, hidden, f"{stream}_attn", b
            ),
            _linear(f"{n}{stream}_mlp_0", d + ff + ".net.0.proj", hidden, mlp, f"{stream}_mlp", b),
            _linear(f"{n}{stream}_mlp_2", d + ff + ".net.2", mlp, hidden, f"{stream}_mlp", b),
        ]
    return out


def _flux_embedders(config: Mapping[str, Any], hidden: int) -> list[TransformerTarget]:
    emb = "time_text_embed."
    pooled, joint = int(config["pooled_projection_dim"]), int(config["joint_attention_dim"])
    layers = {
        "img_in": [("img_in", "x_embedder", int(config["in_channels"]), hidden)],
        "time_in": [
            ("time_in_in_layer", emb + "timestep_embedder.linear_1", 256, hidden),
            ("time_in_out_layer", emb + "timestep_embedder.linear_2", hidden, hidden),
        ],
        "vector_in": [
            ("vector_in_in_layer", emb + "text_embedder.linear_1", pooled, hidden),
            ("vector_in_out_layer", emb + "text_embedder.linear_2", hidden, hidden),
        ],
        "guidance_in": [
            ("guidance_in_in_layer", emb + "guidance_embedder.linear_1", 256, hidden),
            ("guidance_in_out_layer", emb + "guidance_embedder.linear_2", hidden, hidden),
        ]
        if config.get("guidance_embeds")
        else [],
        "txt_in": [("txt_in", "context_embedder", joint, hidden)],
    }
    return [_linear(*layer, "embed") for key in FLUX_IN_DIMS for layer in layers[key]]


def sd3_targets(
    config: Mapping[str, Any], options: TransformerLoraOptions = TransformerLoraOptions()
) -> list[TransformerTarget]:
    """The LoRA targets of an ``SD3Transformer2DModel`` with this diffusers config, in
    sd-scripts' order (per joint block: context block, then x block; then ``emb_dims`` layers)."""
    hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    layers = int(config["num_layers"])
    dual = set(config.get("dual_attention_layers") or ())
    targets: list[TransformerTarget] = []
    for i in range(layers):
        if options.joint_blocks is not None and i not in options.joint_blocks:
            continue
        targets += _sd3_block(i, hidden, last=i == layers - 1, dual=i in dual)
    if options.extra_dims is not None:
        targets += _sd3_embedders(config, hidden)
    return targets


def _sd3_block(i: int, hidden: int, *, last: bool, dual: bool) -> list[TransformerTarget]:
    b, d, n = ("joint", i), f"transformer_blocks.{i}.", f"joint_blocks_{i}_"
    qkv = ("to_q", "to_k", "to_v")
    ctx_qkv = [(d + "attn." + p, hidden) for p in ("add_q_proj", "add_k_proj", "add_v_proj")]
    out = [_fused(n + "context_block_attn_qkv", ctx_qkv, hidden, "context_attn", b)]
    if last:  # context_pre_only: no proj/MLP, and a (shift, scale) modulation diffusers swaps
        out.append(
            _swapped_halves(
                n + "context_block_adaLN_modulation_1",
                d + "norm1_context.linear",
                hidden,
                "context_mod",
                b,
            )
        )
    else:
        out += [
            _linear(
                n + "context_block_attn_proj",
                d + "attn.to_add_out",
                hidden,
                hidden,
                "context_attn",
                b,
            ),
            _linear(
                n + "context_block_mlp_fc1",
                d + "ff_context.net.0.proj",
                hidden,
                4 * hidden,
                "context_mlp",
                b,
            ),
            _linear(
                n + "context_block_mlp_fc2",
                d + "ff_context.net.2",
                4 * hidden,
                hidden,
                "context_mlp",
                b,
            ),
            _linear(
                n + "context_block_adaLN_modulation_1",
                d + "norm1_context.linear",
                hidden,
                6 * hidden,
                "context_mod",
                b,
            ),
        ]
    out += [
        _fused(
            n + "x_block_attn_qkv", [(d + "attn." + p, hidden) for p in qkv], hidden, "x_attn", b
        ),
        _linear(n + "x_block_attn_proj", d + "attn.to_out.0", hidden, hidden, "x_attn", b),
    ]
    if dual:
        out += [
            _fused(
                n + "x_block_attn2_qkv",
                [(d + "attn2." + p, hidden) for p in qkv],
                hidden,
                "x_attn",
                b,
            ),
            _linear(n + "x_block_attn2_proj", d + "attn2.to_out.0", hidden, hidden, "x_attn", b),
        ]
    mods = 9 if dual else 6
    out += [
        _linear(n + "x_block_mlp_fc1", d + "ff.net.0.proj", hidden, 4 * hidden, "x_mlp", b),
        _linear(n + "x_block_mlp_fc2", d + "ff.net.2", 4 * hidden, hidden, "x_mlp", b),
        _linear(
            n + "x_block_adaLN_modulation_1", d + "norm1.linear", hidden, mods * hidden, "x_mod", b
        ),
    ]
    return out


def _sd3_embedders(config: Mapping[str, Any], hidden: int) -> list[TransformerTarget]:
    emb, patch = "time_text_embed.", int(config["patch_size"])
    pooled, joint = int(config["pooled_projection_dim"]), int(config["joint_attention_dim"])
    x_embed = TransformerTarget(
        UNET_PREFIX + "x_embedder_proj",
        (Part("pos_embed.proj", (0, hidden)),),
        int(config["in_channels"]),
        hidden,
        "embed",
        None,
        (patch, patch),
    )
    layers = {
        "context_embedder": [
            _linear("context_embedder", "context_embedder", joint, hidden, "embed")
        ],
        "t_embedder": [
            _linear("t_embedder_mlp_0", emb + "timestep_embedder.linear_1", 256, hidden, "embed"),
            _linear(
                "t_embedder_mlp_2", emb + "timestep_embedder.linear_2", hidden, hidden, "embed"
            ),
        ],
        "x_embedder": [x_embed],
        "y_embedder": [
            _linear("y_embedder_mlp_0", emb + "text_embedder.linear_1", pooled, hidden, "embed"),
            _linear("y_embedder_mlp_2", emb + "text_embedder.linear_2", hidden, hidden, "embed"),
        ],
        "final_mod": [
            _swapped_halves("final_layer_adaLN_modulation_1", "norm_out.linear", hidden, "embed")
        ],
        "final_linear": [
            _linear(
                "final_layer_linear",
                "proj_out",
                hidden,
                patch * patch * int(config.get("out_channels") or config["in_channels"]),
                "embed",
            )
        ],
    }
    return [t for key in SD3_EMB_DIMS for t in layers[key]]
