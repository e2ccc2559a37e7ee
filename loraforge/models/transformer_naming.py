"""kohya LoRA names of the flow-matching transformers (FLUX.1, SD3/SD3.5), as sd-scripts writes them.

sd-scripts trains the original layouts (BFL's ``Flux``, SAI's ``MMDiT``), so its names follow
their module paths (``lora_unet_`` + path with ``.`` -> ``_``), while loraforge trains diffusers'
``FluxTransformer2DModel`` / ``SD3Transformer2DModel``. One original Linear can be several
diffusers Linears reading the same input: BFL's ``img_attn.qkv`` is diffusers' ``to_q``, ``to_k``
and ``to_v``; ``single_blocks.N.linear1`` is ``to_q``, ``to_k``, ``to_v`` and ``proj_mlp``. Such a
target is ONE LoRA (down ``(r, in)``, up ``(sum(outs), r)``), the up's row bands feeding the
diffusers Linears in order, which is exactly sd-scripts' LoRA on the fused layer. Where the two
layouts order a layer's outputs differently (SD3's last ``context_block.adaLN_modulation`` and
``final_layer.adaLN_modulation``: shift/scale vs diffusers' scale/shift), the bands are swapped.

Default targets (sd-scripts' ``networks/lora_flux.py`` / ``lora_sd3.py``): every Linear of
FLUX's ``DoubleStreamBlock``/``SingleStreamBlock`` (attention, MLP and the modulation layers) and
of SD3's ``SingleDiTBlock`` (both halves of every ``joint_blocks.N``); text encoders' CLIP
attention/MLP (``lora_te1_`` CLIP-L, ``lora_te2_`` CLIP-G on SD3) and, with ``train_t5xxl``,
T5's attention and gated MLP (``lora_te3_``). The embedders / final layer only with
``in_dims`` (FLUX) or ``emb_dims`` (SD3), one rank each (0 = none).

Everything here except :func:`resolve_parts` and :func:`text_encoder_targets` is pure (no torch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loraforge.models.naming import canonical_clip_path

if TYPE_CHECKING:
    from torch import nn

TRANSFORMER_FAMILIES = ("flux", "sd3")
UNET_PREFIX = "lora_unet_"  # sd-scripts keeps the UNet prefix "to make ComfyUI compatible"

# sd-scripts' TEXT_ENCODER_TARGET_REPLACE_MODULE for FLUX/SD3 (matched by class name)
TEXT_ENCODER_TARGET_CLASSES = (
    "CLIPAttention",
    "CLIPSdpaAttention",
    "CLIPFlashAttention2",
    "CLIPMLP",
    "T5Attention",
    "T5DenseGatedActDense",
)
FLUX_NUM_DOUBLE_BLOCKS = 19
FLUX_NUM_SINGLE_BLOCKS = 38
# FLUX in_dims order: img, time, vector, guidance, txt
FLUX_IN_DIMS = ("img_in", "time_in", "vector_in", "guidance_in", "txt_in")
# SD3 emb_dims order: context, t, x, y, final_mod, final_linear
SD3_EMB_DIMS = (
    "context_embedder",
    "t_embedder",
    "x_embedder",
    "y_embedder",
    "final_mod",
    "final_linear",
)


@dataclass(frozen=True)
class Part:
    """One diffusers layer fed by a band of a LoRA's up rows.

    Attributes:
        path: module path inside the transformer (or text encoder).
        rows: ``(start, stop)`` rows of the kohya ``lora_up`` (and of the original layer's output).
        dest: the first row of the diffusers layer's weight that ``rows[0]`` adds to.
    """

    path: str
    rows: tuple[int, int]
    dest: int = 0


@dataclass(frozen=True)
class TransformerTarget:
    """One kohya LoRA module of a flow-matching transformer.

    Attributes:
        name: the kohya name, e.g. ``lora_unet_double_blocks_0_img_attn_qkv``.
        parts: the diffusers layers it feeds, in the original layer's output order.
        in_features: input width (shared by the parts).
        out_features: the original layer's output width (rows of ``lora_up``).
        kind: sd-scripts' module kind for per-kind dims (``img_attn``, ``txt_mlp``, ``single``,
            ``single_mod``, ``context_attn``, ``x_mod``, ``embed`` ...).
        block: ``("double"|"single"|"joint", index)`` or ``None`` outside the blocks.
        kernel: ``()`` for a Linear, ``(kh, kw)`` for SD3's patch-embedding conv.
    """

    name: str
    parts: tuple[Part, ...]
    in_features: int
    out_features: int
    kind: str
    block: tuple[str, int] | None = None
    kernel: tuple[int, ...] = ()

    @property
    def fused(self) -> bool:
        """Whether the target is more than one plain diffusers layer."""
        return len(self.parts) != 1 or self.parts[0].dest != 0


@dataclass(frozen=True)
class TransformerLoraOptions:
    """sd-scripts' network_args that decide which transformer modules get a LoRA.

    Attributes:
        train_blocks: FLUX ``all`` | ``double`` | ``single``.
        double_blocks: FLUX ``train_double_block_indices`` as a set of indices (``None`` = all).
        single_blocks: FLUX ``train_single_block_indices`` (``None`` = all).
        joint_blocks: SD3 ``train_block_indices`` (``None`` = all).
        extra_dims: FLUX ``in_dims`` (5 ranks) or SD3 ``emb_dims`` (6 ranks); ``None`` = none.
    """

    train_blocks: str = "all"
    double_blocks: frozenset[int] | None = None
    single_blocks: frozenset[int] | None = None
    joint_blocks: frozenset[int] | None = None
    extra_dims: tuple[int, ...] | None = None


def parse_block_selection(selection: str, total: int) -> frozenset[int]:
    """sd-scripts' ``parse_block_selection``: ``all``, ``none``/``""``, ``0-4,7`` -> indices.

    Raises:
        ValueError: an index outside ``0..total-1`` or a malformed range.
    """
    text = selection.strip()
    if text == "all":
        return frozenset(range(total))
    if text in ("none", ""):
        return frozenset()
    chosen: set[int] = set()
    for item in text.split(","):
        start_text, _, end_text = item.partition("-")
        start = int(start_text)
        end = int(end_text) if end_text.strip() else start
        if not 0 <= start <= end < total:
            raise ValueError(f"block selection {item.strip()!r} is outside 0-{total - 1}")
        chosen.update(range(start, end + 1))
    return frozenset(chosen)


def transformer_targets(
    family: str,
    config: Mapping[str, Any],
    options: TransformerLoraOptions = TransformerLoraOptions(),
) -> list[TransformerTarget]:
    """The targets of a diffusers FLUX/SD3 transformer config (see
    :mod:`loraforge.models.transformer_layouts`), in sd-scripts' order.

    Raises:
        ValueError: a family without a flow-matching transformer.
    """
    from loraforge.models.transformer_layouts import flux_targets, sd3_targets

    if family == "flux":
        return flux_targets(config, options)
    if family == "sd3":
        return sd3_targets(config, options)
    raise ValueError(f"{family!r} has no flow-matching transformer; expected flux or sd3")


def extra_dim_of(family: str, target: TransformerTarget, dims: Sequence[int]) -> int:
    """The rank ``in_dims`` (FLUX) / ``emb_dims`` (SD3) give an embedder/final-layer target."""
    keys = FLUX_IN_DIMS if family == "flux" else SD3_EMB_DIMS
    name = target.name[len(UNET_PREFIX) :]
    if family == "sd3" and name.startswith("final_layer_"):
        key = "final_mod" if "adaLN" in name else "final_linear"
    else:
        key = next(k for k in keys if name.startswith(k))
    return int(dims[keys.index(key)])


def text_encoder_prefix(family: str, encoder_index: int) -> str:
    """``lora_te1_`` (CLIP-L), ``lora_te2_`` (SD3's CLIG-G), ``lora_te3_`` (T5-XXL).

    FLUX's encoders are ``[clip_l, t5xxl]``, SD3's ``[clip_l, clip_g, t5xxl]``.

    Raises:
        ValueError: an index the family does not have.
    """
    order = {"flux": (1, 3), "sd3": (1, 2, 3)}.get(family)
    if order is None:
        raise ValueError(f"{family!r} is not a flow-matching family; expected flux or sd3")
    if not 0 <= encoder_index < len(order):
        raise ValueError(f"{family} has {len(order)} text encoders; got index {encoder_index}")
    return f"lora_te{order[encoder_index]}_"


def text_encoder_lora_name(family: str, encoder_index: int, module_path: str) -> str:
    """kohya name of a text-encoder layer: CLIP paths in their ``text_model.`` spelling, T5
    paths as they are (``lora_te3_encoder_block_0_layer_0_SelfAttention_q``)."""
    path = module_path if is_t5_index(family, encoder_index) else canonical_clip_path(module_path)
    return text_encoder_prefix(family, encoder_index) + path.replace(".", "_")


def is_t5_index(family: str, encoder_index: int) -> bool:
    """Whether that encoder is T5-XXL (trained only with ``train_t5xxl``)."""
    return text_encoder_prefix(family, encoder_index) == "lora_te3_"


def text_encoder_targets(
    family: str, text_encoders: Sequence[nn.Module | None], *, train_t5xxl: bool = False
) -> dict[str, nn.Module]:
    """kohya name -> Linear of every text-encoder layer sd-scripts wraps (T5 only if asked).

    ``None`` entries (an encoder not loaded) are skipped.
    """
    import torch

    targets: dict[str, nn.Module] = {}
    for index, encoder in enumerate(text_encoders):
        if encoder is None or (is_t5_index(family, index) and not train_t5xxl):
            continue
        for name, module in encoder.named_modules():
            if type(module).__name__ not in TEXT_ENCODER_TARGET_CLASSES:
                continue
            for child_name, child in module.named_modules():
                if child_name and isinstance(child, torch.nn.Linear):
                    path = f"{name}.{child_name}" if name else child_name
                    targets.setdefault(text_encoder_lora_name(family, index, path), child)
    return targets


def resolve_parts(root: nn.Module, target: TransformerTarget) -> list[nn.Module]:
    """The diffusers layers of ``target``'s parts inside ``root``, checked against its shapes.

    Raises:
        ValueError: a layer is missing or its shape does not fit (a config/naming mismatch).
    """
    layers = []
    for part in target.parts:
        try:
            layer = root.get_submodule(part.path)
        except AttributeError as e:
            raise ValueError(f"{target.name}: the model has no layer {part.path!r}") from e
        n_in = getattr(layer, "in_features", getattr(layer, "in_channels", None))
        n_out = getattr(layer, "out_features", getattr(layer, "out_channels", None))
        width = part.rows[1] - part.rows[0]
        if n_in != target.in_features or n_out is None or part.dest + width > n_out:
            raise ValueError(
                f"{target.name}: layer {part.path!r} is {n_in}->{n_out}, expected "
                f"{target.in_features} inputs and rows {part.dest}..{part.dest + width}"
            )
        layers.append(layer)
    return layers
