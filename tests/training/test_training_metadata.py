"""sd-scripts ss_* metadata, modelspec.* and the embedded recipe."""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path

import pytest

from loraforge.recipe import parse_recipe_text
from loraforge.training.lora_metadata import (
    RunFacts,
    SubsetFacts,
    build_metadata,
    new_session_id,
)
from loraforge.training.model_hashes import ModelHashes, model_file_hashes

SAVED_AT = 1_700_000_000.5

RECIPE = """
model: {base: /models/base.safetensors, clip_skip: 2}
dataset:
  resolution: [512, 768]
  subsets:
    - {dir: data/10_cat, flip_aug: true, keep_tokens: 1, caption_dropout_rate: 0.05}
    - {dir: more/10_cat, keep_tokens: 2}
    - {dir: reg/1_cat, is_reg: true}
network: {dim: 16, alpha: 8}
training:
  learning_rate: 1.0e-4
  text_encoder_lr: 5.0e-5
  lr_scheduler: constant_with_warmup
  lr_warmup_steps: 100
  batch_size: 2
  gradient_accumulation_steps: 3
  min_snr_gamma: 5
output:
  name: mylora
  metadata: {author: me, tags: [cat, pet], trigger_phrase: mycat}
"""


def recipe_from(text: str = RECIPE):
    return parse_recipe_text(text, base_dir=Path("/proj"))


def facts_for(recipe, family="sd1", v_prediction=False, **overrides) -> RunFacts:
    s = recipe.dataset.subsets
    values = dict(
        session_id=1234,
        training_started_at=1_699_999_000.25,
        family=family,
        v_prediction=v_prediction,
        network_module="networks.lora",
        optimizer="torch.optim.adamw.AdamW(weight_decay=0.01)",
        subsets=(
            SubsetFacts(s[0], 10, 4, "cat"),
            SubsetFacts(s[1], 10, 2, "cat"),
            SubsetFacts(s[2], 1, 20, "cat"),
        ),
        num_batches_per_epoch=40,
        num_epochs=10,
        max_train_steps=134,
        network_args={"conv_dim": 4, "conv_alpha": 1.0},
        num_processes=2,
        tag_frequency={"10_cat": {"cat": 4, "sitting": 2}},
        bucket_info={
            "buckets": {"0": {"resolution": [512, 768], "count": 60}},
            "mean_img_ar_error": 0.0,
        },
    )
    values.update(overrides)
    return RunFacts(**values)


def build(recipe=None, facts=None, **kwargs):
    recipe = recipe or recipe_from()
    return build_metadata(
        recipe, facts or facts_for(recipe, **kwargs), steps=120, epoch=9, saved_at=SAVED_AT
    )


def test_every_value_is_a_string_and_the_core_keys_are_there():
    metadata = build()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    required = [
        "ss_session_id",
        "ss_training_started_at",
        "ss_output_name",
        "ss_learning_rate",
        "ss_text_encoder_lr",
        "ss_unet_lr",
        "ss_num_train_images",
        "ss_num_reg_images",
        "ss_num_batches_per_epoch",
        "ss_num_epochs",
        "ss_epoch",
        "ss_steps",
        "ss_batch_size_per_device",
        "ss_total_batch_size",
        "ss_gradient_accumulation_steps",
        "ss_max_train_steps",
        "ss_lr_warmup_steps",
        "ss_lr_scheduler",
        "ss_network_module",
        "ss_network_dim",
        "ss_network_alpha",
        "ss_network_args",
        "ss_mixed_precision",
        "ss_full_fp16",
        "ss_v2",
        "ss_base_model_version",
        "ss_clip_skip",
        "ss_resolution",
        "ss_optimizer",
        "ss_noise_offset",
        "ss_min_snr_gamma",
        "ss_seed",
        "ss_tag_frequency",
        "ss_dataset_dirs",
        "ss_caption_dropout_rate",
        "ss_max_token_length",
        "ss_training_comment",
        "ss_training_finished_at",
        "modelspec.sai_model_spec",
        "modelspec.architecture",
        "modelspec.implementation",
        "modelspec.title",
        "modelspec.resolution",
        "modelspec.date",
        "loraforge_recipe",
    ]
    assert [key for key in required if key not in metadata] == []
    assert not any(key.startswith("sshs_") for key in metadata)  # the file writer adds hashes


