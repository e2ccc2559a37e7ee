"""Build the run of one traced training step from an architecture, on full-size fake tensors.

The frozen models are built from their configs (no weights read) in the dtypes of
:func:`loraforge.training.dtypes.dtype_plan`; the attention kernel, activation checkpointing, fp8
storage, the network, its parameter groups, the optimizer and the scheduler come from the
functions ``train`` uses. What differs from ``train`` is only where the models come from and
the device: the trace runs on the CPU with CUDA's autocast policy (:mod:`loraforge.vram.amp`).
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraforge.recipe.types import Recipe
from loraforge.training.dtypes import torch_dtype
from loraforge.vram.arch import Architecture
from loraforge.vram.settings import MemorySettings


@dataclass
class StepModels:
    """The modules of one traced step (the VAE/text encoders only when they are on the GPU)."""

    unet: nn.Module
    text_encoders: list[nn.Module]
    vae: nn.Module | None
    network: Any
    optimizer: Any
    scheduler: Any


_NOT_ARCHITECTURE = ("architectures", "torch_dtype", "dtype")


def _kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """Config keys that describe the architecture (a stored dtype would override ours)."""
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in _NOT_ARCHITECTURE}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules directly in ``dtype`` (no fp32 copy first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _build_unet(arch: Architecture, settings: MemorySettings) -> nn.Module:
    """The UNet, or the SD3 / FLUX transformer (``arch.configs["transformer"]``)."""
    from diffusers import UNet2DConditionModel

    with _default_dtype(torch_dtype(settings.compute_dtype)):
        if "transformer" in arch.configs:
            from loraforge.models.flow_loading import transformer_class

            config = arch.configs["transformer"]
            transformer = transformer_class(arch.family).from_config(_kwargs(config))
            # buffers too (SD3's position table), as train's cast of the frozen model does
            dtype = torch_dtype(settings.compute_dtype)
            for module in transformer.modules():
                for name, buffer in module._buffers.items():
                    if buffer is not None and buffer.is_floating_point():
                        module._buffers[name] = buffer.to(dtype)
            return transformer
        return UNet2DConditionModel.from_config(_kwargs(arch.configs["unet"]))


def _build_text_encoder(name: str, config: Mapping[str, Any], settings: MemorySettings) -> Any:
    from transformers import AutoConfig, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from loraforge.training.precision import cast_parameters

    compute = torch_dtype(settings.compute_dtype)
    flow = settings.family in ("sd3", "flux")
    with _default_dtype(compute):
        if flow:  # CLIP with or without projection, or T5, as the config says
            from loraforge.models.flow_loading import class_for_config

            kwargs = _kwargs(config)
            encoder_config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
            encoder = class_for_config(encoder_config)(encoder_config)
        else:
            cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
            encoder = cls(CLIPTextConfig(**_kwargs(config)))
    cast_parameters(encoder, compute)  # no-op unless transformers chose a dtype of its own
    return encoder


def _build_vae(config: Mapping[str, Any], settings: MemorySettings) -> nn.Module:
    from diffusers import AutoencoderKL

    with _default_dtype(torch_dtype(settings.vae_dtype)):
        vae = AutoencoderKL.from_config(_kwargs(config))
    vae.requires_grad_(False)
    return vae


def _place_frozen(
    unet: nn.Module, encoders: list[Any], settings: MemorySettings, cuda_policy: bool
) -> None:
    """fp8 storage, attention and checkpointing, with ``train``'s functions."""
    from loraforge.training.precision import (
        configure_attention,
        enable_gradient_checkpointing,
        store_fp8,
    )
    from loraforge.vram.amp import checkpoint_contexts

    for module in (unet, *encoders):
        module.requires_grad_(False)
        if settings.unet_dtype == "fp8":
            store_fp8(module)
    configure_attention(unet, encoders, settings.attention)
    if settings.gradient_checkpointing:
        contexts = functools.partial(checkpoint_contexts, cuda_policy)
        trained = encoders if settings.train_text_encoder else []
        enable_gradient_checkpointing(unet, trained, contexts)


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


