"""Measure one optimizer step of ``loraforge train`` on full-size fake tensors.

The step is ``train``'s own: :func:`loraforge.training.step.accumulate_batch` (batch seeding,
:class:`~loraforge.training.conditioning.Conditioning`, noise and timesteps, the recipe's loss,
backward under autocast and checkpointing) for each batch of the step, then
:func:`~loraforge.training.step.apply_update` (clipping, the recipe's optimizer and scheduler,
max-norm), and the weight average's update (:class:`~loraforge.training.ema.NetworkEma`, with
``training.ema`` on the device). Only the models and the batch are made here: the models from the architecture's
configs (:mod:`loraforge.vram.build`), the batch as fake tensors of the largest bucket. The
optimizer's state is created first by a step on zero gradients, so the measured step is a
steady-state one, like steps 2 onwards of a run.

:mod:`loraforge.vram.probe` measures the same quantity on a real ``train`` run; the tests
compare the two.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from loraforge.data.holdout import validation_requested
from loraforge.recipe.types import Recipe
from loraforge.training.dtypes import torch_dtype
from loraforge.vram.arch import Architecture
from loraforge.vram.build import StepModels, build_step_models, trace_tokenizers
from loraforge.vram.probe import categorize_by_module, register_resident
from loraforge.vram.settings import TOKENS_PER_CHUNK, MemorySettings
from loraforge.vram.tracker import LiveBytesTracker

TRACE_KEY = "trace"  # the one image key of the traced batch
TRACE_CAPTION = "a photo"


@dataclass(frozen=True)
class StepMeasurement:
    """Peak live bytes of one steady-state step and what was alive then.

    Attributes:
        peak_bytes: the largest sum of live storages (allocator-rounded).
        at_peak: bytes per category alive at the peak (weights per component, network weights,
            optimizer state, gradients, activations, ...); they sum to ``peak_bytes``.
        trainable_params: scalars the optimizer updates.
        network_params: scalars of the network (LoRA-FA's frozen down included).
    """

    peak_bytes: int
    at_peak: Mapping[str, int]
    trainable_params: int
    network_params: int


class TraceAccelerator:
    """The part of ``accelerate.Accelerator`` a step uses, for a CPU trace.

    Args:
        compute_dtype: the autocast dtype name (``fp32``: none).
        cuda_policy: autocast with CUDA's float32 policy (:mod:`loraforge.vram.amp`) and
            multi-tensor clipping, as on a GPU; ``False`` behaves like a CPU run.
    """

    def __init__(self, compute_dtype: str, *, cuda_policy: bool, device: str = "cpu") -> None:
        self._dtype = None if compute_dtype == "fp32" else torch_dtype(compute_dtype)
        self._foreach = True if cuda_policy else None
        self._device = device

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        from loraforge.vram.amp import autocast

        return autocast(self._dtype, self._device)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm_(self, params: Any, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=self._foreach)


def _conditioning(
    models: StepModels, arch: Architecture, recipe: Recipe, s: MemorySettings, device: str
) -> Any:
    """``train``'s :class:`Conditioning`, over the live models or one-entry caches."""
    from loraforge.data.cache import LatentCache, TextCache
    from loraforge.models.flow_prompts import CLIP_TOKENS, caption_token_length
    from loraforge.training.conditioning import Conditioning, TextEncoding

    m = recipe.model
    flow = "transformer" in arch.configs
    tokens = caption_token_length(
        s.family, arch.variant, m.max_token_length, m.t5xxl_max_token_length
    )
    latent_cache = text_cache = None
    if models.vae is None:  # cached latents (kept in the VAE's dtype, in CPU memory)
        width, height = s.latent_size
        channels = int(arch.configs["vae"].get("latent_channels", 4))
        latent = torch.zeros(channels, height, width, dtype=torch_dtype(s.vae_dtype))
        latent_cache = LatentCache(memory={TRACE_KEY: latent})
        if recipe.training.masked_loss:  # cached with the latents, at latent size
            latent_cache.mask_memory[TRACE_KEY] = torch.ones(1, height, width)
    if not models.text_encoders:  # cached text-encoder outputs (float32, CPU memory)
        if flow:  # T5 tokens (after SD3's 77 CLIP ones) at the joint width; the pooled vector
            transformer = arch.configs["transformer"]
            length = tokens + (CLIP_TOKENS if s.family == "sd3" else 0)
            hidden = torch.zeros(length, int(transformer["joint_attention_dim"]))
            pooled = torch.zeros(int(transformer["pooled_projection_dim"]))
        else:
            hidden = torch.zeros(_tokens(s), int(arch.configs["unet"]["cross_attention_dim"]))
            pooled = None
        if s.family == "sdxl":
            pooled = torch.zeros(int(arch.configs["text_encoder_2"].get("projection_dim", 1280)))
        text_cache = TextCache(memory={TRACE_CAPTION: (hidden, pooled)})
    return Conditioning(
        models.vae,
        models.text_encoders,
        trace_tokenizers(len(arch.text_encoder_names), flow),
        TextEncoding(s.family, m.clip_skip, tokens),
        torch.device(device),
        latent_cache=latent_cache,
        text_cache=text_cache,
    )


def _tokens(s: MemorySettings) -> int:
    """Embedding length: 77, or 75 per window + BOS/EOS with max_token_length 150/225."""
    return TOKENS_PER_CHUNK if s.token_chunks == 1 else s.token_chunks * 75 + 2


def _batch(s: MemorySettings, live_vae: bool, masked: bool) -> dict[str, Any]:
    """A batch as the data loader gives it, at the largest bucket (with pixel masks for a
    masked loss on live latents)."""
    b = s.batch_size
    sizes = torch.tensor([[s.height, s.width]] * b, dtype=torch.int64)
    batch: dict[str, Any] = {
        "captions": [TRACE_CAPTION] * b,
        "original_sizes_hw": sizes,
        "crop_top_lefts": torch.zeros(b, 2, dtype=torch.int64),
        "target_sizes_hw": sizes.clone(),
        "loss_weights": torch.ones(b),
        "flipped": [False] * b,
        "keys": [TRACE_KEY] * b,
        "is_reg": [False] * b,
    }
    if live_vae:
        batch["images"] = torch.zeros(b, 3, s.height, s.width)
        if masked:
            batch["masks"] = torch.ones(b, 1, s.height, s.width)
    return batch


def _loss_setup(
    models: StepModels, recipe: Recipe, arch: Architecture, s: MemorySettings, device: str
) -> Any:
    from loraforge.training.build import loss_setup
    from loraforge.training.settings import resolve_v_prediction

    return loss_setup(
        recipe.training,
        models.unet,
        s.family,
        _conditioning(models, arch, recipe, s, device),
        v_prediction=resolve_v_prediction(recipe, s.family == "sd2-v"),
        weight_dtype=torch_dtype(s.compute_dtype),
    )


def _ema_on_device(recipe: Recipe, network: Any) -> Any:
    """``train``'s weight average when it lives on the device (``training.ema.device: same``)."""
    from loraforge.training.ema import NetworkEma
    from loraforge.training.settings import EmaSettings

    settings = EmaSettings.from_config(recipe.training.ema)
    if settings is None or settings.device == "cpu":
        return None
    return NetworkEma(network, settings)


def _swapped_blocks(unet: Any, *, s: MemorySettings, blocks_to_swap: int) -> list[Any]:
    """SD3 / FLUX block swap: the blocks whose weights wait in CPU memory, less the largest
    one (one swapped block is on the GPU while it runs)."""
    if s.family not in ("sd3", "flux") or not blocks_to_swap:
        return []
    from loraforge.training.block_swap import transformer_blocks
    from loraforge.vram.flow_structure import swap_indices

    blocks, doubles = transformer_blocks(unet)
    swapped = [blocks[i] for i in swap_indices(s.family, doubles, len(blocks), blocks_to_swap)]
    size = lambda block: sum(p.numel() for p in block.parameters())  # noqa: E731
    swapped.remove(max(swapped, key=size))
    return swapped


def _create_optimizer_state(models: StepModels) -> None:
    """One optimizer step on zero gradients: the state a first real step leaves."""
    from loraforge.training.step import trainable_parameters

    for p in trainable_parameters(models.optimizer):
        p.grad = torch.zeros_like(p)
    models.optimizer.step()
    models.optimizer.zero_grad(set_to_none=True)


def validation_pass(
    setup: Any, s: MemorySettings, models: StepModels, accelerator: Any, generator: Any
) -> None:
    """The memory of the validation loss after an update: the loss of a batch at the largest
    bucket, without gradients, the network in eval mode (what
    :class:`loraforge.training.validation.Validator` runs per batch and timestep)."""
    from loraforge.training.step import batch_loss

    models.network.eval()
    try:
        with torch.no_grad():
            batch = _batch(s, live_vae=models.vae is not None, masked=setup.loss.masked_loss)
            batch_loss(
                setup, batch, generator, train_text_encoder=False, autocast=accelerator.autocast
            )
    finally:
        models.network.train()


def run_training_step(
    recipe: Recipe,
    arch: Architecture,
    settings: MemorySettings,
    tracker: LiveBytesTracker,
    *,
    cuda_policy: bool = True,
    device: str = "cpu",
    before_step: Callable[[], None] | None = None,
) -> StepMeasurement:
    """Build the models, then measure one steady-state optimizer step with ``tracker``.

    Call it under ``FakeTensorMode`` (full-size models cost nothing there); on a GPU, build
    under ``with torch.device("cuda")`` and pass ``device="cuda"`` (benchmarks/).

    Args:
        cuda_policy: on the CPU, run with CUDA's autocast policy, as the GPU will (default);
            ``False`` runs as a CPU ``train`` run does (to compare with one).
        device: where the step runs.
        before_step: called right before the measured step (``reset_peak_memory_stats``).
    """
    from loraforge.training.step import (
        accumulate_batch,
        apply_update,
        trainable_parameters,
    )
    from loraforge.vram.amp import cuda_policy as policy

    on_cpu = device == "cpu"
    cuda_policy = cuda_policy and on_cpu  # on a GPU autocast has CUDA's policy anyway
    models = build_step_models(recipe, arch, settings, cuda_policy=cuda_policy, foreach=not on_cpu)
    setup = _loss_setup(models, recipe, arch, settings, device)
    accelerator = TraceAccelerator(settings.compute_dtype, cuda_policy=cuda_policy, device=device)
    generator = torch.Generator("cpu")
    t = recipe.training
    register_resident(
        tracker,
        models.unet,
        models.text_encoders,
        models.vae,
        models.network,
        models.optimizer,
        off_device=_swapped_blocks(models.unet, s=settings, blocks_to_swap=t.blocks_to_swap),
    )
    ema = _ema_on_device(recipe, models.network)
    if ema is not None:
        tracker.register(ema.average.values(), "ema weights")
    with (
        policy(cuda_policy),
        tracker,
        categorize_by_module(tracker, models.unet, models.text_encoders, models.vae),
    ):
        tracker.phase("optimizer state")
        _create_optimizer_state(models)
        tracker.reset_peak()
        if before_step is not None:
            before_step()
        # a second batch of an accumulated step runs with the first one's gradients alive
        for index in range(min(t.gradient_accumulation_steps, 2)):
            tracker.phase("inputs")
            batch = _batch(settings, live_vae=models.vae is not None, masked=t.masked_loss)
            accumulate_batch(
                setup,
                batch,
                generator,
                index,
                accelerator,
                accumulation=t.gradient_accumulation_steps,
                train_text_encoder=settings.train_text_encoder,
            )
            del batch
            params = trainable_parameters(models.optimizer)
            tracker.recategorize([p.grad for p in params if p.grad is not None], "gradients")
        tracker.phase("optimizer step")
        apply_update(
            accelerator,
            models.optimizer,
            models.scheduler,
            models.network,
            params,
            max_grad_norm=settings.max_grad_norm,
            scale_weight_norms=t.scale_weight_norms,
        )
        if ema is not None:
            ema.update(models.network, 1)
        if validation_requested(recipe.dataset):
            tracker.phase("validation")
            validation_pass(setup, settings, models, accelerator, generator)
    return StepMeasurement(
        peak_bytes=tracker.peak,
        at_peak=tracker.live_at_peak(),
        trainable_params=sum(p.numel() for p in params),
        network_params=sum(p.numel() for p in models.network.parameters()),
    )
