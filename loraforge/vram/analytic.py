"""The analytic estimate: parameter counts from the configs and per-operation activation rules.

Instant and torch-free. The peak is the resident memory (weights, network, optimizer state)
plus the largest of the step's phases: the UNet forward/backward (text-encoder and UNet
activations), the optimizer update (gradients and update buffers), when latents are not
cached, the VAE encode that comes before them and, with held-out images, the validation pass (a
UNet forward without gradients after the update, when the step's gradients are freed).
"""

from __future__ import annotations

from collections.abc import Sequence

from loraforge.backends.kohya_config import conv_dim_of
from loraforge.data.holdout import validation_requested
from loraforge.recipe.types import Recipe
from loraforge.training.optim import canonical_name, optimizer_state_bytes_per_param
from loraforge.vram.activations import (
    ActivationInputs,
    text_activations,
    unet_activations,
    unet_forward_peak,
    vae_encode_peak,
)
from loraforge.vram.arch import Architecture
from loraforge.vram.network_size import NetworkSize, network_size
from loraforge.vram.overhead import estimate_with_overheads
from loraforge.vram.result import VramEstimate, VramRow
from loraforge.vram.settings import DTYPE_BYTES, TOKENS_PER_CHUNK, MemorySettings
from loraforge.vram.sizes import format_bytes
from loraforge.vram.structure import (
    TextStructure,
    UNetStructure,
    text_structure,
    unet_structure,
    vae_params,
)

_EIGHT_BIT = ("AdamW8bit", "PagedAdamW8bit", "Lion8bit")


def millions(n: int) -> str:
    """A parameter count for a row's detail: ``860.0M params``, ``11.90B params``."""
    return f"{n / 1e6:.1f}M params" if n < 1e9 else f"{n / 1e9:.2f}B params"


def optimizer_bytes_per_param(name: str, network_dtype: str) -> float:
    """State bytes per trainable parameter; non-8-bit states follow the parameter dtype."""
    canonical = canonical_name(name)
    per_param = optimizer_state_bytes_per_param(canonical)
    if canonical in _EIGHT_BIT:
        return per_param
    return per_param * DTYPE_BYTES[network_dtype] / 4


def stored_bytes(params: int, layer_params: int, dtype: str, compute: str) -> int:
    """fp8_base stores Linear/Conv2d weights in float8; norms and embeddings keep ``compute``."""
    if dtype != "fp8":
        return params * DTYPE_BYTES[dtype]
    return layer_params + (params - layer_params) * DTYPE_BYTES[compute]


def _weight_rows(
    arch: Architecture, s: MemorySettings, unet: UNetStructure, texts: Sequence[TextStructure]
) -> list[VramRow]:
    rows = [
        VramRow(
            f"UNet weights ({s.unet_dtype})",
            stored_bytes(unet.params, unet.layer_params, s.unet_dtype, s.compute_dtype),
            millions(unet.params),
        )
    ]
    for index, text in enumerate(texts):
        label = f"text encoder {index + 1} weights ({s.text_encoder_dtype})"
        if s.text_encoders_on_gpu:
            stored = stored_bytes(
                text.params, text.layer_params, s.text_encoder_dtype, s.compute_dtype
            )
            rows.append(VramRow(label, stored, millions(text.params)))
        else:
            rows.append(
                VramRow(label.split(" (")[0], 0, "outputs cached: kept off the GPU", "info")
            )
    rows.append(vae_weight_row(arch, s))
    return rows


def vae_weight_row(arch: Architecture, s: MemorySettings) -> VramRow:
    """The VAE's weights on the GPU, or an info row when the latents are cached."""
    vae = vae_params(arch.configs["vae"])
    if not s.vae_on_gpu:
        return VramRow("VAE weights", 0, "latents cached: kept off the GPU", "info")
    return VramRow(f"VAE weights ({s.vae_dtype})", vae * DTYPE_BYTES[s.vae_dtype], millions(vae))


