"""The recipe read once into plain attributes: how long to train, when to save and sample.

Nothing here imports torch; the dry run (:mod:`loraforge.training.dry_run`) and the run set-up
(:mod:`loraforge.training.setup`) share these rules, so the plan shows exactly what training
will do. After set-up nothing reads the recipe again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from loraforge.errors import RecipeError
from loraforge.recipe import Recipe
from loraforge.recipe.types import EmaConfig


@dataclass(frozen=True)
class TrainingLength:
    """How long a run is, as sd-scripts counts it.

    Attributes:
        batches_per_epoch: batches one process sees per epoch.
        steps_per_epoch: optimizer steps per epoch, ``ceil(batches / accumulation)`` (the last,
            partial accumulation of an epoch also steps).
        max_train_steps: optimizer steps in the whole run.
        num_epochs: epochs started, ``ceil(max_train_steps / steps_per_epoch)``.
    """

    batches_per_epoch: int
    steps_per_epoch: int
    max_train_steps: int
    num_epochs: int


def training_length(
    batches_per_epoch: int,
    accumulation: int,
    max_train_epochs: int | None,
    max_train_steps: int | None,
) -> TrainingLength:
    """Resolve epochs/steps: ``max_train_steps`` wins when set, else epochs x steps per epoch.

    Raises:
        RecipeError: neither is set, or the dataset has no batch.
    """
    if batches_per_epoch < 1:
        raise RecipeError(
            "the dataset gives no batch to train on", hint="check dataset.subsets and batch_size"
        )
    steps_per_epoch = math.ceil(batches_per_epoch / accumulation)
    if max_train_steps is not None:
        total = max_train_steps
    elif max_train_epochs is not None:
        total = max_train_epochs * steps_per_epoch
    else:
        raise RecipeError(
            "training: set max_train_epochs or max_train_steps", hint="e.g. max_train_epochs: 10"
        )
    return TrainingLength(
        batches_per_epoch=batches_per_epoch,
        steps_per_epoch=steps_per_epoch,
        max_train_steps=total,
        num_epochs=math.ceil(total / steps_per_epoch),
    )


@dataclass(frozen=True)
class SampleSpec:
    """One sample image to render, every default resolved.

    Attributes:
        index: position in ``sample.prompts`` (used in the file name).
    """

    index: int
    prompt: str
    negative: str
    width: int
    height: int
    seed: int
    steps: int
    cfg_scale: float


@dataclass(frozen=True)
class SampleSettings:
    """When and how sample images are rendered (``sample`` section)."""

    every_n_epochs: int | None
    every_n_steps: int | None
    sampler: str
    prompts: tuple[SampleSpec, ...]
    at_first: bool = False

    @property
    def enabled(self) -> bool:
        return bool(self.prompts) and (
            self.at_first or (self.every_n_epochs or self.every_n_steps) is not None
        )


@dataclass(frozen=True)
class EmaSettings:
    """The recipe's ``training.ema`` (see the schema for each field)."""

    decay: float = 0.999
    warmup: bool = True
    start_step: int = 0
    every_n_steps: int = 1
    device: str = "same"
    save_raw: bool = False

    @classmethod
    def from_config(cls, config: EmaConfig | None) -> EmaSettings | None:
        if config is None:
            return None
        return cls(
            decay=config.decay,
            warmup=config.warmup,
            start_step=config.start_step,
            every_n_steps=config.every_n_steps,
            device=config.device,
            save_raw=config.save_raw,
        )

    def updates_until(self, step: int) -> int:
        """How many averaging updates steps ``1..step`` make."""
        return max(0, step - self.start_step) // self.every_n_steps

    def decay_of_update(self, update: int) -> float:
        """The decay ``d_n`` of the ``update``-th averaging update (1-based)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + update) / (10 + update))


@dataclass(frozen=True)
class ValidationSettings:
    """When the validation loss is computed, and what it drives (best file, early stopping).

    Attributes:
        enabled: the dataset holds images out (``validation_split``, ``is_validation``).
        every_n_steps: also validate every N optimizer steps.
        every_n_epochs: validate every N epochs (sd-scripts: every epoch when unset).
        max_batches: validation batches per validation (``max_validation_steps``).
        patience, min_delta: early stopping; ``patience`` is ``None`` when it is off.
    """

    enabled: bool = False
    every_n_steps: int | None = None
    every_n_epochs: int | None = None
    max_batches: int | None = None
    patience: int | None = None
    min_delta: float = 0.0

    def at_step(self, step: int) -> bool:
        n = self.every_n_steps
        return self.enabled and bool(n) and step % n == 0

    def at_epoch(self, epochs_done: int) -> bool:
        return self.enabled and epochs_done % (self.every_n_epochs or 1) == 0


def validation_settings(recipe: Recipe) -> ValidationSettings:
    """The validation fields of ``dataset``, ``training`` (see :class:`ValidationSettings`)."""
    from loraforge.data.holdout import validation_requested

    t = recipe.training
    stopping = t.early_stopping
    return ValidationSettings(
        enabled=validation_requested(recipe.dataset),
        every_n_steps=t.validate_every_n_steps,
        every_n_epochs=t.validate_every_n_epochs,
        max_batches=t.max_validation_steps,
        patience=stopping.patience if stopping is not None else None,
        min_delta=stopping.min_delta if stopping is not None else 0.0,
    )


@dataclass(frozen=True)
class OutputSettings:
    """Where and when files are written (``output`` section)."""

    dir: Path
    name: str
    save_every_n_epochs: int | None
    save_every_n_steps: int | None
    save_last_n: int | None
    save_precision: str
    save_state: bool
    log_with: str
    log_dir: Path
    save_raw: bool = False  # EMA runs: also the raw weights, as <file>-raw.safetensors
    keep_best: bool = False

    @property
    def sample_dir(self) -> Path:
        return self.dir / "sample"


@dataclass(frozen=True)
class RunSettings:
    """Every number and switch the loop needs, read from the recipe once.

    Attributes:
        unet_lr, text_encoder_lr: resolved (``learning_rate`` when unset).
        stop_text_encoder_step: optimizer step after which the text encoder stops training.
        v_prediction: the resolved prediction type.
    """

    family: str
    v_prediction: bool
    length: TrainingLength
    batch_size: int
    accumulation: int
    unet_lr: float
    text_encoder_lr: float
    stop_text_encoder_step: int | None
    max_grad_norm: float
    scale_weight_norms: float | None
    seed: int
    output: OutputSettings
    sample: SampleSettings
    ema: EmaSettings | None = None
    validation: ValidationSettings = ValidationSettings()
    variant: str | None = None  # sd3 / flux variant (metadata)


def resolve_v_prediction(recipe: Recipe, family_v_prediction: bool) -> bool:
    """``training.v_parameterization``, or the model family's prediction type when unset."""
    chosen = recipe.training.v_parameterization
    return family_v_prediction if chosen is None else chosen


