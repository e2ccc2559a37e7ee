"""kohya LoRA names, checked against tables written from kohya-ss/sd-scripts' naming.

The SD1 names are sd-scripts' ``lora_unet_`` + module path of its diffusers-layout UNet; the SDXL
names follow ``make_unet_conversion_map`` in sd-scripts' library/sdxl_model_util.py (the SGM
layout its SDXL UNet uses); text encoders use the old transformers spelling ``text_model.…``.
"""

from __future__ import annotations

import pytest

from loraforge.models.naming import (
    block_index,
    lora_targets,
    module_path_for_lora_name,
    num_blocks,
    text_encoder_lora_name,
    unet_lora_name,
)
from loraforge.models.sgm import SD_LAYOUT, SDXL_LAYOUT, diffusers_unet_path, sgm_unet_path

SD1_UNET_TABLE = [
    (
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    ),
    (
        "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_out.0",
        "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_out_0",
    ),
    (
        "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj",
    ),
    ("mid_block.attentions.0.proj_in", "lora_unet_mid_block_attentions_0_proj_in"),
    ("up_blocks.1.attentions.0.proj_out", "lora_unet_up_blocks_1_attentions_0_proj_out"),
    ("down_blocks.1.resnets.0.conv1", "lora_unet_down_blocks_1_resnets_0_conv1"),
    ("down_blocks.1.resnets.0.conv_shortcut", "lora_unet_down_blocks_1_resnets_0_conv_shortcut"),
    ("up_blocks.2.resnets.2.time_emb_proj", "lora_unet_up_blocks_2_resnets_2_time_emb_proj"),
    ("down_blocks.2.downsamplers.0.conv", "lora_unet_down_blocks_2_downsamplers_0_conv"),
    ("up_blocks.0.upsamplers.0.conv", "lora_unet_up_blocks_0_upsamplers_0_conv"),
]

SDXL_UNET_TABLE = [
    (
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    ),
    (
        "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2",
        "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2",
    ),
    ("down_blocks.1.attentions.1.proj_in", "lora_unet_input_blocks_5_1_proj_in"),
    (
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
        "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k",
    ),
    ("up_blocks.0.attentions.0.proj_out", "lora_unet_output_blocks_0_1_proj_out"),
    (
        "up_blocks.1.attentions.2.transformer_blocks.1.attn2.to_out.0",
        "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_out_0",
    ),
    (
        "up_blocks.0.attentions.1.transformer_blocks.3.ff.net.0.proj",
        "lora_unet_output_blocks_1_1_transformer_blocks_3_ff_net_0_proj",
    ),
    ("down_blocks.0.resnets.0.conv1", "lora_unet_input_blocks_1_0_in_layers_2"),
    ("down_blocks.0.resnets.1.time_emb_proj", "lora_unet_input_blocks_2_0_emb_layers_1"),
    ("down_blocks.1.resnets.0.conv_shortcut", "lora_unet_input_blocks_4_0_skip_connection"),
    ("down_blocks.2.resnets.1.conv2", "lora_unet_input_blocks_8_0_out_layers_3"),
    ("mid_block.resnets.0.conv1", "lora_unet_middle_block_0_in_layers_2"),
    ("mid_block.resnets.1.conv2", "lora_unet_middle_block_2_out_layers_3"),
    ("up_blocks.0.resnets.0.conv_shortcut", "lora_unet_output_blocks_0_0_skip_connection"),
    ("up_blocks.2.resnets.2.conv2", "lora_unet_output_blocks_8_0_out_layers_3"),
    ("down_blocks.0.downsamplers.0.conv", "lora_unet_input_blocks_3_0_op"),
    ("down_blocks.1.downsamplers.0.conv", "lora_unet_input_blocks_6_0_op"),
    ("up_blocks.0.upsamplers.0.conv", "lora_unet_output_blocks_2_2_conv"),
    ("up_blocks.1.upsamplers.0.conv", "lora_unet_output_blocks_5_2_conv"),
    ("time_embedding.linear_1", "lora_unet_time_embed_0"),
    ("add_embedding.linear_2", "lora_unet_label_emb_0_2"),
    ("conv_in", "lora_unet_input_blocks_0_0"),
    ("conv_out", "lora_unet_out_2"),
]