def _network_rows(recipe: Recipe, s: MemorySettings, size: NetworkSize) -> list[VramRow]:
    net_bytes = DTYPE_BYTES[s.network_dtype]
    per_param = optimizer_bytes_per_param(s.optimizer, s.network_dtype)
    network = recipe.network
    what = f"{network.algorithm} rank {network.dim}"
    if conv_dim_of(network) is not None and network.backend == "kohya":
        what += f", conv rank {conv_dim_of(network)}"
    return [
        VramRow(
            f"network weights ({s.network_dtype})",
            size.allocated_bytes(net_bytes),
            f"{what}: {millions(size.total)} in {size.unet_modules + size.text_modules} modules",
        ),
        VramRow(
            f"optimizer state ({canonical_name(s.optimizer)})",
            int(size.trainable * per_param),
            f"{per_param:g} B x {millions(size.trainable)} trainable",
        ),
        *_ema_rows(s, size),
    ]


def _ema_rows(s: MemorySettings, size: NetworkSize) -> list[VramRow]:
    """The weight average (``training.ema``): float32 copies of the trainable weights."""
    if s.ema_device is None:
        return []
    if s.ema_device == "cpu":
        return [VramRow("EMA weights", 0, "ema.device cpu: kept off the GPU", "info")]
    note = f"4 B x {millions(size.trainable)} trainable"
    return [VramRow("EMA weights (fp32)", size.trainable * 4, note)]


def _optimizer_phase(s: MemorySettings, size: NetworkSize) -> list[VramRow]:
    """After backward: the gradients and the optimizer's temporaries (unfused optimizers)."""
    net_bytes = DTYPE_BYTES[s.network_dtype]
    temporaries = 0 if canonical_name(s.optimizer) in _EIGHT_BIT else size.trainable * net_bytes
    return [
        VramRow(
            f"gradients ({s.network_dtype})",
            size.trainable * net_bytes,
            f"{net_bytes} B x trainable params",
            "step",
        ),
        VramRow("optimizer step temporaries", temporaries, "unfused update buffers", "step"),
    ]


def _activation_inputs(recipe: Recipe, arch: Architecture, s: MemorySettings) -> ActivationInputs:
    conv = conv_dim_of(recipe.network) if recipe.network.backend == "kohya" else None
    if recipe.network.backend == "lycoris" and recipe.network.conv_dim:
        conv = recipe.network.conv_dim
    return ActivationInputs(
        compute_bytes=DTYPE_BYTES[s.compute_dtype],
        checkpointing=s.gradient_checkpointing,
        eager_attention=s.attention == "eager",
        unet_lora=s.train_unet,
        unet_conv_lora=s.train_unet and conv is not None,
        rank=max(recipe.network.dim, conv or 0),
        context_tokens=TOKENS_PER_CHUNK * s.token_chunks,
        context_width=int(arch.configs["unet"]["cross_attention_dim"]),
        text_grad=s.train_text_encoder,
    )


def _step_rows(
    recipe: Recipe,
    arch: Architecture,
    s: MemorySettings,
    texts: Sequence[TextStructure],
    size: NetworkSize,
) -> list[VramRow]:
    a = _activation_inputs(recipe, arch, s)
    latent_w, latent_h = s.latent_size
    unet = unet_structure(arch.configs["unet"], (latent_w, latent_h))
    act = unet_activations(unet, a)
    batch = s.batch_size
    p = DTYPE_BYTES[s.compute_dtype]
    # autocast's low-precision copies of the network's weights, kept for backward (without
    # checkpointing; with it they are remade in the recomputation)
    keeps_copies = p < 4 and s.network_dtype == "fp32" and not s.gradient_checkpointing
    autocast_copies = size.trainable * p if keeps_copies else 0
    # LyCORIS rebuilds full weights in the network's dtype, saved for backward (and their
    # autocast copies under mixed precision)
    net = DTYPE_BYTES[s.network_dtype]
    rebuilt = size.rebuilt_weight_elements * (net + (p if p != net else 0))
    gc = "on" if s.gradient_checkpointing else "off"
    rows = [
        VramRow(
            "UNet activations",
            int(batch * (act.saved + act.working)) + autocast_copies + rebuilt,
            f"{s.width}x{s.height}, batch {batch}, checkpointing {gc}, {s.attention} attention",
            "step",
        )
    ]
    if s.train_text_encoder and texts:
        tokens = TOKENS_PER_CHUNK * s.token_chunks
        # SD1/2 stop clip_skip - 1 layers early; SDXL takes encoder 1's penultimate layer
        unused = [1, 0] if s.family == "sdxl" else [recipe.model.clip_skip - 1]
        text_bytes = batch * sum(
            text_activations(t, a, tokens, skip) for t, skip in zip(texts, unused, strict=True)
        )
        rows.append(
            VramRow(
                "text-encoder activations",
                int(text_bytes),
                f"{len(texts)} encoder(s) trained, {tokens} tokens",
                "step",
            )
        )
    latent_elems = batch * 4 * latent_w * latent_h
    context = batch * a.context_tokens * a.context_width
    inputs = latent_elems * (3 * p + 3 * 4) + context * p
    rows.append(VramRow("inputs and loss", int(inputs), "latents, noise, conditioning", "step"))
    return rows