def test_value_encodings_follow_sd_scripts():
    m = build()
    assert m["ss_session_id"] == "1234"
    assert m["ss_training_started_at"] == "1699999000.25"
    assert m["ss_training_finished_at"] == str(SAVED_AT)
    assert m["ss_output_name"] == "mylora"
    assert m["ss_learning_rate"] == "0.0001"
    assert m["ss_text_encoder_lr"] == "5e-05"
    assert m["ss_unet_lr"] == "None"
    assert m["ss_steps"] == "120" and m["ss_epoch"] == "9"
    assert m["ss_lr_warmup_steps"] == "100"
    assert m["ss_network_dim"] == "16" and m["ss_network_alpha"] == "8.0"
    assert json.loads(m["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "1.0"}
    assert m["ss_v2"] == "False" and m["ss_base_model_version"] == "sd_v1"
    assert m["ss_clip_skip"] == "2"
    assert m["ss_resolution"] == "(512, 768)"
    assert m["ss_min_snr_gamma"] == "5.0"
    assert m["ss_optimizer"] == "torch.optim.adamw.AdamW(weight_decay=0.01)"
    assert m["ss_sd_model_name"] == "/models/base.safetensors"  # not a local file: as given
    assert m["ss_mixed_precision"] == "fp16" and m["ss_full_fp16"] == "False"


def test_dataset_counts_and_dirs():
    m = build()
    # images x repeats: train 4*10 + 2*10, reg 20*1
    assert m["ss_num_train_images"] == "60" and m["ss_num_reg_images"] == "20"
    assert m["ss_batch_size_per_device"] == "2"
    assert m["ss_total_batch_size"] == str(2 * 2 * 3)
    assert json.loads(m["ss_dataset_dirs"]) == {
        "10_cat": {"n_repeats": 10, "img_count": 4},
        "10_cat (2)": {"n_repeats": 10, "img_count": 2},
    }
    assert json.loads(m["ss_reg_dataset_dirs"]) == {"1_cat": {"n_repeats": 1, "img_count": 20}}
    assert json.loads(m["ss_tag_frequency"]) == {"10_cat": {"cat": 4, "sitting": 2}}
    assert json.loads(m["ss_bucket_info"])["buckets"]["0"]["count"] == 60
    assert m["ss_flip_aug"] == "True" and m["ss_color_aug"] == "False"
    assert m["ss_keep_tokens"] == "2" and m["ss_caption_dropout_rate"] == "0.05"
    (dataset,) = json.loads(m["ss_datasets"])
    assert [s["image_dir"] for s in dataset["subsets"]] == ["10_cat", "10_cat", "1_cat"]
    assert [s["keep_tokens"] for s in dataset["subsets"]] == [1, 2, 0]
    assert dataset["subsets"][2]["is_reg"] is True and dataset["resolution"] == [512, 768]


def test_a_huge_tag_frequency_is_cut_to_each_folders_most_frequent_tags():
    """Tens of thousands of distinct tags (a tagger's long tail): the header stays well under the
    1 MiB ComfyUI's metadata view reads, and the most frequent tags keep their exact counts."""
    tags = {f"tag_{i:06d}_{'x' * 12}": 1 + (i * 7919) % 5000 for i in range(30000)}
    frequency = {"10_cat": tags, "5_dog": {**tags, "dog": 99999}}
    assert len(json.dumps(frequency)) > 1_500_000
    m = build(facts=facts_for(recipe_from(), tag_frequency=frequency))
    assert len(json.dumps(m).encode()) < 512 * 1024
    kept = json.loads(m["ss_tag_frequency"])
    assert set(kept) == {"10_cat", "5_dog"} and 100 < len(kept["10_cat"]) == len(kept["5_dog"])
    assert kept["5_dog"]["dog"] == 99999
    for folder, counts in kept.items():  # the most frequent, with their exact counts
        cutoff = min(counts.values())
        assert all(frequency[folder][t] == n for t, n in counts.items())
        assert all(n <= cutoff for t, n in frequency[folder].items() if t not in counts)
    (dataset,) = json.loads(m["ss_datasets"])
    assert dataset["tag_frequency"] == kept
    assert "most frequent tags" in m["loraforge_tag_frequency"]
    assert "loraforge_tag_frequency" not in build()  # nothing cut: no note


def test_network_args_hold_only_strings():
    m = build(facts=facts_for(recipe_from(), network_args={"algo": "lora", "dropout": None}))
    assert json.loads(m["ss_network_args"]) == {"algo": "lora"}


def test_modelspec_for_sd1():
    m = build()
    assert m["modelspec.sai_model_spec"] == "1.0.1"
    assert m["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert m["modelspec.implementation"] == "diffusers"
    assert m["modelspec.title"] == "mylora"
    assert m["modelspec.author"] == "me"
    assert m["modelspec.tags"] == "cat, pet"
    assert m["modelspec.trigger_phrase"] == "mycat"
    assert m["modelspec.resolution"] == "512x768"
    assert m["modelspec.prediction_type"] == "epsilon"
    assert m["modelspec.encoder_layer"] == "2"
    assert m["modelspec.date"] == datetime.datetime.fromtimestamp(1_700_000_000).isoformat()
    assert m["modelspec.implementation_version"].startswith("loraforge/")
    assert "modelspec.timestep_range" not in m and "modelspec.license" not in m


@pytest.mark.parametrize(
    ("family", "v_pred", "architecture", "version", "v2"),
    [
        ("sd2", False, "stable-diffusion-v2-512/lora", "sd_v2", "True"),
        ("sd2-v", True, "stable-diffusion-v2-768-v/lora", "sd_v2_v", "True"),
        ("sdxl", False, "stable-diffusion-xl-v1-base/lora", "sdxl_base_v1-0", "False"),
    ],
)
def test_families(family, v_pred, architecture, version, v2):
    m = build(family=family, v_prediction=v_pred)
    assert m["modelspec.architecture"] == architecture
    assert m["ss_base_model_version"] == version and m["ss_v2"] == v2
    assert m["modelspec.prediction_type"] == ("v" if v_pred else "epsilon")
    expected_impl = (
        "https://github.com/Stability-AI/generative-models" if family == "sdxl" else "diffusers"
    )
    assert m["modelspec.implementation"] == expected_impl


def test_sdxl_with_default_clip_skip_writes_none():
    recipe = recipe_from(RECIPE.replace(", clip_skip: 2", ""))
    m = build(recipe, facts_for(recipe, family="sdxl"))
    assert m["ss_clip_skip"] == "None" and "modelspec.encoder_layer" not in m


def test_timestep_range_only_when_narrowed():
    recipe = recipe_from(
        RECIPE.replace("  min_snr_gamma: 5", "  min_timestep: 100\n  max_timestep: 900")
    )
    assert build(recipe)["modelspec.timestep_range"] == "100,900"


def test_embedded_recipe_is_the_resolved_recipe_without_the_users_folders():
    recipe = recipe_from(
        RECIPE.replace(
            "model: {base: /models/base.safetensors", "model: {base: /home/ann/sd15.ckpt"
        ).replace("  name: mylora", "  name: mylora\n  dir: ../runs/out")
        + "cache: {dir: cache}\n"
    )
    text = build(recipe)["loraforge_recipe"]
    # Everything but the paths is the resolved recipe; inside the recipe folder (/proj) paths
    # become relative, elsewhere only their last part is kept.
    expected = json.loads(json.dumps(recipe.to_dict()))
    expected["model"]["base"] = "sd15.ckpt"
    expected["output"]["dir"] = "out"
    expected["cache"]["dir"] = "cache"
    dirs = ["data/10_cat", "more/10_cat", "reg/1_cat"]
    for subset, folder in zip(expected["dataset"]["subsets"], dirs, strict=True):
        subset["dir"] = folder
    assert json.loads(text) == expected
    assert "/proj" not in text and "/home/ann" not in text and "/runs" not in text


def test_embedded_recipe_keeps_hub_ids_and_relative_subset_dirs():
    recipe = recipe_from(RECIPE.replace("/models/base.safetensors", "org/model"))
    embedded = json.loads(build(recipe)["loraforge_recipe"])
    assert embedded["model"]["base"] == "org/model"
    assert [s["dir"] for s in embedded["dataset"]["subsets"]] == [
        "data/10_cat", "more/10_cat", "reg/1_cat",
    ]  # fmt: skip
    assert embedded["network"] == json.loads(json.dumps(recipe.to_dict()))["network"]


def test_empty_network_args_are_omitted_and_hashes_written_when_known():
    recipe = recipe_from(
        RECIPE.replace(
            "model: {base: /models/base.safetensors",
            "model: {base: /m/b.safetensors, vae: /m/vae.pt",
        )
    )
    facts = facts_for(
        recipe,
        network_args={},
        base_model_hashes=ModelHashes("abcd1234", "f" * 64),
        vae_hashes=ModelHashes("00aa11bb", "e" * 64),
    )
    m = build(recipe, facts)
    assert "ss_network_args" not in m
    assert m["ss_sd_model_hash"] == "abcd1234" and m["ss_new_sd_model_hash"] == "f" * 64
    assert m["ss_vae_name"] == "/m/vae.pt" and m["ss_vae_hash"] == "00aa11bb"


def test_model_file_hashes_like_a1111(tmp_path):
    data = bytes(range(256)) * (0x120000 // 256)
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    hashes = model_file_hashes(path)
    assert hashes == ModelHashes(
        legacy=hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8],
        sha256=hashlib.sha256(data).hexdigest(),
    )
    assert model_file_hashes(tmp_path) is None
    assert model_file_hashes(tmp_path / "missing") is None


def test_local_model_name_is_its_basename(tmp_path):
    model = tmp_path / "my_model.safetensors"
    model.write_bytes(b"x")
    recipe = recipe_from(RECIPE.replace("/models/base.safetensors", str(model)))
    assert build(recipe)["ss_sd_model_name"] == "my_model.safetensors"


def test_session_ids_do_not_touch_the_seeded_rngs():
    import random

    random.seed(5)
    expected = random.random()
    random.seed(5)
    ids = {new_session_id() for _ in range(5)}
    assert random.random() == expected
    assert all(0 <= i <= 2**32 for i in ids) and len(ids) > 1
