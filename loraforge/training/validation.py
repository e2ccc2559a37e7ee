"""The validation loss: the training loss of the held-out images, made deterministic.

Each held-out image (:mod:`loraforge.data.holdout`) is seen at its bucket with the centre crop,
unmirrored, with its fixed caption (:func:`loraforge.data.captions.validation_caption`), at a
fixed grid of timesteps over the recipe's range (sd-scripts: ``linspace(min, max, 6)[1:-1]``,
so 200, 400, 600 and 800 for the full range), with noise drawn from a generator seeded by the
image's key (the same noise at every timestep and every validation). Latents come from the
latent cache when there is one; otherwise the VAE encodes the image with the same per-image
posterior seed as the cache (:func:`loraforge.data.cache.entry_generator`), so both paths
agree. The network (and the frozen models) run in eval mode, without gradients, and a
schedule-free optimizer's evaluation weights are used, as for sampling. The loss of every
``(image, timestep)`` counts once: the value is the same whatever the batch size.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from loraforge.data.cache import centre_pixels, encode_pixels, entry_generator
from loraforge.data.captions import CaptionOptions, validation_caption
from loraforge.data.dataset import TrainingData
from loraforge.data.plan import PlannedImage
from loraforge.data.subsets import ResolvedSubset
from loraforge.training.conditioning import Conditioning, sdxl_size_ids, unet_conditioning
from loraforge.training.eval_mode import evaluation
from loraforge.training.flow import NUM_TRAIN_TIMESTEPS, FlowBatch
from loraforge.training.loss import training_loss
from loraforge.training.noise import noise_noisy_latents_and_timesteps, prediction_target
from loraforge.training.settings import ValidationSettings
from loraforge.training.step import LossSetup, flow_draw_loss

#: timesteps per image (sd-scripts' NUM_VALIDATION_TIMESTEPS)
NUM_VALIDATION_TIMESTEPS = 4


def validation_timesteps(
    min_timestep: int, max_timestep: int, count: int = NUM_VALIDATION_TIMESTEPS
) -> tuple[int, ...]:
    """``count`` evenly spaced timesteps strictly inside ``[min, max]`` (sd-scripts'
    ``np.linspace(min, max, count + 2, dtype=int)[1:-1]``), duplicates removed."""
    step = (max_timestep - min_timestep) / (count + 1)
    grid = (int(i * step + min_timestep) for i in range(1, count + 1))
    return tuple(dict.fromkeys(grid))


def noise_seed(key: str) -> int:
    """The seed of one held-out image's noise: a function of its key only."""
    return random.Random(f"loraforge:validation:{key}").getrandbits(63)


@dataclass(frozen=True)
class ValidationBatch:
    """Held-out images of one bucket, with their fixed captions."""

    images: tuple[PlannedImage, ...]
    captions: tuple[str, ...]

    @property
    def keys(self) -> list[str]:
        return [p.record.key for p in self.images]


def validation_batches(
    held_out: Sequence[PlannedImage],
    subsets: Sequence[ResolvedSubset],
    batch_size: int,
    max_batches: int | None = None,
) -> list[ValidationBatch]:
    """Group the held-out images by bucket (in bucket order, then file order) into batches of
    ``batch_size``, at most ``max_batches`` of them (``max_validation_steps``)."""
    by_bucket: dict[tuple[int, int], list[PlannedImage]] = {}
    for planned in held_out:
        by_bucket.setdefault(planned.assignment.bucket, []).append(planned)
    batches: list[ValidationBatch] = []
    for bucket in sorted(by_bucket):
        group = by_bucket[bucket]
        for start in range(0, len(group), batch_size):
            part = tuple(group[start : start + batch_size])
            captions = tuple(
                validation_caption(
                    p.record.caption,
                    CaptionOptions.from_subset(subsets[p.record.subset].config),
                )
                for p in part
            )
            batches.append(ValidationBatch(part, captions))
    return batches[:max_batches] if max_batches is not None else batches


def batch_inputs(batch: ValidationBatch) -> dict[str, Any]:
    """The SDXL size conditioning of a batch, laid out as the training batches are."""
    sizes = [(p.record.size[1], p.record.size[0]) for p in batch.images]
    crops = [(p.assignment.center_crop()[1], p.assignment.center_crop()[0]) for p in batch.images]
    targets = [(p.assignment.bucket[1], p.assignment.bucket[0]) for p in batch.images]
    return {
        "original_sizes_hw": torch.tensor(sizes),
        "crop_top_lefts": torch.tensor(crops),
        "target_sizes_hw": torch.tensor(targets),
    }


def held_out_latents(conditioning: Conditioning, batch: ValidationBatch, seed: int) -> torch.Tensor:
    """``(B, 4, H/8, W/8)`` scaled latents: from the cache, or encoded as the cache would."""
    if conditioning.latent_cache is not None:
        latents = conditioning.latent_cache.batch(batch.keys, [False] * len(batch.images))
    else:
        vae = conditioning.vae
        pixels = torch.stack([centre_pixels(p) for p in batch.images])
        generators = [entry_generator(vae, seed, key) for key in batch.keys]
        latents = encode_pixels(vae, pixels, generators)
    return latents.to(conditioning.device, torch.float32)