@pytest.mark.parametrize(("path", "expected"), SD1_UNET_TABLE)
@pytest.mark.parametrize("family", ["sd1", "sd2", "sd2-v"])
def test_sd_unet_names_are_diffusers_paths(family: str, path: str, expected: str) -> None:
    assert unet_lora_name(family, path) == expected


@pytest.mark.parametrize(("path", "expected"), SDXL_UNET_TABLE)
def test_sdxl_unet_names_are_sgm_paths(path: str, expected: str) -> None:
    assert unet_lora_name("sdxl", path) == expected


TE = "lora_te_text_model_encoder_layers_"
TE1 = "lora_te1_text_model_encoder_layers_"
TE2 = "lora_te2_text_model_encoder_layers_"


@pytest.mark.parametrize(
    ("family", "index", "path", "expected"),
    [
        # transformers >= 5 CLIPTextModel (flattened) and the old/wrapped spelling give one name
        ("sd1", 0, "encoder.layers.0.self_attn.q_proj", TE + "0_self_attn_q_proj"),
        ("sd1", 0, "text_model.encoder.layers.0.self_attn.q_proj", TE + "0_self_attn_q_proj"),
        ("sd2", 0, "encoder.layers.22.mlp.fc1", TE + "22_mlp_fc1"),
        ("sdxl", 0, "encoder.layers.11.self_attn.out_proj", TE1 + "11_self_attn_out_proj"),
        ("sdxl", 1, "text_model.encoder.layers.31.mlp.fc2", TE2 + "31_mlp_fc2"),
        ("sdxl", 1, "encoder.layers.3.self_attn.v_proj", TE2 + "3_self_attn_v_proj"),
    ],
)
def test_text_encoder_names(family: str, index: int, path: str, expected: str) -> None:
    assert text_encoder_lora_name(family, index, path) == expected


def test_text_encoder_index_out_of_range_is_an_error() -> None:
    with pytest.raises(ValueError, match="text encoder"):
        text_encoder_lora_name("sd1", 1, "encoder.layers.0.mlp.fc1")


@pytest.mark.parametrize(
    ("family", "name", "expected"),
    [
        ("sd1", "lora_unet_down_blocks_0_attentions_0_proj_in", 1),
        ("sd1", "lora_unet_down_blocks_0_resnets_1_conv1", 2),
        ("sd1", "lora_unet_down_blocks_0_downsamplers_0_conv", 3),
        ("sd1", "lora_unet_down_blocks_3_resnets_1_conv2", 11),
        ("sd1", "lora_unet_mid_block_attentions_0_proj_out", 12),
        ("sd1", "lora_unet_up_blocks_0_resnets_0_conv1", 13),
        ("sd1", "lora_unet_up_blocks_0_upsamplers_0_conv", 15),
        ("sd1", "lora_unet_up_blocks_3_attentions_2_proj_out", 24),
        ("sd1", "lora_te_text_model_encoder_layers_0_mlp_fc1", None),
        ("sd1", "lora_unet_conv_in", None),
        ("sdxl", "lora_unet_time_embed_0", 0),
        ("sdxl", "lora_unet_label_emb_0_2", 0),
        ("sdxl", "lora_unet_input_blocks_4_1_proj_in", 5),
        ("sdxl", "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2", 9),
        ("sdxl", "lora_unet_middle_block_1_proj_in", 11),
        ("sdxl", "lora_unet_output_blocks_0_1_proj_out", 13),
        ("sdxl", "lora_unet_output_blocks_8_0_out_layers_3", 21),
        ("sdxl", "lora_unet_out_2", 22),
        ("sdxl", "lora_te1_text_model_encoder_layers_0_mlp_fc1", None),
    ],
)
def test_block_index_matches_sd_scripts(family: str, name: str, expected: int | None) -> None:
    assert block_index(family, name) == expected


def test_block_counts() -> None:
    assert num_blocks("sd1") == 25
    assert num_blocks("sd2-v") == 25
    assert num_blocks("sdxl") == 23


@pytest.mark.parametrize(("path", "_name"), SDXL_UNET_TABLE)
def test_sgm_mapping_round_trips(path: str, _name: str) -> None:
    assert diffusers_unet_path(sgm_unet_path(path, SDXL_LAYOUT), SDXL_LAYOUT) == path


