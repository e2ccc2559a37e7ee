"""The layer structure of SD UNets, VAEs and CLIP text encoders, from their configs alone.

A pure-Python walk of what ``UNet2DConditionModel``, ``AutoencoderKL`` and ``CLIPTextModel``
build from a config (the standard block types of SD 1.x/2.x/SDXL: cross-attention and plain
down/up blocks, the cross-attention mid block, GEGLU feed-forward). It yields

* every ``Linear``/``Conv2d`` with its diffusers path and shape, and where it sits (inside a
  transformer block, a ResNet, a sampler), so LoRA targets and parameter counts follow, and
* the blocks in forward order with their channels and spatial size, for the activation model.

The tests compare these counts with the real modules instantiated on the meta device.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Layer:
    """One ``Linear`` (kernel 0) or ``Conv2d`` of a model.

    Attributes:
        path: module path as diffusers / transformers names it.
        in_features, out_features, kernel: shape; ``kernel`` 0 for Linear.
        bias: whether it has a bias.
        owner: the LoRA target class it sits in: ``transformer`` (Transformer2DModel),
            ``resnet`` (ResnetBlock2D), ``sampler`` (Down/Upsample2D), ``text`` (CLIP attention
            or MLP), or ``other``.
    """

    path: str
    in_features: int
    out_features: int
    kernel: int
    bias: bool
    owner: str

    @property
    def params(self) -> int:
        weight = self.in_features * self.out_features * max(self.kernel, 1) ** 2
        return weight + (self.out_features if self.bias else 0)


@dataclass(frozen=True)
class Block:
    """A UNet block in forward order, for the activation model.

    Attributes:
        kind: ``resnet`` | ``transformer`` | ``down`` | ``up``.
        c_in, c_out: channels in and out.
        tokens: spatial positions per sample at the block's input resolution.
        layers: transformer blocks inside a ``transformer`` (else 0).
        heads: attention heads of a ``transformer``.
        linear_proj: a ``transformer``'s proj_in/proj_out are Linear (else 1x1 conv).
        path: the block's diffusers path.
    """

    kind: str
    c_in: int
    c_out: int
    tokens: int
    layers: int = 0
    heads: int = 0
    linear_proj: bool = False
    path: str = ""


def _per_level(value: Any, levels: int) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def _resnet(path: str, c_in: int, c_out: int, temb: int | None) -> list[Layer]:
    layers = [
        Layer(f"{path}.conv1", c_in, c_out, 3, True, "resnet"),
        Layer(f"{path}.conv2", c_out, c_out, 3, True, "resnet"),
    ]
    if temb:
        layers.insert(1, Layer(f"{path}.time_emb_proj", temb, c_out, 0, True, "resnet"))
    if c_in != c_out:
        layers.append(Layer(f"{path}.conv_shortcut", c_in, c_out, 1, True, "resnet"))
    return layers


def _transformer(
    path: str, channels: int, depth: int, cross: int, linear_proj: bool
) -> list[Layer]:
    kernel = 0 if linear_proj else 1
    layers = [Layer(f"{path}.proj_in", channels, channels, kernel, True, "transformer")]
    for i in range(depth):
        block = f"{path}.transformer_blocks.{i}"
        for attn, context in (("attn1", channels), ("attn2", cross)):
            layers += [
                Layer(f"{block}.{attn}.to_q", channels, channels, 0, False, "transformer"),
                Layer(f"{block}.{attn}.to_k", context, channels, 0, False, "transformer"),
                Layer(f"{block}.{attn}.to_v", context, channels, 0, False, "transformer"),
                Layer(f"{block}.{attn}.to_out.0", channels, channels, 0, True, "transformer"),
            ]
        layers += [
            Layer(f"{block}.ff.net.0.proj", channels, 8 * channels, 0, True, "transformer"),
            Layer(f"{block}.ff.net.2", 4 * channels, channels, 0, True, "transformer"),
        ]
    layers.append(Layer(f"{path}.proj_out", channels, channels, kernel, True, "transformer"))
    return layers


def _norm_params_transformer(channels: int, depth: int) -> int:
    # GroupNorm + three LayerNorms per transformer block, each weight and bias
    return 2 * channels + depth * 3 * 2 * channels


def _resnet_norm_params(c_in: int, c_out: int) -> int:
    return 2 * c_in + 2 * c_out


@dataclass(frozen=True)
class UNetStructure:
    """Layers, blocks and parameter count of a UNet config at one latent size."""

    layers: tuple[Layer, ...]
    blocks: tuple[Block, ...]
    params: int
    time_embed_dim: int

    @property
    def layer_params(self) -> int:
        """Parameters of Linear and Conv2d layers (what ``fp8_base`` stores in float8)."""
        return sum(layer.params for layer in self.layers)


def _shrink(size: tuple[int, int]) -> tuple[int, int]:
    # a stride-2, padding-1, 3x3 convolution: ceil(n / 2)
    return (-(-size[0] // 2), -(-size[1] // 2))


class _UNetWalker:
    """Accumulates layers, blocks and extra (norm) parameters while walking a UNet config."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config
        self.layers: list[Layer] = []
        self.blocks: list[Block] = []
        self.extra = 0
        channels = list(config["block_out_channels"])
        levels = len(channels)
        self.channels = channels
        self.levels = levels
        heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
        self.heads = _per_level(heads, levels)
        self.depths = _per_level(config.get("transformer_layers_per_block", 1), levels)
        self.per_level = _per_level(config.get("layers_per_block", 2), levels)
        self.cross = int(config["cross_attention_dim"])
        self.linear_proj = bool(config.get("use_linear_projection", False))
        self.temb = int(config.get("time_embedding_dim") or 4 * channels[0])

    def resnet(self, path: str, c_in: int, c_out: int, tokens: int) -> None:
        self.layers += _resnet(path, c_in, c_out, self.temb)
        self.extra += _resnet_norm_params(c_in, c_out)
        self.blocks.append(Block("resnet", c_in, c_out, tokens, path=path))

    def transformer(self, path: str, channels: int, level: int, tokens: int) -> None:
        depth = int(self.depths[level])
        self.layers += _transformer(path, channels, depth, self.cross, self.linear_proj)
        self.extra += _norm_params_transformer(channels, depth)
        heads = int(self.heads[level])
        self.blocks.append(
            Block("transformer", channels, channels, tokens, depth, heads, self.linear_proj, path)
        )

    def sampler(self, kind: str, path: str, channels: int, tokens: int) -> None:
        self.layers.append(Layer(f"{path}.conv", channels, channels, 3, True, "sampler"))
        self.blocks.append(Block(kind, channels, channels, tokens, path=path))


