"""The metadata written into trained LoRA files: sd-scripts ``ss_*`` keys, ``modelspec.*``
(sai_model_spec 1.0.1) and the resolved recipe.

Keys and value encodings follow kohya-ss/sd-scripts ``train_network.py`` (every value is a
string: ``str()`` of the value, so ``None`` -> ``"None"``, booleans -> ``"True"``/``"False"``;
mappings are JSON) and ``library/sai_model_spec.py``, so tools that read kohya LoRAs (A1111/Forge
metadata viewers, civitai, kohya's own scripts) read loraforge's. The file hashes ``sshs_*`` are
not made here: the LoRA file writer computes them from the tensors it writes.

Per-subset options (augmentations, caption dropout, keep_tokens) have one flat ``ss_*`` key in
sd-scripts' single-dataset layout; loraforge writes ``True`` when any subset enables a flag and
the largest value of a number, and the exact per-subset values in ``ss_datasets``.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from loraforge import __version__
from loraforge.data.dataset_facts import capped_tag_frequency
from loraforge.models.families import flow_base_model_version, flow_modelspec_architecture
from loraforge.ops.derived_metadata import BASE_MODEL_VERSION
from loraforge.recipe import shareable_dict
from loraforge.training.flow_metadata import flow_model_keys, flow_modelspec, is_flow
from loraforge.training.model_hashes import ModelHashes

if TYPE_CHECKING:
    from loraforge.recipe import Recipe, SubsetConfig

Family = Literal["sd1", "sd2", "sd2-v", "sdxl", "sd3", "flux"]

SAI_MODEL_SPEC_VERSION = "1.0.1"
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "diffusers"
_ARCHITECTURES = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sdxl": "stable-diffusion-xl-v1-base",
}


@dataclass(frozen=True)
class SubsetFacts:
    """One dataset subset as discovered.

    Attributes:
        config: the recipe's subset.
        num_repeats: resolved repeats (from the recipe or the ``<N>_name`` folder).
        img_count: images found.
        class_tokens: resolved class tokens, if any.
    """

    config: SubsetConfig
    num_repeats: int
    img_count: int
    class_tokens: str | None = None


@dataclass(frozen=True)
class RunFacts:
    """What the run resolved beyond the recipe; everything metadata needs besides the recipe.

    Attributes:
        session_id: random id shared by all files of one run (:func:`new_session_id`).
        training_started_at: UNIX time the run started.
        family: the resolved model family.
        v_prediction: the resolved prediction type.
        network_module: ``networks.lora`` (kohya LoRA), ``lycoris.kohya`` (LyCORIS)...
        network_args: the network's extra arguments (``conv_dim``, ``algo``...); written as
            strings in ``ss_network_args`` like sd-scripts, omitted when empty.
        optimizer: ``ss_optimizer`` text (:func:`loraforge.training.optim.optimizer_description`).
        subsets: the discovered subsets.
        num_batches_per_epoch, num_epochs, max_train_steps, lr_warmup_steps: the resolved plan.
        num_processes: data-parallel processes.
        tag_frequency: ``{folder name: {tag: count}}``.
        bucket_info: ``{"buckets": {...}, "mean_img_ar_error": x}`` or ``None`` without buckets.
        base_model_hashes, vae_hashes: from :func:`model_file_hashes` (``None``: not written).
        num_validation_images: held-out validation images (``ss_num_validation_images``).
    """

    session_id: int
    training_started_at: float
    family: Family
    v_prediction: bool
    network_module: str
    optimizer: str
    subsets: tuple[SubsetFacts, ...]
    num_batches_per_epoch: int
    num_epochs: int
    max_train_steps: int
    network_args: Mapping[str, Any] = field(default_factory=dict)
    num_processes: int = 1
    tag_frequency: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    bucket_info: Mapping[str, Any] | None = None
    base_model_hashes: ModelHashes | None = None
    vae_hashes: ModelHashes | None = None
    num_validation_images: int = 0
    variant: str | None = None


def new_session_id() -> int:
    """A random session id in ``[0, 2**32]`` (not drawn from the seeded training RNGs)."""
    return secrets.randbelow(2**32 + 1)


def base_model_version(family: Family, v_prediction: bool, variant: str | None = None) -> str:
    """``ss_base_model_version``: ``sd_v1``, ``sd_v2``, ``sd_v2_v``, ``sdxl_base_v1-0``; for
    SD3 / FLUX see :func:`loraforge.models.families.flow_base_model_version`."""
    if is_flow(family):
        return flow_base_model_version(family, variant)
    return BASE_MODEL_VERSION[("sd2" if family == "sd2-v" else family, v_prediction)]


def modelspec_architecture(family: Family, v_prediction: bool, variant: str | None = None) -> str:
    """``modelspec.architecture`` of a LoRA, e.g. ``stable-diffusion-xl-v1-base/lora``."""
    if is_flow(family):
        return f"{flow_modelspec_architecture(family, variant)}/lora"
    if family in ("sd2", "sd2-v") and v_prediction:
        return "stable-diffusion-v2-768-v/lora"
    return f"{_ARCHITECTURES['sd2' if family == 'sd2-v' else family]}/lora"


def _number(value: float) -> int | float:
    """Whole floats as ints (``lr_warmup_steps: 100.0`` -> ``100``), like sd-scripts' parsing."""
    return int(value) if float(value).is_integer() else value


