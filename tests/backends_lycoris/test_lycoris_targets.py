"""Which layers LyCORIS presets select on the tiny models, and under which kohya names."""

from __future__ import annotations

import copy
from typing import Any

import pytest

pytest.importorskip("lycoris")

from torch import nn

from loraforge.backends import get_backend
from loraforge.backends.lycoris_targets import load_preset, select_targets
from loraforge.errors import RecipeError
from loraforge.models.naming import lora_targets


def _create(models: Any, config: Any) -> Any:
    return get_backend("lycoris").create(config, models.family, models.unet, models.text_encoders)


def _names(network: nn.Module) -> set[str]:
    return {name for name, _ in network.named_children()}


def test_full_preset_on_sd1_takes_each_layer_once_with_kohya_names(
    tiny_models: Any, lyco_config: Any
) -> None:
    """lycoris-lora's own wrapper asserts "duplicated lora name" on time_embedding here."""
    models = tiny_models("sd1")
    names = _names(_create(models, lyco_config()))
    assert {"lora_unet_conv_in", "lora_unet_conv_out"} <= names
    assert {"lora_unet_time_embedding_linear_1", "lora_unet_time_embedding_linear_2"} <= names
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in names  # kxk conv (conv_dim = dim)
    # the kohya default targets are all included
    kohya = lora_targets("sd1", models.unet, models.text_encoders, conv=True)
    assert set(kohya) <= names


def test_sdxl_names_are_sgm_and_canonical_text_encoder_names(
    tiny_models: Any, lyco_config: Any
) -> None:
    models = tiny_models("sdxl")
    names = _names(_create(models, lyco_config()))
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_input_blocks_1_0_in_layers_2" in names
    assert "lora_unet_input_blocks_0_0" in names  # conv_in
    assert "lora_unet_time_embed_0" in names
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1" in names
    assert "lora_te2_text_model_encoder_layers_0_self_attn_out_proj" in names
    assert not any("down_blocks" in n or "up_blocks" in n for n in names)
    assert not any(n.startswith(("lora_te1_encoder", "lora_te2_encoder")) for n in names)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_presets_select_what_they_say(family: str, tiny_models: Any) -> None:
    models = tiny_models(family)
    encoders = models.text_encoders

    def pick(preset: str, **kwargs: Any) -> list[Any]:
        return select_targets(load_preset(preset), family, models.unet, encoders, **kwargs)

    attn_mlp = pick("attn-mlp", train_norm=False)
    assert attn_mlp and all(t.kind == "linear" for t in attn_mlp)
    assert any(not t.is_unet for t in attn_mlp)
    only_unet = pick("unet-transformer-only", train_norm=False)
    assert only_unet and all(t.is_unet and t.kind == "linear" for t in only_unet)
    assert not any("resnets" in t.lora_name or "in_layers" in t.lora_name for t in only_unet)
    attn = pick("attn-only", train_norm=False)  # sd-scripts' CrossAttention = diffusers Attention
    unet_attn = [t for t in attn if t.is_unet]
    assert unet_attn and all("attn1" in t.lora_name or "attn2" in t.lora_name for t in unet_attn)
    conv_only = pick("unet-convblock-only", train_norm=False)
    assert any(t.kind == "conv" for t in conv_only)
    assert not any("transformer_blocks" in t.lora_name for t in conv_only)
    norms = [t for t in pick("full", train_norm=True) if t.kind == "norm"]
    assert norms and all(isinstance(t.module, nn.LayerNorm | nn.GroupNorm) for t in norms)


def test_ia3_preset_targets_keys_values_and_mlp_outputs_on_their_input(tiny_models: Any) -> None:
    models = tiny_models("sd1")
    targets = select_targets(
        load_preset("ia3"), "sd1", models.unet, models.text_encoders, train_norm=False
    )
    leaves = {t.lora_name.rsplit("_", 1)[-1] for t in targets}
    assert leaves == {"k", "v", "2", "proj", "fc2"}  # to_k, to_v, ff_net_2, k_proj/v_proj, fc2
    on_input = {t.lora_name for t in targets if t.options.get("train_on_input")}
    assert on_input and all(n.endswith(("ff_net_2", "mlp_fc2")) for n in on_input)


def test_train_unet_and_text_encoder_switches(tiny_models: Any, lyco_config: Any) -> None:
    models = tiny_models("sd1")
    unet_only = _names(_create(models, lyco_config(train_text_encoder=False)))
    assert unet_only and all(n.startswith("lora_unet_") for n in unet_only)
    te_only = _names(_create(models, lyco_config(train_unet=False)))
    assert te_only and all(n.startswith("lora_te_") for n in te_only)
    config = lyco_config(train_unet=False, args={"preset": "unet-transformer-only"})
    with pytest.raises(RecipeError, match="selects no layer"):
        _create(models, config)


def _class_state() -> dict[str, Any]:
    from lycoris.kohya import LycorisNetworkKohya
    from lycoris.wrapper import LycorisNetwork

    return {
        f"{cls.__name__}.{k}": copy.deepcopy(v)
        for cls in (LycorisNetwork, LycorisNetworkKohya)
        for k, v in vars(cls).items()
        if k.isupper()
    }


def test_presets_leave_lycoris_class_state_alone(tiny_models: Any, lyco_config: Any) -> None:
    before = _class_state()
    models = tiny_models("sd1")
    narrow = _create(models, lyco_config(args={"preset": "attn-only"}))
    wide = _create(models, lyco_config(args={"preset": "full"}))
    assert _class_state() == before
    assert not any("resnets" in n for n in _names(narrow))
    assert any("resnets" in n for n in _names(wide))  # the first preset did not leak


def test_unknown_preset_is_a_recipe_error(tiny_models: Any, lyco_config: Any) -> None:
    with pytest.raises(RecipeError, match="no preset 'everything'") as info:
        _create(tiny_models("sd1"), lyco_config(args={"preset": "everything"}))
    assert "attn-mlp" in str(info.value.hint)


def test_block_size_too_small_for_a_layer_names_the_layer(
    tiny_models: Any, lyco_config: Any
) -> None:
    config = lyco_config(algorithm="boft", dim=4)  # SDXL's te2 is 48 wide: no BOFT(…, 4)
    with pytest.raises(RecipeError, match="lora_te2_text_model_encoder_layers_0"):
        _create(tiny_models("sdxl"), config)


def test_building_prints_nothing_on_stdout(
    tiny_models: Any, lyco_config: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """lycoris-lora logs and prints to stdout; loraforge keeps stdout for data."""
    config = lyco_config(algorithm="lokr", dim=64, args={"factor": 4})  # "too large" warning
    network = _create(tiny_models("sd1"), config)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "lycoris-lora:" in captured.err
    assert network.trainable_parameter_count() > 0
