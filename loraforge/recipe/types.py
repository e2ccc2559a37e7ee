"""The typed, frozen view of a validated recipe.

Field names mirror ``schema/recipe.schema.json``; defaults live only in the schema (the loader
fills them before these classes are built), so no field here has a default. A test checks that
every dataclass has exactly the properties of its schema object.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Family = Literal["auto", "sd1", "sd2", "sd2-v", "sdxl", "sd3", "flux"]


@dataclass(frozen=True)
class ModelConfig:
    base: str
    family: Family
    vae: str | None
    clip_l: str | None
    clip_g: str | None
    t5xxl: str | None
    clip_skip: int
    max_token_length: int
    t5xxl_max_token_length: int | None
    allow_pickle: bool


@dataclass(frozen=True)
class SubsetConfig:
    dir: str
    repeats: int | None
    class_tokens: str | None
    is_reg: bool
    is_validation: bool
    caption_extension: str
    shuffle_caption: bool
    keep_tokens: int
    keep_tokens_separator: str
    caption_separator: str
    secondary_separator: str | None
    enable_wildcard: bool
    caption_prefix: str | None
    caption_suffix: str | None
    caption_dropout_rate: float
    caption_dropout_every_n_epochs: int
    caption_tag_dropout_rate: float
    flip_aug: bool
    color_aug: bool
    random_crop: bool
    alpha_mask: bool
    conditioning_data_dir: str | None


@dataclass(frozen=True)
class DatasetConfig:
    resolution: tuple[int, int]
    enable_bucket: bool
    min_bucket_reso: int
    max_bucket_reso: int
    bucket_reso_steps: int
    bucket_no_upscale: bool
    num_workers: int
    validation_split: float
    validation_seed: int
    subsets: tuple[SubsetConfig, ...]


@dataclass(frozen=True)
class TaggingConfig:
    mode: Literal["tagger", "captioner"]
    model: str
    general_threshold: float
    character_threshold: float
    include_rating: bool
    undesired_tags: tuple[str, ...]
    replace_tags: dict[str, str]
    always_first_tags: tuple[str, ...]
    trigger_word: str | None
    character_tags_first: bool
    replace_underscores: bool
    sort_tags: Literal["confidence", "alphabetical"]
    existing_captions: Literal["keep", "append", "overwrite"]
    caption_extension: str
    batch_size: int
    max_length: int
    num_beams: int
    top_p: float | None
    seed: int
    device: Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class CacheConfig:
    latents: Literal["none", "memory", "disk"]
    text_encoder_outputs: Literal["none", "memory", "disk"]
    dir: str | None
    vae_batch_size: int


@dataclass(frozen=True)
class NetworkConfig:
    backend: Literal["kohya", "lycoris"]
    algorithm: str
    dim: int
    alpha: float | None
    conv_dim: int | None
    conv_alpha: float | None
    dropout: float | None
    rank_dropout: float | None
    module_dropout: float | None
    args: dict[str, Any]
    block_dims: tuple[int, ...] | None
    block_alphas: tuple[float, ...] | None
    conv_block_dims: tuple[int, ...] | None
    conv_block_alphas: tuple[float, ...] | None
    down_lr_weight: tuple[float, ...] | None
    mid_lr_weight: float | None
    up_lr_weight: tuple[float, ...] | None
    loraplus_lr_ratio: float | None
    train_unet: bool
    train_text_encoder: bool
    weights: str | None
    multiplier: float


@dataclass(frozen=True)
class EmaConfig:
    decay: float
    warmup: bool
    start_step: int
    every_n_steps: int
    device: Literal["same", "cpu"]
    save_raw: bool


@dataclass(frozen=True)
class EarlyStoppingConfig:
    patience: int
    min_delta: float


@dataclass(frozen=True)
class TrainingConfig:
    max_train_epochs: int | None
    max_train_steps: int | None
    batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    unet_lr: float | None
    text_encoder_lr: float | None
    stop_text_encoder_training: int | None
    optimizer: str
    optimizer_args: dict[str, Any]
    lr_scheduler: str
    lr_warmup_steps: float
    lr_scheduler_num_cycles: int
    lr_scheduler_power: float
    mixed_precision: Literal["no", "fp16", "bf16"]
    full_fp16: bool
    full_bf16: bool
    fp8_base: bool
    blocks_to_swap: int
    gradient_checkpointing: bool
    cpu_offload_checkpointing: bool
    attention: Literal["sdpa", "xformers", "eager"]
    noise_offset: float
    noise_offset_random_strength: bool
    adaptive_noise_scale: float | None
    multires_noise_iterations: int
    multires_noise_discount: float
    ip_noise_gamma: float
    ip_noise_gamma_random_strength: bool
    min_timestep: int
    max_timestep: int
    timestep_sampling: str | None
    discrete_flow_shift: float | None
    sigmoid_scale: float
    model_prediction_type: str | None
    weighting_scheme: str
    logit_mean: float
    logit_std: float
    mode_scale: float
    guidance_scale: float
    min_snr_gamma: float | None
    v_parameterization: bool | None
    zero_terminal_snr: bool
    scale_v_pred_loss_like_noise_pred: bool
    v_pred_like_loss: float | None
    debiased_estimation_loss: bool
    loss_type: Literal["l2", "l1", "huber", "smooth_l1"]
    huber_schedule: Literal["constant", "exponential", "snr"]
    huber_c: float
    huber_scale: float
    prior_loss_weight: float
    max_grad_norm: float
    scale_weight_norms: float | None
    masked_loss: bool
    ema: EmaConfig | None
    validate_every_n_steps: int | None
    validate_every_n_epochs: int | None
    max_validation_steps: int | None
    early_stopping: EarlyStoppingConfig | None
    seed: int


@dataclass(frozen=True)
class MetadataConfig:
    title: str | None
    author: str | None
    description: str | None
    trigger_phrase: str | None
    license: str | None
    tags: tuple[str, ...]


@dataclass(frozen=True)
class OutputConfig:
    dir: str
    name: str
    save_every_n_epochs: int | None
    save_every_n_steps: int | None
    save_last_n: int | None
    save_precision: Literal["fp16", "bf16", "fp32"]
    save_state: bool
    keep_best: bool
    metadata: MetadataConfig


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative: str | None
    width: int | None
    height: int | None
    seed: int | None
    steps: int | None
    cfg_scale: float | None


@dataclass(frozen=True)
class SampleConfig:
    every_n_epochs: int | None
    every_n_steps: int | None
    sampler: str
    width: int | None
    height: int | None
    steps: int
    cfg_scale: float
    negative: str
    seed: int | None
    prompts: tuple[SamplePrompt, ...]
    at_first: bool


@dataclass(frozen=True)
class LoggingConfig:
    log_with: Literal["none", "tensorboard"]
    dir: str | None


@dataclass(frozen=True)
class Recipe:
    model: ModelConfig
    dataset: DatasetConfig
    tagging: TaggingConfig
    cache: CacheConfig
    network: NetworkConfig
    training: TrainingConfig
    output: OutputConfig
    sample: SampleConfig
    logging: LoggingConfig
    source: str | None
    base_dir: str | None  # the folder relative paths were resolved against

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe as plain JSON-serialisable data (tuples become lists)."""
        data = asdict(self)
        del data["source"], data["base_dir"]
        return data


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "dataset": DatasetConfig,
    "tagging": TaggingConfig,
    "cache": CacheConfig,
    "network": NetworkConfig,
    "training": TrainingConfig,
    "output": OutputConfig,
    "sample": SampleConfig,
    "logging": LoggingConfig,
}