def batch_loss_sum(
    setup: LossSetup,
    batch: ValidationBatch,
    latents: torch.Tensor,
    timesteps: Sequence[int],
    autocast: Callable[[], Any],
) -> float:
    """The sum over the batch's images and ``timesteps`` of the per-image training loss."""
    device = latents.device
    with autocast():
        embeds = setup.conditioning.text(list(batch.captions), with_grad=False)
    if setup.flow is not None:
        return _flow_loss_sum(setup, batch, latents, embeds, timesteps, autocast)
    size_ids = sdxl_size_ids(batch_inputs(batch), device) if setup.is_sdxl else None
    kwargs = unet_conditioning(embeds, size_ids, setup.weight_dtype)
    weights = torch.ones(len(batch.images), device=device)
    generator = torch.Generator("cpu")
    total = 0.0
    for t in timesteps:
        options = replace(setup.noise, min_timestep=t, max_timestep=t)
        draws = []
        for index, key in enumerate(batch.keys):
            generator.manual_seed(noise_seed(key))
            draws.append(
                noise_noisy_latents_and_timesteps(
                    latents[index : index + 1], setup.schedule, options, generator
                )
            )
        noise = torch.cat([d.noise for d in draws])
        noisy = torch.cat([d.noisy_latents for d in draws])
        steps = torch.cat([d.timesteps for d in draws])
        with autocast():
            pred = setup.unet(noisy.to(setup.weight_dtype), steps, **kwargs).sample
        target = prediction_target(setup.schedule, latents, noise, steps, setup.loss.v_prediction)
        loss = training_loss(pred, target, steps, weights, setup.schedule, setup.loss)
        total += float(loss) * len(batch.images)
    return total


def _flow_loss_sum(
    setup: LossSetup,
    batch: ValidationBatch,
    latents: torch.Tensor,
    embeds: Any,
    timesteps: Sequence[int],
    autocast: Callable[[], Any],
) -> float:
    """SD3 / FLUX: the training loss at noise level ``sigma = t / 1000`` for each of
    ``timesteps``, with each image's own fixed noise (see :func:`noise_seed`)."""
    generator = torch.Generator("cpu")
    noise = torch.cat(
        [
            torch.randn(latents[i : i + 1].shape, generator=generator.manual_seed(noise_seed(k)))
            for i, k in enumerate(batch.keys)
        ]
    ).to(latents.device, latents.dtype)
    total = 0.0
    for t in timesteps:
        sigmas = torch.full((len(batch.images), 1, 1, 1), t / NUM_TRAIN_TIMESTEPS)
        sigmas = sigmas.to(latents.device, latents.dtype)
        draw = FlowBatch(
            noise=noise,
            noisy=(1.0 - sigmas) * latents + sigmas * noise,
            sigmas=sigmas,
            timesteps=sigmas.view(-1) * NUM_TRAIN_TIMESTEPS,
        )
        losses = flow_draw_loss(setup, setup.flow, latents, embeds, draw, autocast)
        total += float(losses.sum())
    return total


class Validator:
    """Computes the validation loss of the network as it is now.

    Args:
        setup: the run's loss inputs (the same UNet, conditioning, noise and loss options).
        batches: from :func:`validation_batches`.
        timesteps: from :func:`validation_timesteps`.
        seed: the run seed (the VAE posterior seed of live latents, as the cache uses).
        frozen: the frozen models to put in eval mode too (UNet, text encoders).
    """

    def __init__(
        self,
        setup: LossSetup,
        batches: Sequence[ValidationBatch],
        timesteps: Sequence[int],
        seed: int,
        frozen: Sequence[torch.nn.Module] = (),
    ) -> None:
        self.setup = setup
        self.batches = tuple(batches)
        self.timesteps = tuple(timesteps)
        self.seed = seed
        self.frozen = tuple(frozen)

    @property
    def num_images(self) -> int:
        return sum(len(b.images) for b in self.batches)

    def loss(self, network: torch.nn.Module, optimizer: Any, autocast: Callable) -> float:
        """The mean loss over every held-out image and timestep (float)."""
        total = 0.0
        with evaluation(optimizer, [network, *self.frozen]), torch.no_grad():
            for batch in self.batches:
                latents = held_out_latents(self.setup.conditioning, batch, self.seed)
                total += batch_loss_sum(self.setup, batch, latents, self.timesteps, autocast)
        return total / (self.num_images * len(self.timesteps))


def build_validator(
    settings: ValidationSettings,
    data: TrainingData,
    setup: LossSetup,
    *,
    batch_size: int,
    seed: int,
    frozen: Sequence[torch.nn.Module] = (),
) -> Validator | None:
    """The run's validator, or ``None`` when the recipe holds no images out (set-up has
    checked that a recipe asking for validation holds some out)."""
    if not settings.enabled or not data.plan.validation:
        return None
    held_out, subsets = data.plan.validation, data.discovery.subsets
    batches = validation_batches(held_out, subsets, batch_size, settings.max_batches)
    timesteps = validation_timesteps(setup.noise.min_timestep, setup.noise.max_timestep)
    return Validator(setup, batches, timesteps, seed, frozen)