def _walk_down(w: _UNetWalker, size: tuple[int, int]) -> list[tuple[int, int]]:
    sizes = []
    c_out = w.channels[0]
    for level, kind in enumerate(w.config["down_block_types"]):
        c_in, c_out = c_out, w.channels[level]
        sizes.append(size)
        tokens = size[0] * size[1]
        for j in range(int(w.per_level[level])):
            w.resnet(f"down_blocks.{level}.resnets.{j}", c_in if j == 0 else c_out, c_out, tokens)
            if "CrossAttn" in kind:
                w.transformer(f"down_blocks.{level}.attentions.{j}", c_out, level, tokens)
        if level < w.levels - 1:
            w.sampler("down", f"down_blocks.{level}.downsamplers.0", c_out, tokens)
            size = _shrink(size)
    return sizes


def _walk_up(w: _UNetWalker, sizes: Sequence[tuple[int, int]]) -> None:
    rev = list(reversed(w.channels))
    per_level = list(reversed(w.per_level))
    c_out = rev[0]
    for i, kind in enumerate(w.config["up_block_types"]):
        level = w.levels - 1 - i
        prev, c_out = c_out, rev[i]
        skip_in = rev[min(i + 1, w.levels - 1)]
        size = sizes[level]
        tokens = size[0] * size[1]
        count = int(per_level[i]) + 1
        for j in range(count):
            skip = skip_in if j == count - 1 else c_out
            resnet_in = (prev if j == 0 else c_out) + skip
            w.resnet(f"up_blocks.{i}.resnets.{j}", resnet_in, c_out, tokens)
            if "CrossAttn" in kind:
                w.transformer(f"up_blocks.{i}.attentions.{j}", c_out, level, tokens)
        if i < w.levels - 1:
            up_size = sizes[level - 1]
            w.sampler("up", f"up_blocks.{i}.upsamplers.0", c_out, up_size[0] * up_size[1])


