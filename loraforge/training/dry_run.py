"""``loraforge train RECIPE --dry-run``: everything a run would do, resolved without training.

The model's architecture comes from its configs (no weights are read) and is built on torch's
``meta`` device, so the network's modules and trainable parameter count are exact and the plan
takes seconds even for SDXL. The dataset is discovered and bucketed as training does; lengths,
saves and samples follow :mod:`loraforge.training.settings` and :mod:`loraforge.training.saving`,
the same rules the run uses.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loraforge.recipe import Recipe
from loraforge.training.output_plan import (
    PlannedFile,
    existing_outputs,
    interrupt_state,
    planned_outputs,
)
from loraforge.training.resume import resolve_resume, saved_step
from loraforge.training.settings import (
    RunSettings,
    TrainingLength,
    run_settings,
    training_length,
)


@dataclass(frozen=True)
class BucketRow:
    width: int
    height: int
    images: int
    samples: int
    batches: int


@dataclass(frozen=True)
class NetworkSummary:
    backend: str
    algorithm: str
    dim: int
    alpha: float
    unet_modules: int
    text_encoder_modules: int
    trainable_parameters: int
    groups: dict[str, float]


@dataclass(frozen=True)
class TrainingPlan:
    """What ``loraforge train`` would do.

    Attributes:
        family, v_prediction, architecture: the resolved model and where its configs come from.
        images, reg_images, samples_per_epoch: dataset counts (samples include repeats).
        subsets: ``(folder, images, repeats)`` per image folder.
        buckets: the bucket table.
        skipped: files that cannot be used, with reasons.
        warnings: dataset findings.
        length: epochs and steps.
        num_processes, total_batch_size: data-parallel layout.
        optimizer, scheduler, warmup_steps: the optimization.
        precision: mixed precision and related switches.
        caches: ``latents``/``text_encoder_outputs`` modes and the cache folder.
        network: modules, ranks, trainable parameters, learning rate per group.
        output_dir: ``output.dir``.
        files: every file the run writes.
        existing: planned files that exist already (need ``--force``).
        resume_from, resume_step: the state a ``--resume`` would continue from.
        vram: the analytic VRAM estimate (:class:`loraforge.vram.VramEstimate`).
        validation_images: held-out images the validation loss uses (never trained on).
    """

    recipe: str | None
    family: str
    v_prediction: bool
    architecture: str
    images: int
    reg_images: int
    samples_per_epoch: int
    subsets: list[tuple[str, int, int]]
    buckets: list[BucketRow]
    skipped: list[tuple[str, str]]
    warnings: list[str]
    length: TrainingLength
    num_processes: int
    total_batch_size: int
    optimizer: str
    scheduler: str
    warmup_steps: int
    precision: dict[str, Any]
    caches: dict[str, str]
    network: NetworkSummary
    output_dir: Path
    files: list[PlannedFile]
    existing: list[Path]
    resume_from: Path | None = None
    resume_step: int = 0
    vram: Any = field(default=None)  # a loraforge.vram.VramEstimate
    validation_images: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (paths as strings)."""
        data = asdict(self)
        data["files"] = [{"step": f.step, "path": str(f.path), "kind": f.kind} for f in self.files]
        data["existing"] = [str(p) for p in self.existing]
        data["output_dir"] = str(self.output_dir)
        data["resume_from"] = None if self.resume_from is None else str(self.resume_from)
        if self.vram is not None:
            from loraforge.vram import vram_to_dict

            data["vram"] = vram_to_dict(self.vram)
        return data


def world_size() -> int:
    """Processes of the launch (``accelerate launch`` / torchrun set ``WORLD_SIZE``)."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def meta_network(recipe: Recipe, arch: Any, settings: RunSettings) -> NetworkSummary:
    """Build the model on the ``meta`` device (no memory, no weights) and the network on it."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from loraforge.backends import create_network

    with torch.device("meta"):
        if "transformer" in arch.configs:  # SD3 / FLUX
            from loraforge.models.flow_loading import models_from_configs

            unet, encoders = models_from_configs(arch.family, arch.configs)
        else:
            unet = UNet2DConditionModel.from_config(dict(arch.configs["unet"]))
            encoders = []
            for name in arch.text_encoder_names:
                cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
                encoders.append(cls(CLIPTextConfig(**arch.configs[name])))
    network = create_network(recipe.network, arch.family, unet, encoders)
    groups = network.param_groups(settings.unet_lr, settings.text_encoder_lr)
    names = [name for name, _ in network.named_children()]
    unet_modules = sum(name.startswith("lora_unet_") for name in names)
    n = recipe.network
    return NetworkSummary(
        backend=n.backend,
        algorithm=n.algorithm,
        dim=n.dim,
        alpha=float(n.alpha or n.dim),
        unet_modules=unet_modules,
        text_encoder_modules=len(names) - unet_modules,
        trainable_parameters=network.trainable_parameter_count(),
        groups={str(g.get("name")): float(g["lr"]) for g in groups},
    )


