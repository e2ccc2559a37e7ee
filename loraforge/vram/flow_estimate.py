"""The analytic estimate for SD3 / FLUX.1: the transformer's weights (fp8, block swap), the text
encoders (T5-XXL is most of it unless its outputs are cached), the LoRA and optimizer state,
and the transformer's activations.

Activations: every block keeps about :data:`SAVED_PER_TOKEN` width-sized maps per token for
backward (norm outputs, q/k/v, attention output, the MLP's hidden maps, the LoRA inputs); with
gradient checkpointing only each block's input survives and one block's maps are rebuilt at a
time. Tokens are the image's (latent/2 per side: FLUX's 2x2 packing, SD3's patch 2) plus the
text's (T5's, and SD3's 77 CLIP tokens). Attention is SDPA (no N x N map).
"""

from __future__ import annotations

from loraforge.models.flow_prompts import CLIP_TOKENS, caption_token_length
from loraforge.recipe.types import Recipe
from loraforge.vram.analytic import millions, stored_bytes, vae_weight_row
from loraforge.vram.arch import Architecture
from loraforge.vram.flow_structure import FlowStructure, flow_structure, swapped_blocks, t5_params
from loraforge.vram.network_size import NetworkSize
from loraforge.vram.overhead import estimate_with_overheads
from loraforge.vram.result import VramEstimate, VramRow
from loraforge.vram.settings import DTYPE_BYTES, MemorySettings
from loraforge.vram.structure import text_structure

#: width-sized maps per token a block keeps for backward (double/joint blocks: two streams)
SAVED_PER_TOKEN = {"double": 24, "single": 20}
#: transient maps while a block runs (attention inputs/outputs, the MLP's hidden map)
WORKING_PER_TOKEN = 8


def flow_network_size(recipe: Recipe, arch: Architecture) -> NetworkSize:
    """sd-scripts' LoRA targets of the transformer (a fused layer such as ``qkv`` is one LoRA,
    :func:`loraforge.models.transformer_naming.transformer_targets`; block selections in
    ``network.args`` are not applied): ``rank * (in + out)`` each, plus alpha."""
    from loraforge.models.transformer_naming import transformer_targets

    rank = recipe.network.dim
    targets = transformer_targets(arch.family, arch.configs["transformer"])
    sizes: list[int] = []
    for target in targets:
        sizes += [rank * target.in_features, target.out_features * rank]
    total = sum(sizes)
    return NetworkSize(total, total, len(targets), 0, 0, tuple(sizes), len(targets))


def _transformer_rows(recipe: Recipe, structure: FlowStructure, s: MemorySettings) -> list[VramRow]:
    swap = swapped_blocks(structure, recipe.training.blocks_to_swap)
    off_gpu = sum(structure.block_params[i] for i in swap)
    # the swapped blocks' Linear share, to store the rest in fp8
    share = structure.layer_params / max(1, sum(structure.block_params))
    on_gpu = structure.params - off_gpu
    stored = stored_bytes(on_gpu, int(on_gpu * share), s.unet_dtype, s.compute_dtype)
    stored += structure.buffer_elements * DTYPE_BYTES[s.compute_dtype]
    what = millions(structure.params)
    if swap:
        # one swapped block is on its way in while another runs (sd-scripts' offloader)
        biggest = max(structure.block_params[i] for i in swap)
        stored += stored_bytes(biggest, int(biggest * share), s.unet_dtype, s.compute_dtype)
        what += f", {len(swap)} blocks ({millions(off_gpu)}) swapped to the CPU"
    return [VramRow(f"transformer weights ({s.unet_dtype})", stored, what)]