def sample_settings(recipe: Recipe) -> SampleSettings:
    """The ``sample`` section with every prompt's defaults filled in.

    A prompt without a seed gets ``sample.seed``, else ``training.seed + index`` (reproducible).
    """
    s = recipe.sample
    width, height = recipe.dataset.resolution
    prompts = []
    for index, p in enumerate(s.prompts):
        base_seed = s.seed if s.seed is not None else recipe.training.seed + index
        prompts.append(
            SampleSpec(
                index=index,
                prompt=p.prompt,
                negative=p.negative if p.negative is not None else s.negative,
                width=p.width or s.width or width,
                height=p.height or s.height or height,
                seed=p.seed if p.seed is not None else base_seed,
                steps=p.steps or s.steps,
                cfg_scale=p.cfg_scale if p.cfg_scale is not None else s.cfg_scale,
            )
        )
    return SampleSettings(
        s.every_n_epochs, s.every_n_steps, s.sampler, tuple(prompts), at_first=s.at_first
    )


def output_settings(recipe: Recipe) -> OutputSettings:
    """The ``output`` and ``logging`` sections with default folders resolved."""
    o = recipe.output
    out_dir = Path(o.dir)
    log_dir = Path(recipe.logging.dir) if recipe.logging.dir else out_dir / "logs"
    return OutputSettings(
        dir=out_dir,
        name=o.name,
        save_every_n_epochs=o.save_every_n_epochs,
        save_every_n_steps=o.save_every_n_steps,
        save_last_n=o.save_last_n,
        save_precision=o.save_precision,
        save_state=o.save_state,
        log_with=recipe.logging.log_with,
        log_dir=log_dir,
        save_raw=recipe.training.ema is not None and recipe.training.ema.save_raw,
        keep_best=o.keep_best,
    )


def run_settings(
    recipe: Recipe,
    *,
    family: str,
    family_v_prediction: bool,
    length: TrainingLength,
    variant: str | None = None,
) -> RunSettings:
    """Read everything the loop needs from ``recipe``.

    Args:
        recipe: the validated recipe.
        family: the resolved model family.
        family_v_prediction: whether the family predicts v.
        length: from :func:`training_length`.
    """
    t = recipe.training
    return RunSettings(
        family=family,
        v_prediction=resolve_v_prediction(recipe, family_v_prediction),
        length=length,
        batch_size=t.batch_size,
        accumulation=t.gradient_accumulation_steps,
        unet_lr=t.unet_lr if t.unet_lr is not None else t.learning_rate,
        text_encoder_lr=t.text_encoder_lr if t.text_encoder_lr is not None else t.learning_rate,
        stop_text_encoder_step=t.stop_text_encoder_training,
        max_grad_norm=t.max_grad_norm,
        scale_weight_norms=t.scale_weight_norms,
        seed=t.seed,
        output=output_settings(recipe),
        sample=sample_settings(recipe),
        ema=EmaSettings.from_config(t.ema),
        validation=validation_settings(recipe),
        variant=variant,
    )