def unet_structure(
    config: Mapping[str, Any], latent_size: tuple[int, int] = (64, 64)
) -> UNetStructure:
    """Walk a ``UNet2DConditionModel`` config (see the module docstring for what is supported).

    Args:
        config: the UNet ``config.json`` contents.
        latent_size: ``(width, height)`` of the latents (sets each block's ``tokens``).

    Raises:
        ValueError: a block type or option the walk does not know.
    """
    _check_unet(config)
    w = _UNetWalker(config)
    c0, in_ch = w.channels[0], int(config.get("in_channels", 4))
    out_ch = int(config.get("out_channels", 4))
    w.layers += [
        Layer("conv_in", in_ch, c0, 3, True, "other"),
        Layer("time_embedding.linear_1", c0, w.temb, 0, True, "other"),
        Layer("time_embedding.linear_2", w.temb, w.temb, 0, True, "other"),
    ]
    if config.get("addition_embed_type") == "text_time":
        added = int(config["projection_class_embeddings_input_dim"])
        w.layers += [
            Layer("add_embedding.linear_1", added, w.temb, 0, True, "other"),
            Layer("add_embedding.linear_2", w.temb, w.temb, 0, True, "other"),
        ]
    sizes = _walk_down(w, (latent_size[0], latent_size[1]))
    deepest = sizes[-1][0] * sizes[-1][1]
    c_last = w.channels[-1]
    w.resnet("mid_block.resnets.0", c_last, c_last, deepest)
    w.transformer("mid_block.attentions.0", c_last, w.levels - 1, deepest)
    w.resnet("mid_block.resnets.1", c_last, c_last, deepest)
    _walk_up(w, sizes)
    w.layers.append(Layer("conv_out", c0, out_ch, 3, True, "other"))
    w.extra += 2 * c0  # conv_norm_out
    params = sum(layer.params for layer in w.layers) + w.extra
    return UNetStructure(tuple(w.layers), tuple(w.blocks), params, w.temb)


_DOWN_TYPES = {"CrossAttnDownBlock2D", "DownBlock2D"}
_UP_TYPES = {"CrossAttnUpBlock2D", "UpBlock2D"}


def _check_unet(config: Mapping[str, Any]) -> None:
    unknown = [t for t in config.get("down_block_types", ()) if t not in _DOWN_TYPES]
    unknown += [t for t in config.get("up_block_types", ()) if t not in _UP_TYPES]
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid != "UNetMidBlock2DCrossAttn":
        unknown.append(mid)
    if config.get("class_embed_type") or config.get("encoder_hid_dim_type"):
        unknown.append("class/encoder-hidden embeddings")
    if config.get("addition_embed_type") not in (None, "text_time"):
        unknown.append(f"addition_embed_type {config.get('addition_embed_type')}")
    if unknown:
        raise ValueError(f"the analytic VRAM model does not know: {', '.join(map(str, unknown))}")


# ---- VAE ------------------------------------------------------------------------------------


def _vae_mid(path: str, channels: int, temb: None = None) -> tuple[list[Layer], int]:
    layers = _resnet(f"{path}.resnets.0", channels, channels, temb)
    layers += [
        Layer(f"{path}.attentions.0.{name}", channels, channels, 0, True, "other")
        for name in ("to_q", "to_k", "to_v", "to_out.0")
    ]
    layers += _resnet(f"{path}.resnets.1", channels, channels, temb)
    norms = 2 * _resnet_norm_params(channels, channels) + 2 * channels
    return layers, norms