def test_sd_layout_puts_the_first_upsampler_after_the_resnet() -> None:
    # SD 1.x has no attention in up_blocks.0: its up-sampler is child 1 (output_blocks.2.1.conv)
    assert sgm_unet_path("up_blocks.0.upsamplers.0.conv", SD_LAYOUT) == "output_blocks.2.1.conv"
    assert sgm_unet_path("up_blocks.1.upsamplers.0.conv", SD_LAYOUT) == "output_blocks.5.2.conv"
    assert (
        diffusers_unet_path("output_blocks.2.1.conv", SD_LAYOUT) == "up_blocks.0.upsamplers.0.conv"
    )


def test_unknown_paths_and_families_are_errors() -> None:
    with pytest.raises(ValueError):
        unet_lora_name("sdxl", "not_a_block.0")
    with pytest.raises(ValueError, match="family"):
        unet_lora_name("sd3", "conv_in")


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_tiny_model_targets_have_unique_invertible_names(family: str, conv: bool) -> None:
    from loraforge.models.tiny import build_tiny_components

    parts = build_tiny_components(family)
    encoders = [parts[k] for k in ("text_encoder", "text_encoder_2") if k in parts]
    targets = lora_targets(family, parts["unet"], encoders, conv=conv)
    assert targets
    ids = [id(m) for m in targets.values()]
    assert len(set(ids)) == len(ids)  # one name per module, one module per name
    unet_paths = [n for n, _ in parts["unet"].named_modules()]
    te_paths = [[n for n, _ in e.named_modules()] for e in encoders]
    for name, module in targets.items():
        component, index, path = module_path_for_lora_name(family, name, unet_paths, te_paths)
        root = parts["unet"] if component == "unet" else encoders[index]
        assert root.get_submodule(path) is module, name
    prefixes = {
        "sd1": ("lora_unet_", "lora_te_"),
        "sd2": ("lora_unet_", "lora_te_"),
        "sdxl": ("lora_unet_", "lora_te1_", "lora_te2_"),
    }
    assert all(n.startswith(prefixes[family]) for n in targets)
    if family == "sdxl":
        assert any(n.startswith("lora_te2_text_model_encoder_layers_") for n in targets)
        assert any(n.startswith("lora_unet_input_blocks_4_1_") for n in targets)


def test_conv_adds_resnet_and_sampler_layers_only() -> None:
    from loraforge.models.tiny import build_tiny_components

    unet = build_tiny_components("sd1")["unet"]
    plain = lora_targets("sd1", unet, [], conv=False)
    conv = lora_targets("sd1", unet, [], conv=True)
    extra = set(conv) - set(plain)
    assert set(plain) < set(conv)
    assert all(("resnets" in n) or ("samplers" in n) for n in extra)
    assert any(getattr(conv[n], "kernel_size", None) == (3, 3) for n in extra)
    assert all(getattr(m, "kernel_size", (1, 1)) == (1, 1) for m in plain.values())


def test_unknown_lora_name_is_a_key_error() -> None:
    with pytest.raises(KeyError, match="lora_unet_nothing"):
        module_path_for_lora_name("sd1", "lora_unet_nothing", ["conv_in"], [["encoder"]])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "unet_count", "te_counts"),
    # sd-scripts logs these module counts for the published models
    [("sd1", 192, (72,)), ("sd2", 192, (138,)), ("sdxl", 722, (72, 192))],
)
def test_full_size_architectures_have_sd_scripts_module_counts(
    family: str, unet_count: int, te_counts: tuple[int, ...]
) -> None:
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from loraforge.models.configs import architecture_config_dir

    folder = architecture_config_dir(family)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        encoders = []
        for index, name in enumerate(["text_encoder", "text_encoder_2"][: len(te_counts)]):
            config = CLIPTextConfig.from_pretrained(folder / name)
            cls = CLIPTextModelWithProjection if index == 1 else CLIPTextModel
            encoders.append(cls(config))
    assert len(lora_targets(family, unet, [], conv=False)) == unet_count
    for index, (encoder, count) in enumerate(zip(encoders, te_counts, strict=True)):
        names = lora_targets(family, None, [encoder], conv=False)
        assert len(names) == count, index