def _encoder_rows(arch: Architecture, s: MemorySettings) -> list[VramRow]:
    rows = []
    for index, name in enumerate(arch.text_encoder_names):
        config = arch.configs[name]
        if config.get("model_type") == "t5":
            params, linear = t5_params(config)
            label = "T5-XXL"
        else:
            projection = (config.get("architectures") or [""])[0].endswith("Projection")
            text = text_structure(config, projection=projection)
            params, linear = text.params, text.layer_params
            label = f"CLIP text encoder {index + 1}"
        if s.text_encoders_on_gpu:
            stored = stored_bytes(params, linear, s.text_encoder_dtype, s.compute_dtype)
            rows.append(
                VramRow(f"{label} weights ({s.text_encoder_dtype})", stored, millions(params))
            )
        else:
            rows.append(VramRow(f"{label} weights", 0, "outputs cached: kept off the GPU", "info"))
    rows.append(vae_weight_row(arch, s))
    return rows


def _tokens(recipe: Recipe, arch: Architecture, s: MemorySettings) -> tuple[int, int]:
    """``(image tokens, text tokens)`` of the largest bucket."""
    m = recipe.model
    text = caption_token_length(
        arch.family, arch.variant, m.max_token_length, m.t5xxl_max_token_length
    )
    if arch.family == "sd3":
        text += CLIP_TOKENS
    latent_w, latent_h = s.latent_size
    return (latent_w // 2) * (latent_h // 2), text


def _activation_row(
    recipe: Recipe, arch: Architecture, structure: FlowStructure, s: MemorySettings
) -> VramRow:
    image, text = _tokens(recipe, arch, s)
    n = image + text
    p = DTYPE_BYTES[s.compute_dtype]
    d = structure.width
    blocks = len(structure.block_params)
    kinds = ["double"] * structure.double_blocks + ["single"] * (blocks - structure.double_blocks)
    per_block = [SAVED_PER_TOKEN[k] * n * d * p for k in kinds]
    # with checkpointing: each block's input, and one block's maps rebuilt at a time
    # (with cpu_offload_checkpointing the block inputs wait in CPU memory: one on the GPU)
    kept = 1 if recipe.training.cpu_offload_checkpointing else blocks
    checkpointed = kept * n * d * p + max(per_block)
    saved = checkpointed if s.gradient_checkpointing else sum(per_block)
    working = WORKING_PER_TOKEN * n * d * p
    gc = "on" if s.gradient_checkpointing else "off"
    return VramRow(
        "transformer activations",
        int(s.batch_size * (saved + working)),
        f"{s.width}x{s.height}: {image} image + {text} text tokens, batch {s.batch_size}, "
        f"checkpointing {gc}",
        "step",
    )


def flow_analytic_estimate(recipe: Recipe, arch: Architecture, s: MemorySettings) -> VramEstimate:
    """Estimate an SD3 / FLUX recipe on ``arch`` analytically (no torch)."""
    from loraforge.vram.analytic import _network_rows, _optimizer_phase, _peak_phase, _vae_phase

    structure = flow_structure(arch.configs["transformer"])
    size = flow_network_size(recipe, arch)
    resident = (
        _transformer_rows(recipe, structure, s)
        + _encoder_rows(arch, s)
        + _network_rows(recipe, s, size)
    )
    optimizer_phase = _optimizer_phase(s, size)
    kept = optimizer_phase[:1] if recipe.training.gradient_accumulation_steps > 1 else []
    latent_w, latent_h = s.latent_size
    inputs = s.batch_size * 16 * latent_w * latent_h * 6 * 4
    phases = {
        "the transformer step": [
            _activation_row(recipe, arch, structure, s),
            VramRow("inputs and loss", inputs, "latents, noise, targets (fp32)", "step"),
            *kept,
        ],
        "the optimizer step": optimizer_phase,
    }
    if s.vae_on_gpu:
        note = "no-grad encode of the batch before the transformer step"
        phases["the VAE encode"] = [
            VramRow("VAE encode (transient)", _vae_phase(arch, s), note, "step"),
            *kept,
        ]
    rows = resident + _peak_phase(phases)
    notes = ["SD3/FLUX activations follow a per-block rule (see loraforge.vram.flow_estimate)"]
    return estimate_with_overheads("analytic", s, arch, rows, sum(r.bytes for r in rows), notes)