def vae_params(config: Mapping[str, Any]) -> int:
    """Parameters of an ``AutoencoderKL`` built from ``config``."""
    channels = list(config.get("block_out_channels", (64,)))
    per = int(config.get("layers_per_block", 1))
    latent = int(config.get("latent_channels", 4))
    in_ch, out_ch = int(config.get("in_channels", 3)), int(config.get("out_channels", 3))
    layers = [Layer("encoder.conv_in", in_ch, channels[0], 3, True, "other")]
    norms = 0
    c_out = channels[0]
    for level, width in enumerate(channels):
        c_in, c_out = c_out, width
        for j in range(per):
            layers += _resnet(f"e{level}.{j}", c_in if j == 0 else c_out, c_out, None)
            norms += _resnet_norm_params(c_in if j == 0 else c_out, c_out)
        if level < len(channels) - 1:
            layers.append(Layer(f"e{level}.down", c_out, c_out, 3, True, "other"))
    for prefix in ("encoder.mid", "decoder.mid"):
        mid_layers, mid_norms = _vae_mid(prefix, channels[-1])
        layers += mid_layers
        norms += mid_norms
    layers.append(Layer("encoder.conv_out", channels[-1], 2 * latent, 3, True, "other"))
    layers.append(Layer("decoder.conv_in", latent, channels[-1], 3, True, "other"))
    rev = list(reversed(channels))
    c_out = rev[0]
    for i, width in enumerate(rev):
        prev, c_out = c_out, width
        for j in range(per + 1):
            layers += _resnet(f"d{i}.{j}", prev if j == 0 else c_out, c_out, None)
            norms += _resnet_norm_params(prev if j == 0 else c_out, c_out)
        if i < len(rev) - 1:
            layers.append(Layer(f"d{i}.up", c_out, c_out, 3, True, "other"))
    layers.append(Layer("decoder.conv_out", channels[0], out_ch, 3, True, "other"))
    norms += 2 * channels[-1] + 2 * channels[0]  # encoder and decoder conv_norm_out
    if config.get("use_quant_conv", True):
        layers.append(Layer("quant_conv", 2 * latent, 2 * latent, 1, True, "other"))
    if config.get("use_post_quant_conv", True):
        layers.append(Layer("post_quant_conv", latent, latent, 1, True, "other"))
    return sum(layer.params for layer in layers) + norms


# ---- CLIP text encoders -------------------------------------------------------------------------


@dataclass(frozen=True)
class TextStructure:
    """A CLIP text encoder's target layers and size."""

    layers: tuple[Layer, ...]
    params: int
    hidden: int
    intermediate: int
    depth: int
    heads: int
    projection: int = 0

    @property
    def layer_params(self) -> int:
        """Parameters of Linear layers, the projection included (stored in float8 by fp8_base)."""
        return sum(layer.params for layer in self.layers) + self.projection


def text_structure(config: Mapping[str, Any], *, projection: bool) -> TextStructure:
    """Walk a ``CLIPTextConfig`` (``projection``: ``CLIPTextModelWithProjection``).

    Module paths are the transformers >= 5 ones (``encoder.layers.N…``); naming maps them.
    """
    hidden = int(config["hidden_size"])
    inner = int(config["intermediate_size"])
    depth = int(config["num_hidden_layers"])
    vocab = int(config["vocab_size"])
    positions = int(config.get("max_position_embeddings", 77))
    prefix = "text_model." if projection else ""
    layers: list[Layer] = []
    for i in range(depth):
        base = f"{prefix}encoder.layers.{i}"
        for name in ("k_proj", "v_proj", "q_proj", "out_proj"):
            layers.append(Layer(f"{base}.self_attn.{name}", hidden, hidden, 0, True, "text"))
        layers.append(Layer(f"{base}.mlp.fc1", hidden, inner, 0, True, "text"))
        layers.append(Layer(f"{base}.mlp.fc2", inner, hidden, 0, True, "text"))
    norms = depth * 2 * 2 * hidden + 2 * hidden
    projection_params = hidden * int(config.get("projection_dim", hidden)) if projection else 0
    params = sum(layer.params for layer in layers) + norms + (vocab + positions) * hidden
    params += projection_params
    heads = int(config.get("num_attention_heads", 12))
    return TextStructure(tuple(layers), params, hidden, inner, depth, heads, projection_params)


def iter_unet_targets(structure: UNetStructure, *, conv: bool) -> Iterator[Layer]:
    """kohya's UNet LoRA targets: transformer layers, and with ``conv`` ResNet/sampler ones."""
    owners = ("transformer", "resnet", "sampler") if conv else ("transformer",)
    return (layer for layer in structure.layers if layer.owner in owners)
