"""Build the modules of one training step from an architecture, in the current tensor mode.

Under ``FakeTensorMode`` the full-size models cost no memory; in plain mode (small models) they
are real. Dtypes follow the precision rules of :mod:`loraforge.vram.settings` (the same as
``loraforge.training.precision``); checkpointing and attention follow the recipe.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from loraforge.recipe.types import Recipe
from loraforge.vram.amp import checkpoint_contexts
from loraforge.vram.arch import Architecture
from loraforge.vram.optimizers import trace_optimizer
from loraforge.vram.settings import MemorySettings

TORCH_DTYPES = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8": torch.float8_e4m3fn,
}


@dataclass
class StepModels:
    """The modules of one training step (the VAE/text encoders only when they are on the GPU)."""

    unet: nn.Module
    text_encoders: list[nn.Module]
    vae: nn.Module | None
    network: nn.Module
    optimizer: torch.optim.Optimizer
    trainable: list[nn.Parameter] = field(default_factory=list)


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
