"""Cross-field rules: impossible combinations are errors, unusual ones warnings."""

from __future__ import annotations

import pytest

from loraforge.recipe import validate_recipe_text

BASE = "model: {{base: org/model, family: {family}}}\ndataset: {{subsets: [{{dir: d{subset}}}]{dataset}}}\n"


def findings(extra: str = "", *, family: str = "sd1", subset: str = "", dataset: str = ""):
    text = BASE.format(family=family, subset=subset, dataset=dataset) + extra
    return {(p.severity, p.path) for p in validate_recipe_text(text).problems}


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"subset": ", color_aug: true"}, ("error", "dataset.subsets[0].color_aug")),
        ({"subset": ", random_crop: true"}, ("error", "dataset.subsets[0].random_crop")),
        (
            {
                "extra": "cache: {text_encoder_outputs: disk}\nnetwork: {train_text_encoder: false}\n",
                "subset": ", shuffle_caption: true",
            },
            ("error", "dataset.subsets[0].shuffle_caption"),
        ),
        (
            {"extra": "cache: {text_encoder_outputs: disk}\n"},
            ("error", "cache.text_encoder_outputs"),
        ),
        ({"extra": "model: {base: a/b, family: sdxl, clip_skip: 2}\n"}, None),
        (
            {"extra": "training: {optimizer: Prodigy, learning_rate: 1e-4}\n"},
            ("warning", "training.learning_rate"),
        ),
        ({"extra": "training: {learning_rate: 1.0}\n"}, ("warning", "training.learning_rate")),
        ({"extra": "network: {backend: kohya, algorithm: loha}\n"}, ("error", "network.algorithm")),
        ({"extra": "network: {algorithm: locon}\n"}, ("error", "network.conv_dim")),
        (
            {"extra": "network: {backend: lycoris, algorithm: loha, args: {factor: 4}}\n"},
            ("error", "network.args.factor"),
        ),
        (
            {"extra": "network: {train_unet: false, train_text_encoder: false}\n"},
            ("error", "network.train_unet"),
        ),
        (
            {"extra": "training: {mixed_precision: bf16, full_fp16: true}\n"},
            ("error", "training.full_fp16"),
        ),
        (
            {"extra": "training: {mixed_precision: no, fp8_base: true}\n"},
            ("error", "training.fp8_base"),
        ),
        (
            {"extra": "training: {min_timestep: 500, max_timestep: 400}\n"},
            ("error", "training.min_timestep"),
        ),
        ({"extra": "training: {max_train_epochs: null}\n"}, ("error", "training.max_train_epochs")),
        (
            {"family": "sd2-v", "extra": "training: {v_parameterization: false}\n"},
            ("error", "training.v_parameterization"),
        ),
        ({"extra": "training: {lr_warmup_steps: 100}\n"}, ("error", "training.lr_warmup_steps")),
        (
            {"extra": "training: {optimizer: Prodigy, learning_rate: 1.0, text_encoder_lr: 0.5}\n"},
            ("error", "training.text_encoder_lr"),
        ),
        (
            {
                "extra": "training: {optimizer: DAdaptAdam, learning_rate: 1.0}\nnetwork: {loraplus_lr_ratio: 16}\n"
            },
            ("error", "network.loraplus_lr_ratio"),
        ),
        ({"subset": ", is_reg: true"}, ("error", "dataset.subsets")),
        ({"dataset": ", resolution: 2048"}, ("error", "dataset.max_bucket_reso")),
        ({"dataset": ", min_bucket_reso: 100"}, ("error", "dataset.min_bucket_reso")),
        ({"family": "sdxl", "dataset": ", resolution: 512"}, ("warning", "dataset.resolution")),
        ({"extra": "network: {block_dims: [4, 4]}\n"}, ("error", "network.block_dims")),
        # validation options without a held-out image
        (
            {"extra": "training: {validate_every_n_steps: 10}\n"},
            ("error", "training.validate_every_n_steps"),
        ),
        (
            {"extra": "training: {early_stopping: {patience: 3}}\n"},
            ("error", "training.early_stopping"),
        ),
        ({"extra": "output: {keep_best: true}\n"}, ("error", "output.keep_best")),
        (
            {"subset": ", is_validation: true, is_reg: true"},
            ("error", "dataset.subsets[0].is_validation"),
        ),
        ({"subset": ", is_validation: true"}, ("error", "dataset.subsets")),
    ],
)
def test_rule(kwargs: dict, expected: tuple[str, str] | None) -> None:
    found = findings(**kwargs)
    if expected is None:  # a duplicated `model` key: reported as a duplicate, not crashed on
        assert any(path == "model" for _, path in found)
    else:
        assert expected in found, found


def test_sdxl_clip_skip_is_a_warning() -> None:
    text = "model: {base: a/b, family: sdxl, clip_skip: 2}\ndataset: {resolution: 1024, subsets: [{dir: d}]}\n"
    problems = validate_recipe_text(text).problems
    assert [(p.severity, p.path) for p in problems] == [("warning", "model.clip_skip")]


def test_clean_recipe_has_no_findings() -> None:
    assert findings() == set()


def test_prodigy_with_one_learning_rate_is_fine() -> None:
    assert findings("training: {optimizer: Prodigy, learning_rate: 1.0}\n") == set()


def test_validation_options_with_held_out_images_are_fine() -> None:
    extra = (
        "training: {validate_every_n_steps: 10, max_validation_steps: 2, "
        "early_stopping: {patience: 3, min_delta: 0.001}}\noutput: {keep_best: true}\n"
    )
    assert findings(extra, dataset=", validation_split: 0.1") == set()
    two = (
        "model: {base: org/model}\ndataset: {subsets: [{dir: a}, {dir: v, is_validation: true}]}\n"
    )
    assert validate_recipe_text(two + extra).problems == ()


def test_validation_subsets_do_not_conflict_with_caches() -> None:
    text = (
        "model: {base: org/model}\ncache: {latents: disk, text_encoder_outputs: disk}\n"
        "network: {train_text_encoder: false}\n"
        "dataset: {subsets: [{dir: a}, {dir: v, is_validation: true, shuffle_caption: true, "
        "random_crop: true}]}\n"
    )
    problems = validate_recipe_text(text).problems
    # the augmentation is pointless there (a warning), not a cache conflict (an error)
    assert [(p.severity, p.path) for p in problems] == [
        ("warning", "dataset.subsets[1].is_validation")
    ]


@pytest.mark.parametrize(
    ("family", "network", "expected"),
    [
        ("flux", "{backend: lycoris, algorithm: loha}", ("error", "network.backend")),
        ("sd3", "{block_dims: [4, 4]}", ("error", "network.block_dims")),
        ("flux", "{args: {emb_dims: [1, 1, 1, 1, 1, 1]}}", ("error", "network.args.emb_dims")),
        ("sd3", "{args: {single_dim: 4}}", ("error", "network.args.single_dim")),
        ("sd1", "{args: {train_blocks: single}}", ("error", "network.args.train_blocks")),
    ],
)
def test_flow_network_options_where_they_cannot_apply(family, network, expected) -> None:
    assert expected in findings(f"network: {network}\n", family=family)


def test_flow_network_options_of_the_family_are_fine() -> None:
    flux = "network: {args: {train_blocks: double, train_double_block_indices: '0-3', img_attn_dim: 8}}\n"
    assert not {f for f in findings(flux, family="flux") if f[0] == "error"}
    sd3 = "network: {args: {train_block_indices: [0, 1], emb_dims: [0, 0, 4, 0, 0, 0]}}\n"
    assert not {f for f in findings(sd3, family="sd3") if f[0] == "error"}