def _hooked_network(recipe: Recipe, family: str, unet: nn.Module, encoders: list[Any]) -> Any:
    """``train``'s network; built outside fake mode when its constructor needs real values.

    Some modules (lycoris-lora's) compute shapes with ``tensor.item()``, which fake tensors
    cannot answer: those networks are built with real (small) parameters, then made fake.
    """
    from torch._subclasses.fake_tensor import DataDependentOutputException, unset_fake_temporarily

    from loraforge.training.build import create_hooked_network

    try:
        return create_hooked_network(recipe, family, unet, encoders)
    except DataDependentOutputException:
        mode = _active_fake_mode(unet)
        if mode is None:
            raise
        with unset_fake_temporarily():
            network = create_hooked_network(recipe, family, unet, encoders)
        _to_fake(network, mode)
        return network


def _learning_rates(recipe: Recipe, settings: MemorySettings) -> tuple[float, float]:
    t = recipe.training
    unet_lr = t.unet_lr if t.unet_lr is not None else t.learning_rate
    te_lr = t.text_encoder_lr if t.text_encoder_lr is not None else t.learning_rate
    return (
        unet_lr if settings.train_unet else 0.0,
        te_lr if settings.train_text_encoder else 0.0,
    )


def build_step_models(
    recipe: Recipe,
    arch: Architecture,
    settings: MemorySettings,
    *,
    cuda_policy: bool = True,
    foreach: bool = False,
) -> StepModels:
    """Build every module one step needs, in the current mode (real or fake).

    Args:
        cuda_policy: the step will run on the CPU with CUDA's autocast policy (checkpoint
            recomputation re-enters it, and torch optimizers take their multi-tensor path, as
            on a GPU).
        foreach: the multi-tensor optimizer path without the policy (a real GPU run).

    Raises:
        RecipeError, DependencyError: the network backend refuses the network section.
        TrainingError: nothing is trainable.
    """
    from loraforge.training.precision import cast_parameters
    from loraforge.training.schedulers import build_scheduler
    from loraforge.vram.optimizers import trace_optimizer

    unet = _build_unet(arch, settings)
    # The network hooks the text encoders only when they are trained; otherwise they may be
    # off the GPU entirely (cached outputs) and are built only when they run.
    encoders = (
        [
            _build_text_encoder(name, arch.configs[name], settings)
            for name in arch.text_encoder_names
        ]
        if settings.text_encoders_on_gpu
        else []
    )
    _place_frozen(unet, encoders, settings, cuda_policy)
    vae = _build_vae(arch.configs["vae"], settings) if settings.vae_on_gpu else None
    network = _hooked_network(recipe, settings.family, unet, encoders)
    cast_parameters(network, torch_dtype(settings.network_dtype))
    network.train()
    groups = network.param_groups(*_learning_rates(recipe, settings))
    t = recipe.training
    optimizer = trace_optimizer(
        settings.optimizer,
        groups,
        t.learning_rate,
        t.optimizer_args,
        foreach=cuda_policy or foreach,
    )
    scheduler = build_scheduler(
        t.lr_scheduler,
        optimizer,
        t.max_train_steps or 1_000_000,  # the rate does not change the memory
        t.lr_warmup_steps,
        t.lr_scheduler_num_cycles,
        t.lr_scheduler_power,
        learning_rate=t.learning_rate,
    )
    return StepModels(unet, encoders, vae, network, optimizer, scheduler)


@functools.cache
def trace_tokenizers(count: int, t5: bool = False) -> tuple[Any, ...]:
    """CLIP tokenizers for the traced step (the tiny vocabulary: every caption is padded to
    the full 77-token windows, so the tensors have the real sizes); with ``t5`` the last one is
    the tiny T5 tokenizer (captions padded to the T5 length)."""
    if t5:
        from transformers import AutoTokenizer

        from loraforge.models.tiny_flow import write_tiny_t5_tokenizer

        with tempfile.TemporaryDirectory(prefix="loraforge-trace-tokenizer-") as folder:
            last = AutoTokenizer.from_pretrained(str(write_tiny_t5_tokenizer(Path(folder))))
        return (*trace_tokenizers(count - 1), last)
    from transformers import CLIPTokenizer

    from loraforge.models.clip_tokenizer import write_tiny_tokenizer

    with tempfile.TemporaryDirectory(prefix="loraforge-trace-tokenizer-") as folder:
        write_tiny_tokenizer(Path(folder))
        tokenizer = CLIPTokenizer.from_pretrained(folder)  # reads the files into memory
    return (tokenizer,) * count
