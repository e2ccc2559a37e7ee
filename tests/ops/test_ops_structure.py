"""Grouping keys into modules, algorithm and family detection, structural errors."""

from __future__ import annotations

import pytest
import torch

from loraforge.errors import LoraFileError
from loraforge.models.naming import restore_text_model_names
from loraforge.ops.family import detect_family
from loraforge.ops.modules import parse_lora

UNET = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def _algo(tensors) -> str:
    return parse_lora(tensors).algorithm


def test_algorithms_are_recognised(synth) -> None:
    r = torch.randn
    assert _algo(synth.lora(UNET, 8, 8, 2, alpha=1)) == "lora"
    locon = {
        **synth.lora(UNET, 8, 8, 2, alpha=1),
        **synth.lora("lora_unet_conv", 8, 4, 2, kernel=3, alpha=1),
    }
    assert _algo(locon) == "locon"
    assert _algo({**synth.lora(UNET, 8, 8, 2), f"{UNET}.dora_scale": r(8, 1)}) == "dora"
    loha = {
        f"{UNET}.hada_w1_a": r(8, 2),
        f"{UNET}.hada_w1_b": r(2, 8),
        f"{UNET}.hada_w2_a": r(8, 2),
        f"{UNET}.hada_w2_b": r(2, 8),
    }
    assert _algo(loha) == "loha"
    assert _algo({f"{UNET}.lokr_w1": r(2, 2), f"{UNET}.lokr_w2": r(4, 4)}) == "lokr"
    assert _algo({f"{UNET}.weight": r(8), f"{UNET}.on_input": torch.tensor(False)}) == "ia3"
    assert _algo({f"{UNET}.oft_blocks": r(2, 4, 4), f"{UNET}.alpha": torch.tensor(1.0)}) == "oft"
    assert _algo({f"{UNET}.oft_blocks": r(2, 2, 4, 4)}) == "boft"
    glora = {f"{UNET}.{k}.weight": r(2, 2) for k in ("a1", "a2", "b1", "b2")}
    assert _algo(glora) == "glora"
    assert _algo({f"{UNET}.diff": r(8, 8), f"{UNET}.diff_b": r(8)}) == "full"
    assert (
        _algo({**synth.lora(UNET, 8, 8, 2), f"{TE}.diff": r(8, 8)}) == "full+lora"
    )  # equal counts: alphabetical


def test_missing_alpha_is_a_warning_read_as_rank(synth) -> None:
    parsed = parse_lora(synth.lora(UNET, 8, 8, 4))
    module = parsed.modules[UNET]
    assert module.alpha is None and module.scale == 1.0
    assert [p.severity for p in parsed.problems] == ["warning"]
    assert "alpha = rank" in parsed.problems[0].message
    parsed.require_valid()  # a warning does not make the file unusable


def test_mismatched_up_down_is_an_error(synth) -> None:
    tensors = synth.lora(UNET, 8, 8, 4, alpha=4)
    tensors[f"{UNET}.lora_up.weight"] = torch.randn(8, 3)
    parsed = parse_lora(tensors, "bad.safetensors")
    assert UNET not in parsed.modules
    with pytest.raises(LoraFileError, match=r"(?s)bad.safetensors: 1 broken module.*rank 3 vs 4"):
        parsed.require_valid()


def test_lone_half_and_bad_alpha_are_errors(synth) -> None:
    tensors = synth.lora(UNET, 8, 8, 4, alpha=4)
    del tensors[f"{UNET}.lora_up.weight"]
    tensors.update(synth.lora(TE, 8, 8, 2))
    tensors[f"{TE}.alpha"] = torch.ones(2)
    messages = [p.message for p in parse_lora(tensors).errors]
    assert any("lacks lora_up.weight" in m for m in messages)
    assert any("alpha has shape (2,)" in m for m in messages)


def test_non_lora_state_dict_is_not_a_lora() -> None:
    parsed = parse_lora(
        {"model.diffusion_model.out.2.weight": torch.zeros(2, 2)}, "ckpt.safetensors"
    )
    with pytest.raises(LoraFileError, match="not a LoRA file"):
        parsed.require_valid()


@pytest.mark.parametrize(
    ("names", "metadata", "family", "v_pred"),
    [
        (
            ["lora_unet_input_blocks_4_1_proj_in", "lora_te1_text_model_encoder_layers_0_mlp_fc1"],
            {},
            "sdxl",
            None,
        ),
        ([UNET], {"ss_base_model_version": "sd_v2_v"}, "sd2", True),
        ([UNET], {"ss_v2": "True"}, "sd2", None),
        ([UNET], {"modelspec.architecture": "stable-diffusion-v1/lora"}, "sd1", None),
        ([UNET], {"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, "sd2", True),
        ([UNET], {}, None, None),
    ],
)
def test_family_detection(synth, names, metadata, family, v_pred) -> None:
    tensors = {}
    for name in names:
        tensors.update(synth.lora(name, 8, 8, 2, alpha=1))
    guess = detect_family(parse_lora(tensors).modules, metadata)
    assert (guess.family, guess.v_prediction) == (family, v_pred)


def test_family_from_cross_attention_width_and_conflicts(synth) -> None:
    sd2 = parse_lora(synth.lora(UNET, 320, 1024, 2, alpha=1)).modules
    assert detect_family(sd2, {}).family == "sd2"
    sd1 = parse_lora(synth.lora(UNET, 320, 768, 2, alpha=1)).modules
    assert detect_family(sd1, {}).family == "sd1"
    conflict = detect_family(sd1, {"ss_base_model_version": "sdxl_base_v1-0"})
    assert conflict.family is None and "SDXL" in (conflict.conflict or "")


def test_restore_text_model_names_leaves_existing_kohya_names_alone() -> None:
    t = torch.zeros(1)
    tensors = {
        "lora_te_encoder_layers_0_mlp_fc1.alpha": t,
        "lora_te2_encoder_layers_1_mlp_fc2.alpha": t,
        "lora_te_encoder_layers_2_mlp_fc1.alpha": t,
        "lora_te_text_model_encoder_layers_2_mlp_fc1.alpha": t,  # both spellings: keep both
        "lora_unet_mid_block_attentions_0_proj_in.alpha": t,
    }
    restored, renamed = restore_text_model_names(tensors)
    assert sorted(restored) == sorted(
        [
            "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha",
            "lora_te2_text_model_encoder_layers_1_mlp_fc2.alpha",
            "lora_te_encoder_layers_2_mlp_fc1.alpha",
            "lora_te_text_model_encoder_layers_2_mlp_fc1.alpha",
            "lora_unet_mid_block_attentions_0_proj_in.alpha",
        ]
    )
    assert renamed == ("lora_te2_encoder_layers_1_mlp_fc2", "lora_te_encoder_layers_0_mlp_fc1")
