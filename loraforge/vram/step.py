"""Build the models of a recipe and run one training step, measuring live tensor bytes.

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
import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraforge.recipe.types import Recipe
from loraforge.vram.amp import autocast, checkpoint_contexts, cuda_policy
from loraforge.vram.arch import Architecture
from loraforge.vram.optimizers import trace_optimizer
from loraforge.vram.settings import TOKENS_PER_CHUNK, MemorySettings
from loraforge.vram.tracker import LiveBytesTracker

TORCH_DTYPES = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8": torch.float8_e4m3fn,
}
VAE_SCALE = 0.13025  # SDXL's latent scale; the value does not matter for memory


@dataclass
class StepModels:
    """The modules of one training step (the VAE/text encoders only when they are on the GPU)."""

    unet: nn.Module
    text_encoders: list[nn.Module]
    vae: nn.Module | None
    network: nn.Module
    optimizer: torch.optim.Optimizer
    trainable: list[nn.Parameter] = field(default_factory=list)


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


_NOT_ARCHITECTURE = ("architectures", "torch_dtype", "dtype")


def _kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """Config keys that describe the architecture (a stored dtype would override ours)."""
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in _NOT_ARCHITECTURE}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules directly in ``dtype`` (no fp32 copy first; fake params cannot be ``.to()``'d)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def cast_parameters(module: nn.Module, dtype: torch.dtype, *, only: tuple[type, ...] = ()) -> None:
    """Replace floating parameters by ``dtype`` copies, module by module (works on fake tensors).

    Args:
        module: the module tree.
        dtype: the new dtype.
        only: cast only the parameters of modules of these classes (default: all).
    """
    for sub in module.modules():
        if only and not isinstance(sub, only):
            continue
        for name, param in list(sub._parameters.items()):
            if param is None or not param.is_floating_point() or param.dtype == dtype:
                continue
            new = nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad)
            sub._parameters[name] = new


def _checkpoint_function(device: str) -> Any:
    """diffusers' default checkpointing (non-reentrant), with the CPU autocast policy kept."""
    contexts = functools.partial(checkpoint_contexts, device)

    def checkpointed(module: nn.Module, *args: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(
            module.__call__, *args, use_reentrant=False, context_fn=contexts
        )

    return checkpointed


def _build_unet(config: Mapping[str, Any], settings: MemorySettings, device: str) -> nn.Module:
    from diffusers import UNet2DConditionModel

    stored = TORCH_DTYPES[settings.unet_dtype]
    build = TORCH_DTYPES[settings.compute_dtype] if stored == torch.float8_e4m3fn else stored
    with _default_dtype(build):
        unet = UNet2DConditionModel.from_config(_kwargs(config))
    if stored != build:  # fp8_base: Linear and Conv2d weights only (training.precision)
        cast_parameters(unet, stored, only=(nn.Linear, nn.Conv2d))
    if settings.attention == "eager":
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing(_checkpoint_function(device))
    unet.requires_grad_(False)
    return unet


def _build_text_encoder(
    name: str, config: Mapping[str, Any], settings: MemorySettings, device: str
) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    stored = TORCH_DTYPES[settings.text_encoder_dtype]
    build = TORCH_DTYPES[settings.compute_dtype] if stored == torch.float8_e4m3fn else stored
    cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
    with _default_dtype(build):
        encoder = cls(CLIPTextConfig(**_kwargs(config)))
    cast_parameters(encoder, build)  # no-op unless transformers chose a dtype of its own
    if stored != build:  # fp8_base: Linear weights only; norms and embeddings keep the dtype
        cast_parameters(encoder, stored, only=(nn.Linear, nn.Conv2d))
    if settings.attention == "eager" and hasattr(encoder, "set_attn_implementation"):
        encoder.set_attn_implementation("eager")
    if settings.gradient_checkpointing and settings.train_text_encoder:
        kwargs = {
            "use_reentrant": False,
            "context_fn": functools.partial(checkpoint_contexts, device),
        }
        if hasattr(encoder, "activation_checkpointing_enable"):
            encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    encoder.requires_grad_(False)
    return encoder


def _build_vae(config: Mapping[str, Any], settings: MemorySettings) -> nn.Module:
    from diffusers import AutoencoderKL

    with _default_dtype(TORCH_DTYPES[settings.vae_dtype]):
        vae = AutoencoderKL.from_config(_kwargs(config))
    vae.requires_grad_(False)
    return vae


def _learning_rates(recipe: Recipe) -> tuple[float, float]:
    t = recipe.training
    unet_lr = t.unet_lr if t.unet_lr is not None else t.learning_rate
    te_lr = t.text_encoder_lr if t.text_encoder_lr is not None else t.learning_rate
    return unet_lr, te_lr


def _active_fake_mode(module: nn.Module) -> Any:
    """The FakeTensorMode ``module``'s parameters belong to (``None`` for real tensors)."""
    from torch._subclasses.fake_tensor import FakeTensor

    param = next(module.parameters(), None)
    return param.fake_mode if isinstance(param, FakeTensor) else None


def _to_fake(module: nn.Module, mode: Any) -> None:
    """Replace real parameters and buffers of ``module`` by fake copies of ``mode``."""
    from torch._subclasses.fake_tensor import FakeTensor

    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and not isinstance(param, FakeTensor):
                fake = mode.from_tensor(param.detach())
                sub._parameters[name] = nn.Parameter(fake, requires_grad=param.requires_grad)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None and not isinstance(buffer, FakeTensor):
                sub._buffers[name] = mode.from_tensor(buffer)


def _create_network(
    recipe: Recipe, family: str, unet: nn.Module, encoders: list[nn.Module]
) -> nn.Module:
    """The recipe's network; built outside fake mode when its constructor needs real values.

    Some modules (lycoris-lora's) compute shapes with ``tensor.item()``, which fake tensors
    cannot answer: those networks are built with real (small) parameters, then made fake.
    """
    from torch._subclasses.fake_tensor import DataDependentOutputException, unset_fake_temporarily

    from loraforge.backends import create_network

    try:
        return create_network(recipe.network, family, unet, encoders)
    except DataDependentOutputException:
        mode = _active_fake_mode(unet)
        if mode is None:
            raise
        with unset_fake_temporarily():
            network = create_network(recipe.network, family, unet, encoders)
        _to_fake(network, mode)
        return network


def build_step_models(
    recipe: Recipe, arch: Architecture, settings: MemorySettings, device: str = "cpu"
) -> StepModels:
    """Build every module one step needs, in the current mode (real or fake).

    Raises:
        RecipeError, DependencyError: the network backend refuses the network section.
        TrainingError: nothing is trainable.
    """
    unet = _build_unet(arch.configs["unet"], settings, device)
    # The network hooks the text encoders only when they are trained; otherwise they may be
    # off the GPU entirely (cached outputs) and are built only when they run.
    encoders = (
        [
            _build_text_encoder(name, arch.configs[name], settings, device)
            for name in arch.text_encoder_names
        ]
        if settings.text_encoders_on_gpu
        else []
    )
    vae = _build_vae(arch.configs["vae"], settings) if settings.vae_on_gpu else None
    network = _create_network(recipe, settings.family, unet, encoders)
    cast_parameters(network, TORCH_DTYPES[settings.network_dtype])
    network.apply_to()
    network.train()
    unet_lr, te_lr = _learning_rates(recipe)
    groups = network.param_groups(
        unet_lr if settings.train_unet else 0.0, te_lr if settings.train_text_encoder else 0.0
    )
    trainable = [p for g in groups for p in g["params"]]
    optimizer = trace_optimizer(
        settings.optimizer, groups, recipe.training.learning_rate, recipe.training.optimizer_args
    )
    return StepModels(unet, encoders, vae, network, optimizer, trainable)


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
        tracker.phase("text encoder activations")
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
