"""Run one training step of a recipe's models, measuring live tensor bytes.

The same code runs on real CPU tensors (small models, for validation) and under
``FakeTensorMode`` (full-size models with no memory behind them, for the traced estimate): only
the mode differs, so the two measurements are comparable by construction.

The step mirrors sd-scripts' train_network.py: frozen models in the weight dtype, the network in
fp32 (or fp16/bf16 with full_fp16/bf16), latents encoded live or taken from the cache, text
encoders run with gradients only when trained, the UNet under autocast, an fp32 MSE loss,
backward, gradient clipping, the optimizer step and ``zero_grad(set_to_none=True)``. The
optimizer's state is created by a first step on zero gradients, so the measured step is a
steady-state one (the first step of a run has no state yet and peaks lower).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.recipe.types import Recipe
from loraforge.vram.amp import autocast, cuda_policy
from loraforge.vram.arch import Architecture
from loraforge.vram.build import TORCH_DTYPES, StepModels, build_step_models
from loraforge.vram.settings import TOKENS_PER_CHUNK, MemorySettings
from loraforge.vram.tracker import LiveBytesTracker

VAE_SCALE = 0.13025  # SDXL's latent scale; the value does not matter for memory


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


def _autocast(settings: MemorySettings, device: str) -> contextlib.AbstractContextManager[Any]:
    dtype = None if settings.compute_dtype == "fp32" else TORCH_DTYPES[settings.compute_dtype]
    return autocast(dtype, device)


def _latents(models: StepModels, settings: MemorySettings, device: str) -> torch.Tensor:
    width, height = settings.latent_size
    compute = TORCH_DTYPES[settings.compute_dtype]
    batch = settings.batch_size
    if models.vae is None:  # cached latents, moved to the GPU in the weight dtype
        return torch.randn(batch, 4, height, width, dtype=compute, device=device)
    vae_dtype = TORCH_DTYPES[settings.vae_dtype]
    pixels = torch.randn(batch, 3, settings.height, settings.width, dtype=vae_dtype, device=device)
    with torch.no_grad():
        latents = models.vae.encode(pixels).latent_dist.sample()
    return (latents * VAE_SCALE).to(compute)


def _encode_text(
    models: StepModels, arch: Architecture, settings: MemorySettings, device: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(encoder_hidden_states, pooled)``; pooled only for SDXL."""
    batch, chunks = settings.batch_size, settings.token_chunks
    compute = TORCH_DTYPES[settings.compute_dtype]
    sdxl = settings.family == "sdxl"
    if not models.text_encoders:  # cached outputs
        width = int(arch.configs["unet"]["cross_attention_dim"])
        hidden = torch.randn(batch, chunks * TOKENS_PER_CHUNK, width, dtype=compute, device=device)
        if not sdxl:
            return hidden, None
        pooled_width = int(arch.configs["text_encoder_2"].get("projection_dim", 1280))
        return hidden, torch.randn(batch, pooled_width, dtype=compute, device=device)
    grad = torch.enable_grad() if settings.train_text_encoder else torch.no_grad()
    states, pooled = [], None
    with grad, _autocast(settings, device):
        for index, encoder in enumerate(models.text_encoders):
            vocab = int(encoder.config.vocab_size)
            ids = torch.randint(0, vocab, (batch * chunks, TOKENS_PER_CHUNK), device=device)
            out = encoder(ids, output_hidden_states=True)
            # SD1/2: last layer (clip_skip 1); SDXL: penultimate layer of both encoders
            hidden = out.hidden_states[-2] if sdxl else out.last_hidden_state
            states.append(hidden.reshape(batch, chunks * TOKENS_PER_CHUNK, -1))
            if index == 1:
                pooled = out.text_embeds.reshape(batch, chunks, -1)[:, 0]
    hidden = torch.cat(states, dim=-1) if len(states) > 1 else states[0]
    return hidden.to(compute), None if pooled is None else pooled.to(compute)


def _unet_loss(
    models: StepModels,
    settings: MemorySettings,
    latents: torch.Tensor,
    hidden: torch.Tensor,
    pooled: torch.Tensor | None,
    device: str,
) -> torch.Tensor:
    batch = settings.batch_size
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    noisy = latents + noise  # stands in for scheduler.add_noise (same tensor sizes)
    added = None
    if pooled is not None:
        time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * batch, device=device)
        added = {"text_embeds": pooled, "time_ids": time_ids.to(latents.dtype)}
    with _autocast(settings, device):
        pred = models.unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample
    loss = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
    return loss.mean()


def _initialise_optimizer_state(models: StepModels) -> None:
    """One step on zero gradients: creates the optimizer's state as a real first step does."""
    for p in models.trainable:
        p.grad = torch.zeros_like(p)
    models.optimizer.step()
    models.optimizer.zero_grad(set_to_none=True)


def run_training_step(
    recipe: Recipe,
    arch: Architecture,
    settings: MemorySettings,
    tracker: LiveBytesTracker,
    *,
    device: str = "cpu",
    before_step: Callable[[], None] | None = None,
) -> StepMeasurement:
    """Build the models, then measure one steady-state training step with ``tracker``.

    Call it under ``FakeTensorMode`` for a trace, or plainly for a real (small) CPU run; on a
    GPU build the models under ``with torch.device("cuda")`` and pass ``device="cuda"``.

    Args:
        before_step: called once the optimizer state exists, right before the measured step
            (e.g. ``torch.cuda.reset_peak_memory_stats``).
    """
    models = build_step_models(recipe, arch, settings, device)
    _register_resident(models, tracker)
    with cuda_policy(device), tracker:
        tracker.phase("optimizer state")
        _initialise_optimizer_state(models)
        tracker.reset_peak()
        if before_step is not None:
            before_step()
        tracker.phase("inputs" if models.vae is None else "vae encode")
        latents = _latents(models, settings, device)
        tracker.phase("text encoder activations" if models.text_encoders else "inputs")
        hidden, pooled = _encode_text(models, arch, settings, device)
        tracker.phase("unet activations")
        loss = _unet_loss(models, settings, latents, hidden, pooled, device)
        loss.backward()
        del loss, latents, hidden, pooled
        tracker.recategorize([p.grad for p in models.trainable if p.grad is not None], "gradients")
        tracker.phase("optimizer step")
        if settings.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(models.trainable, settings.max_grad_norm, foreach=True)
        models.optimizer.step()
        models.optimizer.zero_grad(set_to_none=True)
    return StepMeasurement(
        peak_bytes=tracker.peak,
        at_peak=tracker.live_at_peak(),
        trainable_params=sum(p.numel() for p in models.trainable),
        network_params=sum(p.numel() for p in models.network.parameters()),
    )


def _register_resident(models: StepModels, tracker: LiveBytesTracker) -> None:
    def tensors(module: nn.Module) -> list[torch.Tensor]:
        return [*module.parameters(), *module.buffers()]

    tracker.register(tensors(models.network), "network weights")
    tracker.register(tensors(models.unet), "unet weights")
    for index, encoder in enumerate(models.text_encoders):
        tracker.register(tensors(encoder), f"text encoder {index + 1} weights")
    if models.vae is not None:
        tracker.register(tensors(models.vae), "vae weights")