def _training_keys(recipe: Recipe, facts: RunFacts) -> dict[str, Any]:
    t = recipe.training
    return {
        "ss_session_id": facts.session_id,
        "ss_training_started_at": facts.training_started_at,
        "ss_output_name": recipe.output.name,
        "ss_learning_rate": t.learning_rate,
        "ss_text_encoder_lr": t.text_encoder_lr,
        "ss_unet_lr": t.unet_lr,
        "ss_num_batches_per_epoch": facts.num_batches_per_epoch,
        "ss_num_epochs": facts.num_epochs,
        "ss_gradient_checkpointing": t.gradient_checkpointing,
        "ss_gradient_accumulation_steps": t.gradient_accumulation_steps,
        "ss_max_train_steps": facts.max_train_steps,
        "ss_lr_warmup_steps": _number(t.lr_warmup_steps),
        "ss_lr_scheduler": t.lr_scheduler,
        "ss_mixed_precision": t.mixed_precision,
        "ss_full_fp16": t.full_fp16,
        "ss_seed": t.seed,
        "ss_noise_offset": t.noise_offset,
        "ss_noise_offset_random_strength": t.noise_offset_random_strength,
        "ss_adaptive_noise_scale": t.adaptive_noise_scale,
        "ss_multires_noise_iterations": t.multires_noise_iterations,
        "ss_multires_noise_discount": t.multires_noise_discount,
        "ss_ip_noise_gamma": t.ip_noise_gamma,
        "ss_ip_noise_gamma_random_strength": t.ip_noise_gamma_random_strength,
        "ss_zero_terminal_snr": t.zero_terminal_snr,
        "ss_optimizer": facts.optimizer,
        "ss_max_grad_norm": t.max_grad_norm,
        "ss_prior_loss_weight": t.prior_loss_weight,
        "ss_min_snr_gamma": t.min_snr_gamma,
        "ss_scale_weight_norms": t.scale_weight_norms,
        "ss_debiased_estimation": t.debiased_estimation_loss,
        "ss_loss_type": t.loss_type,
        "ss_huber_schedule": t.huber_schedule,
        "ss_huber_scale": t.huber_scale,
        "ss_huber_c": t.huber_c,
        "ss_fp8_base": t.fp8_base,
        "ss_fp8_base_unet": False,  # loraforge has no UNet-only fp8 option
        "ss_training_comment": None,
    }


def _model_keys(recipe: Recipe, facts: RunFacts) -> dict[str, Any]:
    network, model = recipe.network, recipe.model
    keys: dict[str, Any] = {
        "ss_network_module": facts.network_module,
        "ss_network_dim": network.dim,
        "ss_network_alpha": float(network.alpha or network.dim),
        "ss_network_dropout": network.dropout,
        "ss_v2": facts.family in ("sd2", "sd2-v"),
        "ss_base_model_version": base_model_version(
            facts.family, facts.v_prediction, facts.variant
        ),
        "ss_clip_skip": _clip_skip(recipe, facts),
        "ss_max_token_length": model.max_token_length,
        "ss_cache_latents": recipe.cache.latents != "none",
    }
    if facts.network_args:
        args = {k: str(v) for k, v in facts.network_args.items() if v is not None}
        keys["ss_network_args"] = json.dumps(args)
    if is_flow(facts.family):
        keys.update(flow_model_keys(recipe, facts.family, facts.variant))
    keys["ss_sd_model_name"] = _model_name(model.base)
    if facts.base_model_hashes is not None:
        keys["ss_sd_model_hash"] = facts.base_model_hashes.legacy
        keys["ss_new_sd_model_hash"] = facts.base_model_hashes.sha256
    if model.vae is not None:
        keys["ss_vae_name"] = _model_name(model.vae)
        if facts.vae_hashes is not None:
            keys["ss_vae_hash"] = facts.vae_hashes.legacy
            keys["ss_new_vae_hash"] = facts.vae_hashes.sha256
    return keys


