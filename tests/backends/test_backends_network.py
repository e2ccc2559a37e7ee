"""KohyaNetwork on hand-made layers: groups, blocks, saving, loading, merging, max-norm."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn

from loraforge.backends.kohya import KohyaNetwork
from loraforge.backends.kohya_blocks import rank_plan
from loraforge.errors import LoraFileError, RecipeError


def _inputs() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return {
        "attn_q": torch.randn(2, 3, 6),
        "proj_in": torch.randn(2, 6, 4, 4),
        "mid_q": torch.randn(2, 6),
        "resnet_conv": torch.randn(2, 3, 5, 5),
        "up_ff": torch.randn(2, 6),
        "te_q": torch.randn(2, 6),
    }


def _outputs(model: nn.Module) -> dict[str, torch.Tensor]:
    return {attr: getattr(model, attr)(x) for attr, x in _inputs().items()}


def _hand_delta(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    flat = up.reshape(up.shape[0], up.shape[1]) @ down.reshape(down.shape[0], -1)
    return flat.reshape(up.shape[0], *down.shape[1:])


def test_default_targets_and_kohya_keys(hand_model: Any, hand_network: Any) -> None:
    network = hand_network(hand_model)
    keys = set(network.state_dict_for_save(torch.float32))
    names = {n for a, n in hand_model.NAMES.items() if a != "resnet_conv"}
    assert keys == {
        f"{n}.{s}" for n in names for s in ("lora_down.weight", "lora_up.weight", "alpha")
    }
    assert set(network.state_dict()) == keys  # nn.Module keys are the kohya keys too


def test_conv_dim_adds_kxk_modules_with_their_own_rank(hand_model: Any, hand_network: Any) -> None:
    network = hand_network(hand_model, conv_dim=3, conv_alpha=1.5)
    saved = network.state_dict_for_save(torch.float32)
    name = hand_model.NAMES["resnet_conv"]
    assert tuple(saved[f"{name}.lora_down.weight"].shape) == (3, 3, 3, 3)
    assert tuple(saved[f"{name}.lora_up.weight"].shape) == (4, 3, 1, 1)
    assert float(saved[f"{name}.alpha"]) == 1.5
    assert tuple(saved[f"{hand_model.NAMES['proj_in']}.lora_down.weight"].shape) == (16, 6, 1, 1)


def test_locon_without_conv_dim_uses_dim_and_null_conv_alpha_means_rank(
    hand_model: Any, hand_network: Any
) -> None:
    network = hand_network(hand_model, algorithm="locon", dim=4, alpha=2)
    saved = network.state_dict_for_save(torch.float32)
    name = hand_model.NAMES["resnet_conv"]
    assert saved[f"{name}.lora_down.weight"].shape[0] == 4
    assert float(saved[f"{name}.alpha"]) == 4.0


@pytest.mark.parametrize(("dtype"), [torch.float16, torch.bfloat16, torch.float32])
def test_saved_tensors_use_the_save_precision(
    hand_model: Any, dtype: torch.dtype, hand_network: Any
) -> None:
    network = hand_network(hand_model)
    saved = network.state_dict_for_save(dtype)
    assert {t.dtype for t in saved.values()} == {dtype}
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in saved.values())
    assert saved[f"{hand_model.NAMES['te_q']}.alpha"].dim() == 0
    # A copy: changing the network does not change what was handed out.
    before = saved[f"{hand_model.NAMES['te_q']}.lora_down.weight"].clone()
    with torch.no_grad():
        for p in network.parameters():
            p.add_(1.0)
    torch.testing.assert_close(saved[f"{hand_model.NAMES['te_q']}.lora_down.weight"], before)


@pytest.mark.parametrize("algorithm", ["lora", "lora-fa", "dylora"])
def test_save_then_load_into_a_fresh_network_reproduces_outputs(
    algorithm: str, hand_model: Any, hand_network: Any, randomize: Any
) -> None:
    extra = {"args": {"unit": 4}} if algorithm == "dylora" else {}
    first_model = type(hand_model)()
    first = hand_network(first_model, algorithm=algorithm, conv_dim=16, **extra)
    randomize(first)
    first.apply_to()
    first.eval()
    expected = _outputs(first_model)
    saved = first.state_dict_for_save(torch.float32)

    second_model = type(hand_model)()
    second = hand_network(second_model, algorithm=algorithm, conv_dim=16, **extra)
    result = second.load_weights(saved)
    assert result.missing == () and result.unexpected == ()
    second.apply_to()
    second.eval()
    for attr, out in _outputs(second_model).items():
        torch.testing.assert_close(out, expected[attr], msg=attr)


def test_loading_a_file_with_another_alpha_keeps_its_effect(
    hand_model: Any, hand_network: Any
) -> None:
    network = hand_network(hand_model, dim=4, alpha=1)
    name = hand_model.NAMES["te_q"]
    torch.manual_seed(0)
    down, up = torch.randn(4, 6), torch.randn(6, 4)
    network.load_weights(
        {
            f"{name}.lora_down.weight": down.half(),
            f"{name}.lora_up.weight": up.half(),
            f"{name}.alpha": torch.tensor(3.0).half(),
        },
        strict=False,
    )
    network.apply_to()
    x = torch.randn(2, 6)
    base = x @ hand_model.te_q.weight.T + hand_model.te_q.bias
    expected = base + x @ down.half().float().T @ up.half().float().T * (3.0 / 4)
    torch.testing.assert_close(hand_model.te_q(x), expected, atol=1e-5, rtol=1e-5)
    assert float(network.state_dict_for_save(torch.float32)[f"{name}.alpha"]) == 1.0


def test_strict_load_names_missing_and_unexpected_keys(hand_model: Any, hand_network: Any) -> None:
    network = hand_network(hand_model)
    saved = network.state_dict_for_save(torch.float32)
    name = hand_model.NAMES["te_q"]
    del saved[f"{name}.lora_down.weight"]
    saved["lora_unet_nothing.lora_down.weight"] = torch.zeros(1)
    with pytest.raises(LoraFileError, match="1 modules have no tensors"):
        network.load_weights(saved)
    result = network.load_weights(saved, strict=False)
    assert result.missing == (name,)
    assert "lora_unet_nothing.lora_down.weight" in result.unexpected


def test_load_refuses_a_different_rank(hand_model: Any, hand_network: Any) -> None:
    network = hand_network(hand_model, dim=4)
    other = hand_network(type(hand_model)(), dim=8).state_dict_for_save(torch.float32)
    with pytest.raises(LoraFileError, match="does not fit"):
        network.load_weights(other)


def test_load_accepts_linear_shaped_tensors_for_a_1x1_conv(
    hand_model: Any, hand_network: Any
) -> None:
    network = hand_network(hand_model, dim=2)
    saved = network.state_dict_for_save(torch.float32)
    name = hand_model.NAMES["proj_in"]
    saved[f"{name}.lora_down.weight"] = torch.ones(2, 6)
    saved[f"{name}.lora_up.weight"] = torch.ones(4, 2)
    network.load_weights(saved)
    assert torch.all(getattr(network, name).lora_up.weight == 1)


def test_merge_into_base_equals_the_hooked_forward(
    hand_model: Any, hand_network: Any, randomize: Any
) -> None:
    network = hand_network(hand_model, conv_dim=2, conv_alpha=1)
    randomize(network)
    network.apply_to()
    network.set_multiplier(0.6)
    hooked = _outputs(hand_model)
    network.merge_into_base(0.6)
    assert all("forward" not in m.__dict__ for m in hand_model.modules())
    for attr, out in _outputs(hand_model).items():
        torch.testing.assert_close(out, hooked[attr], atol=1e-5, rtol=1e-5, msg=attr)


def test_merge_adds_up_down_times_alpha_over_rank(
    hand_model: Any, hand_network: Any, randomize: Any
) -> None:
    network = hand_network(hand_model, conv_dim=2, conv_alpha=1, dim=4, alpha=3)
    randomize(network)
    saved = network.state_dict_for_save(torch.float32)
    before = {attr: getattr(hand_model, attr).weight.detach().clone() for attr in hand_model.NAMES}
    network.merge_into_base(1.0)
    for attr, name in hand_model.NAMES.items():
        down, up = saved[f"{name}.lora_down.weight"], saved[f"{name}.lora_up.weight"]
        scale = float(saved[f"{name}.alpha"]) / down.shape[0]
        expected = before[attr] + _hand_delta(down, up) * scale
        torch.testing.assert_close(getattr(hand_model, attr).weight, expected, msg=attr)


def test_set_multiplier_scales_the_update(
    hand_model: Any, hand_network: Any, randomize: Any
) -> None:
    network = hand_network(hand_model)
    randomize(network)
    x = torch.randn(2, 6)
    base = hand_model.te_q(x)
    network.apply_to()
    full = hand_model.te_q(x) - base
    network.set_multiplier(-0.5)
    torch.testing.assert_close(hand_model.te_q(x) - base, -0.5 * full)
    network.restore()
    torch.testing.assert_close(hand_model.te_q(x), base)


def test_param_groups_unet_and_text_encoder(hand_model: Any, hand_network: Any) -> None:
    network = hand_network(hand_model)
    groups = network.param_groups(unet_lr=1e-4, text_encoder_lr=5e-5)
    assert [(g["name"], g["lr"]) for g in groups] == [("textencoder", 5e-5), ("unet", 1e-4)]
    assert len(groups[0]["params"]) == 2  # one TE module: down + up
    assert len(groups[1]["params"]) == 8
    count = sum(p.numel() for g in groups for p in g["params"])
    assert network.trainable_parameter_count() == count


def test_text_encoder_lr_zero_freezes_it(hand_model: Any, hand_network: Any) -> None:
    network = hand_network(hand_model)
    groups = network.param_groups(unet_lr=1e-4, text_encoder_lr=0.0)
    assert [g["name"] for g in groups] == ["unet"]
    te = getattr(network, hand_model.NAMES["te_q"])
    assert not any(p.requires_grad for p in te.parameters())


def test_loraplus_puts_up_weights_in_their_own_group(hand_model: Any, hand_network: Any) -> None:
    network = hand_network(hand_model, loraplus_lr_ratio=16)
    groups = network.param_groups(unet_lr=1e-4, text_encoder_lr=1e-5)
    assert [(g["name"], g["lr"]) for g in groups] == [
        ("textencoder", 1e-5),
        ("textencoder plus", 1e-5 * 16),
        ("unet", 1e-4),
        ("unet plus", 1e-4 * 16),
    ]
    up_ids = {id(m.lora_up.weight) for m in network.adapters()}
    for group in groups:
        in_plus = {id(p) in up_ids for p in group["params"]}
        assert in_plus == {group["name"].endswith("plus")}


def test_lora_fa_groups_hold_only_up_weights(hand_model: Any, hand_network: Any) -> None:
    network = hand_network(hand_model, algorithm="lora-fa")
    network.requires_grad_(True)
    groups = network.param_groups(unet_lr=1e-4, text_encoder_lr=1e-4)
    params = [p for g in groups for p in g["params"]]
    assert {id(p) for p in params} == {id(m.lora_up.weight) for m in network.adapters()}
    assert not any(m.lora_down.weight.requires_grad for m in network.adapters())


def test_block_lr_weights_make_per_block_groups_and_zero_removes_modules(
    hand_model: Any, hand_network: Any
) -> None:
    # sd1 block indices of the hand layers: down attention/proj_in 1, middle 12, up 14.
    down = [1.0] * 12
    down[1] = 0.5
    up = [1.0] * 12
    up[1] = 0.0
    network = hand_network(hand_model, down_lr_weight=down, mid_lr_weight=2.0, up_lr_weight=up)
    names = {m.lora_name for m in network.adapters()}
    assert hand_model.NAMES["up_ff"] not in names  # lr weight 0: no module at all
    groups = network.param_groups(unet_lr=1e-4, text_encoder_lr=3e-5)
    assert [(g["name"], g["lr"]) for g in groups] == [
        ("textencoder", 3e-5),
        ("unet_block1", 0.5e-4),
        ("unet_block12", 2.0e-4),
    ]
    assert len(groups[1]["params"]) == 4  # attn_q and proj_in


def test_block_dims_set_ranks_and_zero_disables(hand_model: Any, hand_network: Any) -> None:
    dims = [8] * 25
    dims[1], dims[12], dims[14] = 2, 0, 3
    alphas = [1.0] * 25
    alphas[14] = 3.0
    network = hand_network(
        hand_model, block_dims=dims, block_alphas=alphas, conv_block_dims=[5] * 25
    )
    saved = network.state_dict_for_save(torch.float32)
    rank = {
        n: saved[f"{n}.lora_down.weight"].shape[0]
        for n in hand_model.NAMES.values()
        if f"{n}.alpha" in saved
    }
    assert rank == {
        hand_model.NAMES["attn_q"]: 2,
        hand_model.NAMES["proj_in"]: 2,
        hand_model.NAMES["up_ff"]: 3,
        hand_model.NAMES["resnet_conv"]: 5,
        hand_model.NAMES["te_q"]: 16,  # text encoders keep network.dim
    }
    assert float(saved[f"{hand_model.NAMES['up_ff']}.alpha"]) == 3.0
    assert float(saved[f"{hand_model.NAMES['resnet_conv']}.alpha"]) == 5.0  # null conv alpha: rank


def test_block_lists_of_the_wrong_length_are_recipe_errors(
    hand_model: Any, hand_network: Any
) -> None:
    with pytest.raises(RecipeError, match=r"network\.block_dims: sd1 needs 25 values"):
        hand_network(hand_model, block_dims=[4] * 23)
    with pytest.raises(RecipeError, match=r"network\.down_lr_weight: sd1 needs 12 values"):
        hand_network(hand_model, down_lr_weight=[1.0] * 9)


def test_train_unet_only_and_text_encoder_only(hand_model: Any, hand_network: Any) -> None:
    unet_only = hand_network(hand_model, train_text_encoder=False)
    assert all(m.lora_name.startswith("lora_unet_") for m in unet_only.adapters())
    te_only = hand_network(type(hand_model)(), train_unet=False)
    assert [m.lora_name for m in te_only.adapters()] == [hand_model.NAMES["te_q"]]
    assert [g["name"] for g in te_only.param_groups(1e-4, 1e-4)] == ["textencoder"]


def test_max_norm_scales_like_sd_scripts(
    hand_model: Any, hand_network: Any, randomize: Any
) -> None:
    network = hand_network(hand_model, dim=4, alpha=2)
    randomize(network, seed=5)
    te_name = hand_model.NAMES["te_q"]
    with torch.no_grad():
        getattr(network, te_name).lora_up.weight.mul_(100)  # far above the limit
        getattr(network, hand_model.NAMES["mid_q"]).lora_up.weight.mul_(1e-4)  # far below
    saved = network.state_dict_for_save(torch.float32)
    max_norm = 0.05
    ratios, norms = {}, []
    for name in (m.lora_name for m in network.adapters()):
        down, up = saved[f"{name}.lora_down.weight"], saved[f"{name}.lora_up.weight"]
        norm = float((_hand_delta(down, up) * (2 / 4)).norm())
        clamped = max(norm, max_norm / 2)
        ratios[name] = min(max_norm, clamped) / clamped
        norms.append(norm * ratios[name])
    result = network.apply_max_norm(max_norm)
    assert result.keys_scaled == sum(r != 1 for r in ratios.values()) >= 1
    assert result.mean_norm == pytest.approx(sum(norms) / len(norms), rel=1e-5)
    assert result.max_norm == pytest.approx(max(norms), rel=1e-5)
    te = getattr(network, te_name)
    assert float(te.delta_weight(1.0).norm()) == pytest.approx(max_norm, rel=1e-5)
    # sd-scripts scales down and up by sqrt(ratio) each.
    root = ratios[te_name] ** 0.5
    torch.testing.assert_close(te.lora_down.weight, saved[f"{te_name}.lora_down.weight"] * root)
    torch.testing.assert_close(te.lora_up.weight, saved[f"{te_name}.lora_up.weight"] * root)


def test_lora_fa_max_norm_leaves_the_frozen_down_alone(
    hand_model: Any, hand_network: Any, randomize: Any
) -> None:
    network = hand_network(hand_model, algorithm="lora-fa")
    randomize(network)
    downs = {m.lora_name: m.lora_down.weight.clone() for m in network.adapters()}
    result = network.apply_max_norm(1e-3)
    assert result.keys_scaled == len(downs)
    assert result.max_norm == pytest.approx(1e-3, rel=1e-4)
    for module in network.adapters():
        torch.testing.assert_close(module.lora_down.weight, downs[module.lora_name])


def test_metadata_strings_like_sd_scripts(hand_model: Any, hand_network: Any) -> None:
    plain = hand_network(hand_model).metadata()
    assert plain == {
        "ss_network_module": "networks.lora",
        "ss_network_dim": "16",
        "ss_network_alpha": "8.0",
        "ss_network_dropout": "None",
    }
    locon = hand_network(
        type(hand_model)(),
        conv_dim=8,
        conv_alpha=1,
        dropout=0.1,
        rank_dropout=0.25,
        loraplus_lr_ratio=16.0,
        down_lr_weight=[0.0] + [1.0] * 11,
    ).metadata()
    assert locon["ss_network_module"] == "networks.lora"
    assert locon["ss_network_dropout"] == "0.1"
    assert json.loads(locon["ss_network_args"]) == {
        "conv_dim": "8",
        "conv_alpha": "1",
        "rank_dropout": "0.25",
        "down_lr_weight": "0,1,1,1,1,1,1,1,1,1,1,1",
        "loraplus_lr_ratio": "16",
        "dropout": "0.1",
    }
    fa = hand_network(type(hand_model)(), algorithm="lora-fa", alpha=None).metadata()
    assert fa["ss_network_module"] == "networks.lora_fa"
    assert fa["ss_network_alpha"] == "16.0"
    assert "ss_network_args" not in fa
    dy = hand_network(type(hand_model)(), algorithm="dylora", args={"unit": 4}).metadata()
    assert dy["ss_network_module"] == "networks.dylora"
    assert json.loads(dy["ss_network_args"]) == {"unit": "4"}  # only strings: no null dropout


def test_unknown_layer_types_are_refused(make_config: Any) -> None:
    with pytest.raises(TypeError, match=r"nn\.Linear or nn\.Conv2d"):
        KohyaNetwork(
            make_config(),
            rank_plan(make_config(), "sd1"),
            {"lora_te_norm": nn.LayerNorm(4)},
            lambda name: None,
        )
