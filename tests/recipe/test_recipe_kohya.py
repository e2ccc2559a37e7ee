"""Coming from kohya: sd-scripts option names in suggestions, and `init --from-kohya`."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from loraforge.cli import run
from loraforge.recipe import load_recipe, validate_recipe_file, validate_recipe_text
from loraforge.recipe.kohya import KOHYA_OPTIONS
from loraforge.recipe.schema import subschema

# The options of sd-scripts' LoRA training, as its argument parsers define them
# (library/train_util.py, train_network.py, library/custom_train_functions.py,
# library/sai_model_spec.py, library/deepspeed_utils.py, library/sdxl_train_util.py) and the keys
# of its --dataset_config TOML (library/config_util.py).
SD_SCRIPTS_OPTIONS = [
    "v2",
    "v_parameterization",
    "pretrained_model_name_or_path",
    "tokenizer_cache_dir",
    "optimizer_type",
    "use_8bit_adam",
    "use_lion_optimizer",
    "learning_rate",
    "max_grad_norm",
    "optimizer_args",
    "lr_scheduler_type",
    "lr_scheduler_args",
    "lr_scheduler",
    "lr_warmup_steps",
    "lr_decay_steps",
    "lr_scheduler_num_cycles",
    "lr_scheduler_power",
    "fused_backward_pass",
    "lr_scheduler_timescale",
    "lr_scheduler_min_lr_ratio",
    "output_dir",
    "output_name",
    "huggingface_repo_id",
    "huggingface_repo_type",
    "huggingface_path_in_repo",
    "huggingface_token",
    "huggingface_repo_visibility",
    "save_state_to_huggingface",
    "resume_from_huggingface",
    "async_upload",
    "save_precision",
    "save_every_n_epochs",
    "save_every_n_steps",
    "save_n_epoch_ratio",
    "save_last_n_epochs",
    "save_last_n_epochs_state",
    "save_last_n_steps",
    "save_last_n_steps_state",
    "save_state",
    "save_state_on_train_end",
    "resume",
    "train_batch_size",
    "max_token_length",
    "mem_eff_attn",
    "torch_compile",
    "dynamo_backend",
    "xformers",
    "sdpa",
    "vae",
    "max_train_steps",
    "max_train_epochs",
    "max_data_loader_n_workers",
    "persistent_data_loader_workers",
    "seed",
    "gradient_checkpointing",
    "gradient_accumulation_steps",
    "mixed_precision",
    "full_fp16",
    "full_bf16",
    "fp8_base",
    "ddp_timeout",
    "ddp_gradient_as_bucket_view",
    "ddp_static_graph",
    "clip_skip",
    "logging_dir",
    "log_with",
    "log_prefix",
    "log_tracker_name",
    "wandb_run_name",
    "log_tracker_config",
    "wandb_api_key",
    "log_config",
    "noise_offset",
    "noise_offset_random_strength",
    "multires_noise_iterations",
    "ip_noise_gamma",
    "ip_noise_gamma_random_strength",
    "multires_noise_discount",
    "adaptive_noise_scale",
    "zero_terminal_snr",
    "min_timestep",
    "max_timestep",
    "loss_type",
    "huber_schedule",
    "huber_c",
    "huber_scale",
    "lowram",
    "highvram",
    "sample_every_n_steps",
    "sample_at_first",
    "sample_every_n_epochs",
    "sample_prompts",
    "sample_sampler",
    "config_file",
    "output_config",
    "prior_loss_weight",
    "conditioning_data_dir",
    "masked_loss",
    "cache_text_encoder_outputs",
    "cache_text_encoder_outputs_to_disk",
    "text_encoder_batch_size",
    "disable_mmap_load_safetensors",
    "weighting_scheme",
    "logit_mean",
    "logit_std",
    "mode_scale",
    "blocks_to_swap",
    "train_data_dir",
    "cache_info",
    "shuffle_caption",
    "caption_separator",
    "caption_extension",
    "caption_extention",
    "keep_tokens",
    "keep_tokens_separator",
    "secondary_separator",
    "enable_wildcard",
    "caption_prefix",
    "caption_suffix",
    "color_aug",
    "flip_aug",
    "face_crop_aug_range",
    "random_crop",
    "debug_dataset",
    "resolution",
    "cache_latents",
    "vae_batch_size",
    "cache_latents_to_disk",
    "skip_cache_check",
    "enable_bucket",
    "min_bucket_reso",
    "max_bucket_reso",
    "bucket_reso_steps",
    "bucket_no_upscale",
    "resize_interpolation",
    "token_warmup_min",
    "token_warmup_step",
    "alpha_mask",
    "dataset_class",
    "caption_dropout_rate",
    "caption_dropout_every_n_epochs",
    "caption_tag_dropout_rate",
    "reg_data_dir",
    "in_json",
    "dataset_repeats",
    "save_model_as",
    "use_safetensors",
    "cpu_offload_checkpointing",
    "no_metadata",
    "unet_lr",
    "text_encoder_lr",
    "fp8_base_unet",
    "network_weights",
    "network_module",
    "network_dim",
    "network_alpha",
    "network_dropout",
    "network_args",
    "network_train_unet_only",
    "network_train_text_encoder_only",
    "training_comment",
    "dim_from_weights",
    "scale_weight_norms",
    "base_weights",
    "base_weights_multiplier",
    "no_half_vae",
    "skip_until_initial_step",
    "initial_epoch",
    "initial_step",
    "validation_seed",
    "validation_split",
    "validate_every_n_steps",
    "validate_every_n_epochs",
    "max_validation_steps",
    "min_snr_gamma",
    "scale_v_pred_loss_like_noise_pred",
    "v_pred_like_loss",
    "debiased_estimation_loss",
    "weighted_captions",
    "deepspeed",
    "zero_stage",
    "offload_optimizer_device",
    "offload_optimizer_nvme_path",
    "offload_param_device",
    "offload_param_nvme_path",
    "zero3_init_flag",
    "zero3_save_16bit_model",
    "fp16_master_weights_and_gradients",
    "metadata_title",
    "metadata_author",
    "metadata_description",
    "metadata_license",
    "metadata_tags",
    "metadata_usage_hint",
    "metadata_thumbnail",
    "metadata_merged_from",
    "metadata_trigger_phrase",
    "metadata_preprocessor",
    "metadata_is_negative_embedding",
    "ckpt",
    "dataset_config",
    "num_repeats",
    "image_dir",
    "is_reg",
    "class_tokens",
    "metadata_file",
    "custom_attributes",
    "batch_size",
    "network_multiplier",
]


def test_every_sd_scripts_option_is_mapped_to_a_real_recipe_field_or_marked_absent() -> None:
    assert not [name for name in SD_SCRIPTS_OPTIONS if name not in KOHYA_OPTIONS]
    for name, path in KOHYA_OPTIONS.items():
        if path is None:
            continue
        parts = tuple(p for p in path.replace("[]", ".0").split(".") if p)
        walk = tuple(int(p) if p.isdigit() else p for p in parts)
        assert subschema(walk) is not None, f"{name} -> {path} is not a recipe field"


@pytest.mark.parametrize(
    ("key", "where", "path"),
    [
        ("network_dim", "", "network.dim"),
        ("pretrained_model_name_or_path", "", "model.base"),
        ("train_data_dir", "", "dataset.subsets[].dir"),
        ("output_name", "", "output.name"),
        ("learning_rate", "", "training.learning_rate"),
        ("train_batch_size", "training", "training.batch_size"),
        ("num_repeats", "dataset", "dataset.subsets[].repeats"),
        ("validation_split", "", "dataset.validation_split"),
        ("validate_every_n_epochs", "", "training.validate_every_n_epochs"),
        ("max_validation_steps", "", "training.max_validation_steps"),
    ],
)
def test_sd_scripts_names_get_their_recipe_path_suggested(key: str, where: str, path: str) -> None:
    text = "model: {base: org/model}\ndataset: {subsets: [{dir: data}]}\n"
    if where:
        text = text.replace(f"{where}: {{", f"{where}: {{{key}: 1, ")
        if where not in text:
            text += f"{where}: {{{key}: 1}}\n"
    else:
        text += f"{key}: 1\n"
    problems = validate_recipe_text(text, source="r.yaml").problems
    [problem] = [p for p in problems if p.path.endswith(key)]
    assert problem.hint == f'did you mean "{path}"? (sd-scripts\' {key})'


def test_sd_scripts_option_without_equivalent_says_so() -> None:
    text = "model: {base: org/model}\ndataset: {subsets: [{dir: data}]}\nlowram: true\n"
    [problem] = validate_recipe_text(text, source="r.yaml").problems
    assert problem.hint == "sd-scripts' lowram has no loraforge equivalent"


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_init_from_kohya_converts_an_sd_scripts_config_and_its_dataset_toml(
    tmp_path: Path, capsys
) -> None:
    (tmp_path / "img" / "char").mkdir(parents=True)
    (tmp_path / "img" / "reg").mkdir(parents=True)
    _write(
        tmp_path,
        "dataset.toml",
        """\
        [general]
        shuffle_caption = true
        keep_tokens = 1

        [[datasets]]
        resolution = [768, 512]
        enable_bucket = true

          [[datasets.subsets]]
          image_dir = "img/char"
          class_tokens = "mychar woman"
          num_repeats = 10

          [[datasets.subsets]]
          image_dir = "img/reg"
          is_reg = true
          face_crop_aug_range = [2.0, 4.0]
        """,
    )
    _write(tmp_path, "prompts.txt", "mychar woman, smiling --n lowres --w 512 --h 768 --d 5\n")
    config = _write(
        tmp_path,
        "config.toml",
        """\
        [model_arguments]
        pretrained_model_name_or_path = "org/model"
        v2 = true
        v_parameterization = true

        [additional_network_arguments]
        network_module = "networks.lora"
        network_dim = 32
        network_alpha = 16
        network_args = ["conv_dim=8", "conv_alpha=4"]

        [optimizer_arguments]
        optimizer_type = "AdamW"
        learning_rate = 1e-4
        lr_scheduler = "cosine"
        optimizer_args = ["weight_decay=0.1"]

        [training_arguments]
        output_dir = "out"
        output_name = "mychar"
        max_train_epochs = 10
        train_batch_size = 2
        cache_latents = true
        cache_latents_to_disk = true
        sdpa = true
        lowram = true
        dataset_config = "dataset.toml"
        sample_sampler = "k_euler_a"
        sample_every_n_epochs = 1
        sample_prompts = "prompts.txt"
        """,
    )
    out = tmp_path / "recipe.yaml"
    assert run(["init", "--from-kohya", str(config), "-o", str(out)]) == 0
    report = " ".join(capsys.readouterr().out.split())
    assert "lowram" in report and "face_crop_aug_range" in report
    assert not validate_recipe_file(out).problems
    recipe = load_recipe(out)
    assert recipe.model.base == "org/model" and recipe.model.family == "sd2-v"
    assert recipe.dataset.resolution == (768, 512) and recipe.dataset.enable_bucket
    char, reg = recipe.dataset.subsets
    assert (char.dir, char.repeats, char.class_tokens) == (
        str(tmp_path / "img" / "char"),
        10,
        "mychar woman",
    )
    assert char.shuffle_caption and char.keep_tokens == 1 and reg.is_reg
    n = recipe.network
    assert (n.algorithm, n.dim, n.alpha, n.conv_dim, n.conv_alpha) == ("locon", 32, 16, 8, 4)
    t = recipe.training
    assert (t.optimizer, t.learning_rate, t.lr_scheduler, t.batch_size) == (
        "AdamW",
        1e-4,
        "cosine",
        2,
    )
    assert t.optimizer_args == {"weight_decay": 0.1} and t.attention == "sdpa"
    assert t.max_train_epochs == 10 and recipe.cache.latents == "disk"
    assert (recipe.output.dir, recipe.output.name) == (str(tmp_path / "out"), "mychar")
    assert recipe.sample.sampler == "euler_a" and recipe.sample.every_n_epochs == 1
    [prompt] = recipe.sample.prompts
    assert (prompt.prompt, prompt.negative, prompt.width, prompt.height, prompt.seed) == (
        "mychar woman, smiling",
        "lowres",
        512,
        768,
        5,
    )
    assert "lowram" in out.read_text()  # the recipe says what was left out, too


def test_init_from_kohya_reads_a_kohya_ss_gui_json(tmp_path: Path) -> None:
    gui = {
        "pretrained_model_name_or_path": "org/xl",
        "sdxl": True,
        "train_data_dir": "img",
        "reg_data_dir": "",
        "output_dir": "out",
        "output_name": "style",
        "max_resolution": "1024,1024",
        "learning_rate": "0.0001",
        "lr_scheduler": "cosine",
        "lr_warmup": "10",
        "epoch": "4",
        "max_train_steps": "0",
        "train_batch_size": 1,
        "LoRA_type": "LyCORIS/LoHa",
        "network_dim": 16,
        "network_alpha": "8",
        "optimizer": "Prodigy",
        "xformers": "xformers",
        "mixed_precision": "bf16",
        "seed": "",
        "num_cpu_threads_per_process": 2,
    }
    config = tmp_path / "gui.json"
    config.write_text(json.dumps(gui))
    out = tmp_path / "r.yaml"
    assert run(["init", "--from-kohya", str(config), "-o", str(out)]) == 0
    recipe = load_recipe(out)
    assert recipe.model.family == "sdxl" and recipe.dataset.resolution == (1024, 1024)
    assert recipe.dataset.subsets[0].dir == str(tmp_path / "img")
    assert (recipe.network.backend, recipe.network.algorithm) == ("lycoris", "loha")
    t = recipe.training
    assert (t.learning_rate, t.lr_warmup_steps, t.max_train_epochs) == (1e-4, 0.1, 4)
    assert t.max_train_steps is None and t.optimizer == "Prodigy" and t.attention == "xformers"
    assert "num_cpu_threads_per_process" in out.read_text()


def test_init_from_kohya_unreadable_config_is_a_user_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("this is = = not toml")
    assert run(["init", "--from-kohya", str(bad), "-o", str(tmp_path / "r.yaml")]) == 2


def test_sd_scripts_validation_options_are_converted(tmp_path: Path) -> None:
    from loraforge.recipe.kohya_convert import convert_kohya

    (tmp_path / "img").mkdir()
    _write(
        tmp_path,
        "dataset.toml",
        """\
        [[datasets]]
        resolution = 512
        validation_split = 0.1
        validation_seed = 5

          [[datasets.subsets]]
          image_dir = "img"
        """,
    )
    config = {"validate_every_n_steps": 50, "max_validation_steps": 4, "learning_rate": 1e-4}
    result = convert_kohya(config, tmp_path, tmp_path / "dataset.toml")
    recipe = result.recipe
    assert recipe["dataset"]["validation_split"] == 0.1
    assert recipe["dataset"]["validation_seed"] == 5
    assert recipe["training"]["validate_every_n_steps"] == 50
    assert recipe["training"]["max_validation_steps"] == 4
    assert not [u for u in result.unmapped if "valid" in u[0]]


def test_flux_network_args_convert_to_network_args(tmp_path: Path) -> None:
    from loraforge.recipe.kohya_convert import convert_kohya

    options = {
        "network_module": "networks.lora_flux",
        "network_dim": 16,
        "network_args": [
            "train_blocks=single",
            "train_single_block_indices=0-9,20",
            "in_dims=[4,0,0,0,4]",
            "img_attn_dim=8",
            "train_t5xxl=True",
        ],
    }
    network = convert_kohya(options, tmp_path).recipe["network"]
    assert network["algorithm"] == "lora"
    assert network["args"] == {
        "train_blocks": "single",
        "train_single_block_indices": "0-9,20",
        "in_dims": [4, 0, 0, 0, 4],
        "img_attn_dim": 8,
        "train_t5xxl": True,
    }