def _clip_skip(recipe: Recipe, facts: RunFacts) -> int | None:
    # SDXL has no clip_skip option in sd-scripts; a default 1 is "not set" there.
    skip = recipe.model.clip_skip
    return None if facts.family == "sdxl" and skip == 1 else skip


def _model_name(base: str) -> str:
    return os.path.basename(base) if os.path.exists(base) else base


def _dirs_info(subsets: list[SubsetFacts]) -> dict[str, dict[str, int]]:
    """``{folder name: {"n_repeats", "img_count"}}``; repeated names get `` (2)``, `` (3)``..."""
    info: dict[str, dict[str, int]] = {}
    for subset in subsets:
        base = os.path.basename(os.path.normpath(subset.config.dir))
        key, index = base, 2
        while key in info:
            key, index = f"{base} ({index})", index + 1
        info[key] = {"n_repeats": subset.num_repeats, "img_count": subset.img_count}
    return info


def _subset_entry(subset: SubsetFacts) -> dict[str, Any]:
    c = subset.config
    return {
        "img_count": subset.img_count,
        "num_repeats": subset.num_repeats,
        "color_aug": c.color_aug,
        "flip_aug": c.flip_aug,
        "random_crop": c.random_crop,
        "shuffle_caption": c.shuffle_caption,
        "keep_tokens": c.keep_tokens,
        "keep_tokens_separator": c.keep_tokens_separator,
        "secondary_separator": c.secondary_separator,
        "enable_wildcard": c.enable_wildcard,
        "caption_prefix": c.caption_prefix,
        "caption_suffix": c.caption_suffix,
        "image_dir": os.path.basename(os.path.normpath(c.dir)),
        "class_tokens": subset.class_tokens,
        "is_reg": c.is_reg,
    }


def _dataset_keys(recipe: Recipe, facts: RunFacts) -> dict[str, Any]:
    d, t = recipe.dataset, recipe.training
    tag_frequency, note = capped_tag_frequency(facts.tag_frequency)
    subsets = list(facts.subsets)
    configs = [s.config for s in subsets]
    train = [s for s in subsets if not s.config.is_reg]
    reg = [s for s in subsets if s.config.is_reg]
    num_train = sum(s.img_count * s.num_repeats for s in train)
    num_reg = sum(s.img_count * s.num_repeats for s in reg)
    dataset_entry = {
        "is_dreambooth": True,
        "batch_size_per_device": t.batch_size,
        "num_train_images": num_train,
        "num_reg_images": num_reg,
        "resolution": list(d.resolution),
        "enable_bucket": d.enable_bucket,
        "min_bucket_reso": d.min_bucket_reso,
        "max_bucket_reso": d.max_bucket_reso,
        "tag_frequency": tag_frequency,
        "bucket_info": facts.bucket_info,
        "subsets": [_subset_entry(s) for s in subsets],
    }
    keys = {
        "ss_num_train_images": num_train,
        "ss_num_reg_images": num_reg,
        "ss_batch_size_per_device": t.batch_size,
        "ss_total_batch_size": t.batch_size * facts.num_processes * t.gradient_accumulation_steps,
        "ss_resolution": tuple(d.resolution),
        "ss_enable_bucket": d.enable_bucket,
        "ss_bucket_no_upscale": d.bucket_no_upscale,
        "ss_min_bucket_reso": d.min_bucket_reso,
        "ss_max_bucket_reso": d.max_bucket_reso,
        "ss_color_aug": any(c.color_aug for c in configs),
        "ss_flip_aug": any(c.flip_aug for c in configs),
        "ss_random_crop": any(c.random_crop for c in configs),
        "ss_shuffle_caption": any(c.shuffle_caption for c in configs),
        "ss_keep_tokens": max((c.keep_tokens for c in configs), default=0),
        "ss_caption_dropout_rate": max((c.caption_dropout_rate for c in configs), default=0.0),
        "ss_caption_dropout_every_n_epochs": max(
            (c.caption_dropout_every_n_epochs for c in configs), default=0
        ),
        "ss_caption_tag_dropout_rate": max(
            (c.caption_tag_dropout_rate for c in configs), default=0.0
        ),
        "ss_dataset_dirs": json.dumps(_dirs_info(train)),
        "ss_reg_dataset_dirs": json.dumps(_dirs_info(reg)),
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_bucket_info": json.dumps(facts.bucket_info),
        "ss_datasets": json.dumps([dataset_entry]),
    }
    if note is not None:
        keys["loraforge_tag_frequency"] = note
    if facts.num_validation_images:
        keys.update(_validation_keys(recipe, facts))
    return keys


