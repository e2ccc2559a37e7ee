"""Sample images during training: the recipe's prompts rendered with the LoRA applied.

A small text-to-image loop over a diffusers scheduler (the recipe's ``sample.sampler``), with
classifier-free guidance and SDXL's size conditioning. Prompts are encoded the way training
encodes captions (clip_skip, long prompts). Each image has its own CPU generator seeded from its
prompt, so samples are reproducible and never disturb the training randomness.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraforge.errors import DependencyError
from loraforge.fileio import atomic_path
from loraforge.training.conditioning import Conditioning, unet_conditioning
from loraforge.training.settings import SampleSpec

# recipe name -> (diffusers scheduler class, extra config)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
}


def make_scheduler(sampler: str, base_config: Any, v_prediction: bool) -> Any:
    """The diffusers inference scheduler for ``sampler``, on the model's betas.

    Raises:
        ValueError: unknown sampler name.
        DependencyError: the scheduler needs a package that is missing (``lms`` needs scipy).
    """
    import diffusers

    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    class_name, extra = SAMPLERS[sampler]
    config = {k: v for k, v in dict(base_config).items() if k != "_use_default_values"}
    config.setdefault("steps_offset", 1)
    # keyword overrides win over the config (and over its "defaults in use" list)
    prediction = "v_prediction" if v_prediction else "epsilon"
    try:
        cls = getattr(diffusers, class_name)
        return cls.from_config(config, prediction_type=prediction, **extra)
    except ImportError as e:
        raise DependencyError(
            f"sample.sampler {sampler}: {' '.join(str(e).split())}",
            hint="install the package it names, or choose another sampler (e.g. euler_a)",
        ) from e


@dataclass(frozen=True)
class SampleModels:
    """The models sampling uses (the UNet and text encoders carry the LoRA hooks)."""

    unet: Any
    vae: Any
    conditioning: Conditioning
    scheduler_config: Any
    v_prediction: bool
    weight_dtype: torch.dtype
    is_sdxl: bool
    family: str = "sd1"  # sd3 / flux sample with the flow-matching scheduler


def _step_kwargs(scheduler: Any, generator: torch.Generator) -> dict[str, Any]:
    params = inspect.signature(scheduler.step).parameters
    return {"generator": generator} if "generator" in params else {}


def _guided(
    unet: Any, latents: torch.Tensor, t: Any, cond: dict[str, Any], cfg_scale: float
) -> torch.Tensor:
    """The guided prediction: ``uncond + cfg * (cond - uncond)`` (one batched UNet call)."""
    doubled = torch.cat([latents, latents])
    pred = unet(doubled, t, **cond).sample
    uncond, text = pred.chunk(2)
    return uncond + cfg_scale * (text - uncond)


def _conditioning(models: SampleModels, spec: SampleSpec, device: torch.device) -> dict[str, Any]:
    embeds = models.conditioning.encode([spec.negative, spec.prompt])
    size_ids = None
    if models.is_sdxl:
        ids = [spec.height, spec.width, 0, 0, spec.height, spec.width]
        size_ids = torch.tensor([ids, ids], dtype=torch.float32, device=device)
    return unet_conditioning(embeds, size_ids, models.weight_dtype)


@torch.no_grad()
def render(
    models: SampleModels, spec: SampleSpec, sampler: str, device: torch.device, autocast: Callable
) -> Any:
    """Render one sample; returns a PIL image."""
    if models.family in ("sd3", "flux"):
        from loraforge.training.flow_sampling import render_flow

        return _to_image(render_flow(models, spec, device, autocast))
    scheduler = make_scheduler(sampler, models.scheduler_config, models.v_prediction)
    scheduler.set_timesteps(spec.steps, device=device)
    generator = torch.Generator("cpu").manual_seed(spec.seed)
    shape = (1, models.unet.config.in_channels, spec.height // 8, spec.width // 8)
    latents = torch.randn(shape, generator=generator).to(device) * scheduler.init_noise_sigma
    with autocast():
        cond = _conditioning(models, spec, device)
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(latents, t).to(models.weight_dtype)
            pred = _guided(models.unet, model_input, t, cond, spec.cfg_scale).float()
            latents = scheduler.step(
                pred, t, latents, **_step_kwargs(scheduler, generator)
            ).prev_sample
    vae = models.vae
    scaled = latents / vae.config.scaling_factor
    return _to_image(vae.decode(scaled.to(vae.device, vae.dtype)).sample[0].float())


def _to_image(image: torch.Tensor) -> Any:
    """``(3, H, W)`` pixels in [-1, 1] as a PIL image."""
    from PIL import Image

    array = ((image.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def save_png(image: Any, path: Path) -> Path:
    """Write ``image`` as PNG atomically (samples of a resumed run replace their own)."""
    with atomic_path(path, force=True) as tmp:
        image.save(tmp, format="PNG")
    return path


def render_all(
    models: SampleModels,
    specs: Sequence[SampleSpec],
    sampler: str,
    device: torch.device,
    autocast: Callable,
) -> list[tuple[SampleSpec, Any]]:
    """Render every prompt with adapters and base models in eval mode (dropout off)."""
    return [(spec, render(models, spec, sampler, device, autocast)) for spec in specs]


@dataclass(frozen=True)
class SampleRequest:
    """Where the images of one sampling point go.

    Attributes:
        folder: the sample folder (``output.dir / "sample"``).
        name: ``output.name``.
        kind, number: ``("epoch", 2)`` or ``("step", 100)``; part of the file names.
    """

    folder: Path
    name: str
    kind: str
    number: int


def sample_during_training(
    models: SampleModels,
    network: Any,
    optimizer: Any,
    specs: Sequence[SampleSpec],
    sampler: str,
    request: SampleRequest,
    *,
    device: torch.device,
    autocast: Callable,
) -> list[tuple[Path, Any]]:
    """Render and write the samples of one sampling point; training modes are restored after.

    Returns:
        ``(png path, PIL image)`` pairs.
    """
    from loraforge.training.eval_mode import evaluation
    from loraforge.training.output_plan import sample_file_name

    modules = [network, models.unet, *models.conditioning.text_encoders]
    vae_device = models.vae.device
    with evaluation(optimizer, modules):
        models.vae.to(device)
        try:
            images = render_all(models, specs, sampler, device, autocast)
        finally:
            models.vae.to(vae_device)
    written = []
    for spec, image in images:
        file_name = sample_file_name(
            request.name, request.kind, request.number, spec.index, spec.seed
        )
        written.append((save_png(image, request.folder / file_name), image))
    return written
