"""Analytic model of the activation memory of one training step (no torch).

What autograd keeps for backward is decided operation by operation, and the counts below follow
those rules for the SD blocks under CUDA autocast (fp16/bf16 compute, float32 norms):

* a frozen ``Linear`` keeps nothing of its input (the weight gets no gradient); a LoRA keeps the
  low-precision copy autocast makes of its input, one per LoRA (q, k and v each make one), and
  its rank-sized down output;
* a convolution keeps its (cast) input whenever its output needs a gradient;
* GroupNorm/LayerNorm keep the float32 copy autocast makes of their input, SiLU keeps its
  float32 input, SDPA (flash / memory-efficient, as xformers) keeps q, k, v, the output and a
  float32 log-sum-exp per head and token; eager attention also keeps the float32 softmax and its
  low-precision copy (heads x tokens x tokens each);
* GEGLU keeps its 8C projection and the 4C GELU output;
* nothing needs a gradient before the first module with trainable parameters.

With gradient checkpointing (diffusers checkpoints every ResNet and every transformer block)
only the blocks' inputs stay, plus the full set of the block being recomputed in backward.
Without it, the peak comes at the start of backward. Sizes are per sample and then scaled by
the batch; tests/vram compare the totals with the traced method.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraforge.vram.structure import Block, TextStructure, UNetStructure

F32 = 4


@dataclass(frozen=True)
class ActivationInputs:
    """What the activation model needs besides the structure.

    Attributes:
        compute_bytes: bytes per element of the compute dtype (2 under fp16/bf16 autocast).
        checkpointing: gradient checkpointing.
        eager_attention: eager attention (the attention matrix is materialised).
        unet_lora: the UNet has trainable modules in its transformer blocks.
        unet_conv_lora: also in its ResNets and samplers (LoCon).
        rank: the (largest) LoRA rank, for the rank-sized intermediates.
        context_tokens, context_width: the text conditioning per sample.
        text_grad: the text conditioning needs a gradient (trained text encoder).
    """

    compute_bytes: int
    checkpointing: bool
    eager_attention: bool
    unet_lora: bool
    unet_conv_lora: bool
    rank: int
    context_tokens: int
    context_width: int
    text_grad: bool

    @property
    def low_precision(self) -> bool:
        return self.compute_bytes < F32


def _resnet_saved(b: Block, a: ActivationInputs, grad_in: bool) -> float:
    """Bytes per sample a ResNet keeps; ``grad_in``: its input needs a gradient."""
    p, locon = a.compute_bytes, a.unet_conv_lora
    copy = p if a.low_precision else 0  # a LoRA's own cast of its input
    half = 2 * F32 + p  # norm's float32 copy, SiLU's float32 input, the conv's cast input
    lora = a.rank * p * locon  # a conv LoRA's rank-sized down output
    saved = (half * b.c_in if grad_in else 0) + (copy * b.c_in + lora) * locon
    if grad_in or locon:
        saved += half * b.c_out + (copy * b.c_out + lora) * locon
    if b.c_in != b.c_out:
        saved += (p * grad_in + copy * locon) * b.c_in + lora
    return saved * b.tokens


def _attention_saved(b: Block, a: ActivationInputs, kv_tokens: int) -> float:
    """Per-token bytes of one attention beyond its LoRA copies (q, k, v, out, softmax stats)."""
    p, heads = a.compute_bytes, b.heads
    if a.eager_attention:
        # head-split q (and k, v for self-attention) copies, float32 softmax + its cast, output
        qkv = 3 * p * b.c_in if kv_tokens == b.tokens else p * b.c_in
        return qkv + heads * kv_tokens * (F32 + p) + p * b.c_in
    qkv = 3 * p * b.c_in if kv_tokens == b.tokens else p * b.c_in
    return qkv + p * b.c_in + heads * F32


def _transformer_layer_saved(b: Block, a: ActivationInputs) -> float:
    """Bytes per sample one BasicTransformerBlock keeps (no checkpointing)."""
    p, c = a.compute_bytes, b.c_in
    low = a.low_precision
    norms = 3 * F32 * c if low else 3 * p * c
    qkv_copies = (3 if low else 1) * p * c
    lora_out = 2 * p * c  # to_out of both attentions
    attn = _attention_saved(b, a, b.tokens) + _attention_saved(b, a, a.context_tokens)
    ff = (p + 8 * p + 4 * p + 4 * p) * c
    ranks = 10 * a.rank * p
    per_token = norms + qkv_copies + p * c + lora_out + attn + ff + ranks
    context = 2 * p * a.context_tokens * (a.context_width + c)  # k/v LoRA copies, k and v
    return per_token * b.tokens + context


def _transformer_outer_saved(b: Block, a: ActivationInputs, grad_in: bool) -> float:
    """GroupNorm, proj_in and proj_out of a Transformer2DModel (never checkpointed)."""
    p, c = a.compute_bytes, b.c_in
    conv = not b.linear_proj
    saved = (F32 * c + p * c * conv) * grad_in  # norm copy, 1x1 conv's cast input
    saved += 2 * (p * c + a.rank * p) + p * c * conv  # proj_in/out LoRA copies, conv input
    return saved * b.tokens


def _sampler_saved(b: Block, a: ActivationInputs, grad_in: bool) -> float:
    p = a.compute_bytes
    copy = p if a.low_precision else 0
    locon = a.unet_conv_lora
    return ((p * grad_in + copy * locon) * b.c_in + a.rank * p * locon) * b.tokens


@dataclass(frozen=True)
class UNetActivations:
    """Per-sample activation bytes of the UNet.

    Attributes:
        saved: kept for backward at the end of the forward pass.
        working: extra at the peak: the recomputed block with checkpointing, gradients and
            transient buffers.
    """

    saved: float
    working: float


def unet_activations(structure: UNetStructure, a: ActivationInputs) -> UNetActivations:
    """The UNet's activation bytes per sample at the structure's latent size."""
    trains = a.unet_lora or a.text_grad
    grad = False
    saved = 0.0
    largest_block = 0.0
    largest_map = 0.0
    largest_attention = 0  # heads x tokens^2 of the largest self-attention
    p = a.compute_bytes
    for b in structure.blocks:
        largest_map = max(largest_map, b.c_out * b.tokens)
        if b.kind == "resnet":
            full = _resnet_saved(b, a, grad)
            kept = p * b.c_in * b.tokens if (grad or a.unet_conv_lora) else 0
            grad = grad or (a.unet_conv_lora and trains)
        elif b.kind == "transformer":
            layer = _transformer_layer_saved(b, a) if trains else 0.0
            outer = _transformer_outer_saved(b, a, grad) if trains else 0.0
            full = outer + b.layers * layer
            kept = outer + b.layers * p * b.c_in * b.tokens if trains else 0.0
            largest_block = max(largest_block, layer)
            largest_attention = max(largest_attention, b.heads * b.tokens**2 * trains)
            grad = grad or trains
        else:  # samplers are not checkpointed; an up-sampler's tokens are its output's
            full = kept = _sampler_saved(b, a, grad)
        if b.kind == "resnet":
            largest_block = max(largest_block, full)
        saved += kept if a.checkpointing else full
    c0 = structure.blocks[0].c_in if structure.blocks else 0
    head = (2 * F32 + p) * c0 * structure.blocks[0].tokens if grad and structure.blocks else 0
    saved += head  # conv_norm_out, SiLU, conv_out
    # backward working set: gradients of the largest feature map (float32 through the norms)
    working = 2 * F32 * largest_map
    if a.checkpointing:
        working += largest_block
    if a.eager_attention:  # softmax backward: the probabilities' gradient, fp32 and cast
        working += largest_attention * (F32 + p)
    return UNetActivations(saved, working)


def text_activations(
    text: TextStructure, a: ActivationInputs, tokens: int, unused_layers: int = 0
) -> float:
    """Bytes per sample a trained CLIP text encoder keeps for backward (``tokens`` per sample).

    Args:
        unused_layers: last layers whose output the loss does not use (clip_skip, SDXL's
            penultimate layer): autograd frees what they saved once the output is dropped.
    """
    p, h, inner = a.compute_bytes, text.hidden, text.intermediate
    low = a.low_precision
    per_layer = (2 * F32 if low else 2 * p) * h  # the two LayerNorms' inputs
    # LoRA inputs cast to the compute dtype (none in fp32: the layer's saved input is reused)
    copy = p if low else 0
    per_layer += (3 * copy + 4 * p + 2 * p) * h  # LoRA copies, SDPA q k v out
    per_layer += (copy + F32 * text.heads / max(h, 1)) * h  # out_proj LoRA copy, softmax stats
    per_layer += (copy * h) + 3 * p * inner  # fc1 LoRA copy, activation, fc2 LoRA copy
    per_layer += 6 * a.rank * p
    depth = max(text.depth - unused_layers, 1)
    if a.checkpointing:
        return (depth * p * h + per_layer) * tokens
    return depth * per_layer * tokens


def vae_encode_peak(vae_channels: int, width: int, height: int, dtype_bytes: int) -> float:
    """Transient bytes per sample of a no-grad VAE encode at full resolution.

    The first level dominates: four ``channels x H x W`` maps alive at once (a ResNet's input,
    its norm and activation outputs and its convolution output); the pixels are counted by the
    caller.
    """
    return 4 * vae_channels * width * height * dtype_bytes


def unet_forward_peak(structure: UNetStructure, a: ActivationInputs) -> float:
    """Per-sample bytes of a UNet forward without gradients (the validation pass).

    Nothing is kept for backward, so what is alive is the down path's outputs, held for the
    skip connections until the up path takes them, plus the working set of the block running:
    a ResNet's input, float32 norm and activation outputs and its convolution output, or a
    transformer's GEGLU projection (8C) and GELU output (4C) beside its input (and the
    attention matrix with eager attention).
    """
    p = a.compute_bytes
    skips = 0.0
    working = 0.0
    for b in structure.blocks:
        if b.path.startswith("down_blocks"):
            out_tokens = b.tokens // 4 if b.kind == "down" else b.tokens
            skips += p * b.c_out * out_tokens
        if b.kind == "resnet":
            working = max(working, (2 * p + 2 * F32) * max(b.c_in, b.c_out) * b.tokens)
        elif b.kind == "transformer":
            attention = b.heads * b.tokens**2 * (F32 + p) if a.eager_attention else 0
            working = max(working, 13 * p * b.c_in * b.tokens + attention)
    first = structure.blocks[0] if structure.blocks else None
    skips += p * first.c_in * first.tokens if first is not None else 0  # conv_in's output
    return skips + working