def _validation_rows(recipe: Recipe, arch: Architecture, s: MemorySettings) -> list[VramRow]:
    """The validation pass: a no-grad UNet forward of a batch (nothing kept for backward), its
    inputs, and the live VAE encode of the held-out images before it."""
    a = _activation_inputs(recipe, arch, s)
    latent_w, latent_h = s.latent_size
    forward = unet_forward_peak(unet_structure(arch.configs["unet"], (latent_w, latent_h)), a)
    p = DTYPE_BYTES[s.compute_dtype]
    inputs = s.batch_size * (
        4 * latent_w * latent_h * (3 * p + 3 * 4) + a.context_tokens * a.context_width * p
    )
    forward = int(s.batch_size * forward + inputs)
    encode = _vae_phase(arch, s) if s.vae_on_gpu else 0
    note = "no-grad UNet forward of a held-out batch"
    return [VramRow("validation pass (transient)", max(forward, encode), note, "step")]


def _vae_phase(arch: Architecture, s: MemorySettings) -> int:
    """The encode's maps, and the batch's pixels (float32, and a copy in the VAE's dtype)."""
    channels = list(arch.configs["vae"].get("block_out_channels", (128,)))
    vae_bytes = DTYPE_BYTES[s.vae_dtype]
    per_sample = vae_encode_peak(channels[0], s.width, s.height, vae_bytes)
    pixels = 3 * s.width * s.height * (4 + (vae_bytes if vae_bytes != 4 else 0))
    return int((per_sample + pixels) * s.batch_size)


def _peak_phase(phases: dict[str, list[VramRow]]) -> list[VramRow]:
    """The rows of the phase with the most bytes; the others become ``info`` rows."""
    peak = max(phases, key=lambda name: sum(r.bytes for r in phases[name]))
    rows = list(phases[peak])
    for name, others in phases.items():
        if name == peak:
            continue
        rows += [
            VramRow(
                r.component, 0, f"{format_bytes(r.bytes)} during {name}: not at the peak", "info"
            )
            for r in others
            if r.bytes
        ]
    return rows


def analytic_estimate(recipe: Recipe, arch: Architecture, s: MemorySettings) -> VramEstimate:
    """Estimate ``recipe`` on ``arch`` analytically (no torch)."""
    texts = [
        text_structure(arch.configs[name], projection=name == "text_encoder_2")
        for name in arch.text_encoder_names
    ]
    unet = unet_structure(arch.configs["unet"])
    size = network_size(recipe.network, s.family, unet, texts, arch.configs["unet"])
    resident = _weight_rows(arch, s, unet, texts) + _network_rows(recipe, s, size)
    optimizer_phase = _optimizer_phase(s, size)
    # with accumulation the gradients of the step's earlier batches are alive throughout
    kept = optimizer_phase[:1] if recipe.training.gradient_accumulation_steps > 1 else []
    phases = {
        "the UNet step": _step_rows(recipe, arch, s, texts, size) + kept,
        "the optimizer step": optimizer_phase,
    }
    if s.vae_on_gpu:
        note = "no-grad encode of the batch before the UNet step"
        phases["the VAE encode"] = [
            VramRow("VAE encode (transient)", _vae_phase(arch, s), note, "step"),
            *kept,
        ]
    if validation_requested(recipe.dataset):
        phases["the validation pass"] = _validation_rows(recipe, arch, s)
    rows = resident + _peak_phase(phases)
    notes = []
    if recipe.network.backend == "lycoris":
        notes.append(
            "LyCORIS networks are approximated analytically; --vram-method traced "
            "builds the real modules"
        )
    return estimate_with_overheads("analytic", s, arch, rows, sum(r.bytes for r in rows), notes)