def _dataset_rows(plan: Any, batch_size: int) -> list[BucketRow]:
    return [
        BucketRow(b.resolution[0], b.resolution[1], len(b.images), b.samples, b.batches(batch_size))
        for b in plan.buckets
    ]


def _subset_rows(discovery: Any) -> list[tuple[str, int, int]]:
    counts: dict[int, int] = {}
    for image in discovery.images:
        counts[image.subset] = counts.get(image.subset, 0) + 1
    return [(str(s.dir), counts.get(s.index, 0), s.repeats) for s in discovery.subsets]


def _precision(recipe: Recipe) -> dict[str, Any]:
    t = recipe.training
    return {
        "mixed_precision": t.mixed_precision,
        "full_fp16": t.full_fp16,
        "full_bf16": t.full_bf16,
        "fp8_base": t.fp8_base,
        "attention": t.attention,
        "gradient_checkpointing": t.gradient_checkpointing,
        "save_precision": recipe.output.save_precision,
    }


def _dataset_and_length(recipe: Recipe, processes: int) -> tuple[Any, Any, TrainingLength]:
    """Discovery, bucket plan and run length, computed as the run computes them."""
    from loraforge.data.buckets import BucketSettings
    from loraforge.data.discovery import discover
    from loraforge.data.holdout import missing_held_out_error
    from loraforge.data.plan import plan_buckets
    from loraforge.data.sampler import BucketBatchSampler

    t = recipe.training
    discovery = discover(recipe.dataset, verify=True)  # as train: bad pixels are skipped
    buckets = plan_buckets(discovery, BucketSettings.from_dataset(recipe.dataset))
    missing = missing_held_out_error(recipe.dataset, len(buckets.validation))
    if missing is not None:
        raise missing
    sampler = BucketBatchSampler(buckets.bucket_samples(), t.batch_size, num_replicas=processes)
    length = training_length(
        len(sampler), t.gradient_accumulation_steps, t.max_train_epochs, t.max_train_steps
    )
    return discovery, buckets, length


def build_plan(
    recipe: Recipe, *, resume: str | Path | None = None, num_processes: int | None = None
) -> TrainingPlan:
    """Resolve everything ``loraforge train`` would do, without loading weights or training.

    Raises:
        LoraforgeError: the same user errors the run would raise at set-up (dataset, model
            configs, optimizer name/arguments, resume state).
    """
    from loraforge.models.families import family_spec
    from loraforge.models.pickles import refuse_pickles
    from loraforge.training.optim import optimizer_description
    from loraforge.training.schedulers import resolve_warmup_steps
    from loraforge.vram import estimate_vram
    from loraforge.vram.arch import resolve_architecture

    t, m = recipe.training, recipe.model
    processes = num_processes or world_size()
    discovery, buckets, length = _dataset_and_length(recipe, processes)
    refuse_pickles(m.base, "model.base", m.allow_pickle)
    if m.vae:
        refuse_pickles(m.vae, "model.vae", m.allow_pickle)
    arch = resolve_architecture(m.base, m.family, vae=m.vae)
    settings = run_settings(
        recipe,
        family=arch.family,
        family_v_prediction=family_spec(arch.family).v_prediction,
        length=length,
    )
    state_dir = resolve_resume(
        resume, settings.output, recipe.to_dict(), max_train_steps=length.max_train_steps
    )
    files = planned_outputs(settings.output, settings.sample, length)
    after = saved_step(state_dir)
    checked = [*files, interrupt_state(settings.output, length)]
    return TrainingPlan(
        recipe=recipe.source,
        family=arch.family,
        v_prediction=settings.v_prediction,
        architecture=arch.source,
        images=sum(1 for image in discovery.images if not image.is_reg),
        reg_images=sum(1 for image in discovery.images if image.is_reg),
        samples_per_epoch=buckets.num_samples,
        subsets=_subset_rows(discovery),
        buckets=_dataset_rows(buckets, t.batch_size),
        skipped=[(str(i.path), i.reason) for i in (*discovery.skipped, *buckets.skipped)],
        warnings=list(discovery.warnings),
        length=length,
        num_processes=processes,
        total_batch_size=t.batch_size * t.gradient_accumulation_steps * processes,
        optimizer=optimizer_description(t.optimizer, t.optimizer_args),
        scheduler=t.lr_scheduler,
        warmup_steps=resolve_warmup_steps(t.lr_warmup_steps, length.max_train_steps),
        precision=_precision(recipe),
        caches={
            "latents": recipe.cache.latents,
            "text_encoder_outputs": recipe.cache.text_encoder_outputs,
            "dir": recipe.cache.dir or str(Path(recipe.output.dir) / "cache"),
        },
        network=meta_network(recipe, arch, settings),
        output_dir=settings.output.dir,
        files=[f for f in files if f.step > after],
        existing=existing_outputs(checked, after_step=after, resumed_from=state_dir),
        resume_from=state_dir,
        resume_step=after,
        vram=estimate_vram(recipe),
        validation_images=len(buckets.validation),
    )
