"""The layer structure of the SD3 / FLUX.1 transformers and the T5 encoder, from configs alone.

A pure-Python walk of what diffusers' ``FluxTransformer2DModel`` / ``SD3Transformer2DModel`` and
transformers' ``T5EncoderModel`` build: every ``Linear`` inside the transformer blocks (the LoRA
targets, as sd-scripts' ``lora_flux`` / ``lora_sd3`` adapt every Linear of a block) with its
diffusers path and shape, the parameters of each swappable block, and the totals. The tests
compare the counts with the real modules instantiated on the meta device.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from loraforge.vram.structure import Layer


@dataclass(frozen=True)
class FlowStructure:
    """A flow transformer's target layers and sizes.

    Attributes:
        family: ``flux`` or ``sd3``.
        layers: the Linears inside the blocks (LoRA targets).
        params: every parameter.
        block_params: parameters of each block in forward order (FLUX: double then single).
        double_blocks: FLUX's double-stream blocks (SD3: every joint block).
        width: hidden width (heads x head dim).
        patch_tokens: latent pixels per image token (4: FLUX's 2x2 packing, SD3's patch 2).
    """

    family: str
    layers: tuple[Layer, ...]
    params: int
    block_params: tuple[int, ...]
    double_blocks: int
    width: int
    patch_tokens: int = 4
    buffer_elements: int = 0  # SD3's position-embedding table (a buffer, cast with the model)

    @property
    def layer_params(self) -> int:
        """Parameters of the Linear layers (stored in float8 by ``fp8_base``)."""
        return sum(layer.params for layer in self.layers)


def _linear(path: str, n_in: int, n_out: int, bias: bool = True) -> Layer:
    return Layer(path, n_in, n_out, 0, bias, "transformer")


def _flux_double(i: int, d: int, head: int) -> tuple[list[Layer], int]:
    p = f"transformer_blocks.{i}"
    layers = [
        _linear(f"{p}.norm1.linear", d, 6 * d),
        _linear(f"{p}.norm1_context.linear", d, 6 * d),
    ]
    for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
        layers.append(_linear(f"{p}.attn.{name}", d, d))
    layers += [_linear(f"{p}.attn.to_out.0", d, d), _linear(f"{p}.attn.to_add_out", d, d)]
    for ff in ("ff", "ff_context"):
        layers += [_linear(f"{p}.{ff}.net.0.proj", d, 4 * d), _linear(f"{p}.{ff}.net.2", 4 * d, d)]
    return layers, 4 * head  # RMS q/k norms of both streams


def _flux_single(i: int, d: int, head: int) -> tuple[list[Layer], int]:
    p = f"single_transformer_blocks.{i}"
    layers = [_linear(f"{p}.norm.linear", d, 3 * d), _linear(f"{p}.proj_mlp", d, 4 * d)]
    layers += [_linear(f"{p}.attn.{name}", d, d) for name in ("to_q", "to_k", "to_v")]
    layers.append(_linear(f"{p}.proj_out", 5 * d, d))
    return layers, 2 * head


def _flux(config: Mapping[str, Any]) -> FlowStructure:
    head = int(config["attention_head_dim"])
    d = int(config["num_attention_heads"]) * head
    layers: list[Layer] = []
    blocks: list[int] = []
    for i in range(int(config["num_layers"])):
        block, norms = _flux_double(i, d, head)
        layers += block
        blocks.append(sum(x.params for x in block) + norms)
    for i in range(int(config["num_single_layers"])):
        block, norms = _flux_single(i, d, head)
        layers += block
        blocks.append(sum(x.params for x in block) + norms)
    channels = int(config["in_channels"])
    outer = [
        _linear("x_embedder", channels, d),
        _linear("context_embedder", int(config["joint_attention_dim"]), d),
        _linear("time", 256, d),
        _linear("time2", d, d),
        _linear("text", int(config["pooled_projection_dim"]), d),
        _linear("text2", d, d),
        _linear("norm_out.linear", d, 2 * d),
        _linear("proj_out", d, channels),
    ]
    if config.get("guidance_embeds"):
        outer += [_linear("guidance", 256, d), _linear("guidance2", d, d)]
    params = sum(blocks) + sum(x.params for x in outer)
    return FlowStructure("flux", tuple(layers), params, tuple(blocks), int(config["num_layers"]), d)


def _sd3_block(i: int, d: int, last: bool, dual: bool, qk: bool) -> list[Layer]:
    p = f"transformer_blocks.{i}"
    layers = [
        _linear(f"{p}.norm1.linear", d, (9 if dual else 6) * d),
        _linear(f"{p}.norm1_context.linear", d, (2 if last else 6) * d),
    ]
    for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
        layers.append(_linear(f"{p}.attn.{name}", d, d))
    layers.append(_linear(f"{p}.attn.to_out.0", d, d))
    if not last:
        layers.append(_linear(f"{p}.attn.to_add_out", d, d))
    if dual:
        layers += [_linear(f"{p}.attn2.{n}", d, d) for n in ("to_q", "to_k", "to_v", "to_out.0")]
    for ff in ("ff",) if last else ("ff", "ff_context"):
        layers += [_linear(f"{p}.{ff}.net.0.proj", d, 4 * d), _linear(f"{p}.{ff}.net.2", 4 * d, d)]
    return layers


def _sd3(config: Mapping[str, Any]) -> FlowStructure:
    head = int(config["attention_head_dim"])
    d = int(config["num_attention_heads"]) * head
    depth = int(config["num_layers"])
    dual_layers = set(config.get("dual_attention_layers") or ())
    qk = bool(config.get("qk_norm"))
    layers: list[Layer] = []
    blocks: list[int] = []
    for i in range(depth):
        block = _sd3_block(i, d, i == depth - 1, i in dual_layers, qk)
        norms = (4 + (2 if i in dual_layers else 0)) * head if qk else 0
        layers += block
        blocks.append(sum(x.params for x in block) + norms)
    patch = int(config["patch_size"])
    channels = int(config["in_channels"])
    out_channels = int(config.get("out_channels") or channels)
    outer = [
        Layer("pos_embed.proj", channels, d, patch, True, "other"),
        _linear("context_embedder", int(config["joint_attention_dim"]), d),
        _linear("time", 256, d),
        _linear("time2", d, d),
        _linear("text", int(config["pooled_projection_dim"]), d),
        _linear("text2", d, d),
        _linear("norm_out.linear", d, 2 * d),
        _linear("proj_out", d, patch * patch * out_channels),
    ]
    params = sum(blocks) + sum(x.params for x in outer)
    positions = int(config.get("pos_embed_max_size") or 0) ** 2
    return FlowStructure("sd3", tuple(layers), params, tuple(blocks), depth, d, 4, positions * d)


def flow_structure(config: Mapping[str, Any]) -> FlowStructure:
    """Walk a FLUX / SD3 transformer config (``_class_name`` tells which).

    Raises:
        ValueError: another transformer class.
    """
    cls = str(config.get("_class_name", ""))
    if cls.startswith("Flux"):
        return _flux(config)
    if cls.startswith("SD3"):
        return _sd3(config)
    raise ValueError(f"not a FLUX or SD3 transformer config: {cls or 'no _class_name'}")


def t5_params(config: Mapping[str, Any]) -> tuple[int, int]:
    """``(params, Linear params)`` of a ``T5EncoderModel`` (gated-GELU feed-forward)."""
    d, ff = int(config["d_model"]), int(config["d_ff"])
    inner = int(config["num_heads"]) * int(config["d_kv"])
    depth = int(config["num_layers"])
    gated = str(config.get("feed_forward_proj", "")).startswith("gated")
    linear = depth * (4 * d * inner + (3 if gated else 2) * d * ff)
    embeddings = int(config["vocab_size"]) * d
    bias = int(config.get("relative_attention_num_buckets", 32)) * int(config["num_heads"])
    norms = depth * 2 * d + d
    return linear + embeddings + bias + norms, linear


def swapped_blocks(structure: FlowStructure, blocks_to_swap: int) -> tuple[int, ...]:
    """Indices (into ``block_params``) of the blocks kept on the CPU, as sd-scripts swaps them:
    FLUX swaps ``n // 2`` double blocks and ``(n - n // 2) * 2`` single blocks, SD3 ``n`` joint
    blocks, each from the end of its stack."""
    return swap_indices(
        structure.family, structure.double_blocks, len(structure.block_params), blocks_to_swap
    )


def swap_indices(
    family: str, double_blocks: int, total: int, blocks_to_swap: int
) -> tuple[int, ...]:
    """:func:`swapped_blocks` from block counts (``total`` blocks, the first ``double_blocks``
    of them FLUX's double-stream ones)."""
    if blocks_to_swap <= 0:
        return ()
    if family == "sd3":
        return tuple(range(total - min(blocks_to_swap, total), total))
    doubles = min(blocks_to_swap // 2, double_blocks)
    singles = min((blocks_to_swap - blocks_to_swap // 2) * 2, total - double_blocks)
    return (*range(double_blocks - doubles, double_blocks), *range(total - singles, total))
