"""What a run resolved beyond the recipe, for the metadata of every file it saves."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

from loraforge.data.dataset import TrainingData
from loraforge.data.dataset_facts import bucket_info, tag_frequency
from loraforge.recipe import Recipe
from loraforge.training.lora_metadata import (
    RunFacts,
    SubsetFacts,
    build_metadata,
    new_session_id,
)
from loraforge.training.model_hashes import model_file_hashes
from loraforge.training.optim import optimizer_description
from loraforge.training.settings import RunSettings
from loraforge.training.state import TrainingProgress


def subset_facts(data: TrainingData) -> tuple[SubsetFacts, ...]:
    """Each image folder as sd-scripts reports it (folder name, repeats, image count)."""
    counts: dict[int, int] = {}
    for image in data.discovery.images:
        counts[image.subset] = counts.get(image.subset, 0) + 1
    return tuple(
        SubsetFacts(
            # the concrete folder, so ss_dataset_dirs names "5_sks dog", not its parent
            config=dataclasses.replace(subset.config, dir=str(subset.dir)),
            num_repeats=subset.repeats,
            img_count=counts.get(subset.index, 0),
            class_tokens=subset.class_tokens,
        )
        for subset in data.discovery.subsets
        if counts.get(subset.index)
    )


def run_facts(
    recipe: Recipe,
    *,
    data: TrainingData,
    network_metadata: dict[str, str],
    settings: RunSettings,
    num_processes: int,
    hash_model_files: bool,
) -> RunFacts:
    """Collect the :class:`RunFacts` of a run.

    Args:
        recipe: the recipe.
        data: the training data (discovery and bucket plan).
        network_metadata: ``Network.metadata()`` (module name and network args).
        settings: the resolved settings (family, prediction type, length).
        num_processes: data-parallel processes.
        hash_model_files: hash the base model / VAE files (slow for big files; main process only).
    """
    length = settings.length
    args = network_metadata.get("ss_network_args")
    t = recipe.training
    return RunFacts(
        session_id=new_session_id(),
        training_started_at=time.time(),
        family=settings.family,  # type: ignore[arg-type]
        v_prediction=settings.v_prediction,
        network_module=network_metadata["ss_network_module"],
        optimizer=optimizer_description(t.optimizer, t.optimizer_args),
        subsets=subset_facts(data),
        num_batches_per_epoch=length.batches_per_epoch,
        num_epochs=length.num_epochs,
        max_train_steps=length.max_train_steps,
        network_args=json.loads(args) if args else {},
        num_processes=num_processes,
        tag_frequency=tag_frequency(data.discovery),
        bucket_info=bucket_info(data.plan) if recipe.dataset.enable_bucket else None,
        base_model_hashes=model_file_hashes(recipe.model.base) if hash_model_files else None,
        vae_hashes=(
            model_file_hashes(recipe.model.vae) if hash_model_files and recipe.model.vae else None
        ),
        num_validation_images=len(data.plan.validation),
        variant=settings.variant,
    )


def metadata_writer(
    recipe: Recipe, facts: RunFacts
) -> Callable[[TrainingProgress], dict[str, Any]]:
    """The metadata of a file saved at a given progress (``ss_steps``, ``ss_epoch``, time)."""

    def metadata_for(progress: TrainingProgress) -> dict[str, Any]:
        return build_metadata(
            recipe, facts, steps=progress.global_step, epoch=progress.epoch, saved_at=time.time()
        )

    return metadata_for