def _validation_keys(recipe: Recipe, facts: RunFacts) -> dict[str, Any]:
    """sd-scripts' validation keys (written when images are held out)."""
    d, t = recipe.dataset, recipe.training
    return {
        "ss_num_validation_images": facts.num_validation_images,
        "ss_validation_seed": d.validation_seed,
        "ss_validation_split": d.validation_split,
        "ss_max_validation_steps": t.max_validation_steps,
        "ss_validate_every_n_epochs": t.validate_every_n_epochs,
        "ss_validate_every_n_steps": t.validate_every_n_steps,
    }


def modelspec_metadata(recipe: Recipe, facts: RunFacts, saved_at: float) -> dict[str, str]:
    """``modelspec.*`` keys (sai_model_spec 1.0.1) as sd-scripts writes them for a LoRA."""
    meta = recipe.output.metadata
    width, height = recipe.dataset.resolution
    spec: dict[str, str | None] = {
        "sai_model_spec": SAI_MODEL_SPEC_VERSION,
        "architecture": modelspec_architecture(facts.family, facts.v_prediction, facts.variant),
        "implementation": IMPL_STABILITY_AI if facts.family == "sdxl" else IMPL_DIFFUSERS,
        "title": meta.title or recipe.output.name,
        "description": meta.description,
        "author": meta.author,
        "date": datetime.datetime.fromtimestamp(int(saved_at)).isoformat(),
        "license": meta.license,
        "tags": ", ".join(meta.tags) if meta.tags else None,
        "trigger_phrase": meta.trigger_phrase,
        "resolution": f"{width}x{height}",
        "prediction_type": "v" if facts.v_prediction else "epsilon",
        "timestep_range": _timestep_range(recipe),
        "encoder_layer": None if (skip := _clip_skip(recipe, facts)) is None else str(skip),
        "implementation_version": f"loraforge/{__version__}",
    }
    if is_flow(facts.family):
        spec.update(flow_modelspec(facts.family, facts.variant))
    return {f"modelspec.{key}": value for key, value in spec.items() if value is not None}


def _timestep_range(recipe: Recipe) -> str | None:
    # sd-scripts writes the range only when min/max_timestep are given; the full range is the
    # unset case.
    low, high = recipe.training.min_timestep, recipe.training.max_timestep
    return None if (low, high) == (0, 1000) else f"{low},{high}"


def build_metadata(
    recipe: Recipe, facts: RunFacts, *, steps: int, epoch: int, saved_at: float
) -> dict[str, str]:
    """All metadata for one saved LoRA file (``ss_*``, ``modelspec.*``, ``loraforge_*``).

    Args:
        recipe: the resolved recipe.
        facts: what the run resolved (:class:`RunFacts`).
        steps: optimizer steps done when the file is saved (``ss_steps``).
        epoch: epochs done (``ss_epoch``).
        saved_at: UNIX time of the save (``ss_training_finished_at``, ``modelspec.date``).

    Returns:
        ``{key: string}`` ready for the safetensors header (the writer adds ``sshs_*`` hashes).
    """
    keys: dict[str, Any] = {}
    keys.update(_training_keys(recipe, facts))
    keys.update(_model_keys(recipe, facts))
    keys.update(_dataset_keys(recipe, facts))
    keys.update({"ss_steps": steps, "ss_epoch": epoch, "ss_training_finished_at": saved_at})
    metadata = {key: str(value) for key, value in keys.items()}
    metadata.update(modelspec_metadata(recipe, facts, saved_at))
    metadata["loraforge_version"] = __version__
    metadata["loraforge_recipe"] = json.dumps(shareable_dict(recipe), ensure_ascii=False)
    return metadata
