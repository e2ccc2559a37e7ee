"""The native backend on the built-in tiny SD1/SDXL models, through ``create_network``."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from loraforge.backends import create_network
from loraforge.backends.kohya import KohyaNetwork
from loraforge.models.naming import lora_targets, module_path_for_lora_name

Components = Callable[[str], dict[str, nn.Module]]


def _encoders(components: dict[str, nn.Module]) -> list[nn.Module]:
    return [components[k] for k in ("text_encoder", "text_encoder_2") if k in components]


def _network(components: dict[str, nn.Module], family: str, config: Any) -> KohyaNetwork:
    return create_network(config, family, components["unet"], _encoders(components))


def _run(components: dict[str, nn.Module], family: str) -> dict[str, torch.Tensor]:
    """UNet and text-encoder outputs for fixed inputs."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (2, 77), generator=generator)
    outputs = {}
    hidden = []
    for i, encoder in enumerate(_encoders(components)):
        out = encoder(ids, output_hidden_states=True)
        outputs[f"te{i}"] = out.hidden_states[-2]
        hidden.append(out.hidden_states[-2])
    unet = components["unet"]
    context = torch.cat(hidden, dim=-1)
    kwargs = {}
    if family == "sdxl":
        pooled = torch.randn(2, 32, generator=generator)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    outputs["unet"] = unet(latents, torch.tensor([10, 500]), context, **kwargs).sample
    return outputs


def _merge_by_hand(
    components: dict[str, nn.Module], family: str, tensors: dict[str, torch.Tensor]
) -> None:
    """W += up @ down * alpha / rank for every module in ``tensors``, found through the naming
    tables (not through the network)."""
    unet = components["unet"]
    encoders = _encoders(components)
    names = {k.split(".", 1)[0] for k in tensors}
    for name in names:
        part, index, path = module_path_for_lora_name(
            family,
            name,
            [p for p, _ in unet.named_modules()],
            [[p for p, _ in e.named_modules()] for e in encoders],
        )
        root = unet if part == "unet" else encoders[index]
        layer = root.get_submodule(path)
        down = tensors[f"{name}.lora_down.weight"].double()
        up = tensors[f"{name}.lora_up.weight"].double()
        scale = float(tensors[f"{name}.alpha"]) / down.shape[0]
        delta = (up.flatten(1) @ down.flatten(1)).reshape(layer.weight.shape) * scale
        with torch.no_grad():
            layer.weight.copy_((layer.weight.double() + delta).float())


def _randomize(network: nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)


@pytest.mark.parametrize(("family", "conv_dim"), [("sd1", None), ("sdxl", 4)])
def test_modules_cover_kohya_targets(
    family: str, conv_dim: int | None, tiny_components: Components, make_config: Any
) -> None:
    components = tiny_components(family)
    network = _network(components, family, make_config(dim=4, alpha=2, conv_dim=conv_dim))
    expected = lora_targets(
        family, components["unet"], _encoders(components), conv=conv_dim is not None
    )
    assert [m.lora_name for m in network.adapters()] == list(expected)
    prefixes = {m.lora_name.split("_text_model")[0] for m in network.adapters()}
    if family == "sd1":
        assert "lora_te" in prefixes
        assert not any("input_blocks" in n for n in expected)
    else:
        assert {"lora_te1", "lora_te2"} <= prefixes
        conv = network.state_dict_for_save(torch.float32)[
            "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"
        ]
        assert tuple(conv.shape[:1]) + tuple(conv.shape[2:]) == (4, 3, 3)


@pytest.mark.parametrize(("family", "conv_dim"), [("sd1", 2), ("sdxl", None)])
def test_hooked_forward_equals_an_independent_merge(
    family: str, conv_dim: int | None, tiny_components: Components, make_config: Any
) -> None:
    components = tiny_components(family)
    reference = copy.deepcopy(components)
    network = _network(components, family, make_config(dim=4, alpha=3, conv_dim=conv_dim))
    _randomize(network)
    network.apply_to()
    network.eval()
    with torch.no_grad():
        hooked = _run(components, family)
        tensors = network.state_dict_for_save(torch.float32)
        _merge_by_hand(reference, family, tensors)
        by_hand = _run(reference, family)
        network.merge_into_base(1.0)
        merged = _run(components, family)
    for key in hooked:
        assert not torch.allclose(hooked[key], _run_plain(family, key))
        torch.testing.assert_close(hooked[key], by_hand[key], atol=1e-4, rtol=1e-4, msg=key)
        torch.testing.assert_close(merged[key], by_hand[key], atol=1e-4, rtol=1e-4, msg=key)


_PLAIN: dict[str, dict[str, torch.Tensor]] = {}


def _run_plain(family: str, key: str) -> torch.Tensor:
    """Outputs of the untouched tiny model (to show the LoRA changes something)."""
    if family not in _PLAIN:
        from loraforge.models.tiny import build_tiny_components

        with torch.no_grad():
            _PLAIN[family] = _run(build_tiny_components(family, seed=0), family)
    return _PLAIN[family][key]


def test_saved_file_loads_into_a_fresh_network(
    tmp_path: Any, tiny_components: Components, make_config: Any
) -> None:
    config = make_config(algorithm="locon", dim=4, alpha=1, loraplus_lr_ratio=4.0)
    first = tiny_components("sdxl")
    network = _network(first, "sdxl", config)
    _randomize(network)
    network.apply_to()
    network.eval()
    with torch.no_grad():
        expected = _run(first, "sdxl")
    path = tmp_path / "lora.safetensors"
    save_file(network.state_dict_for_save(torch.float16), str(path), metadata=network.metadata())

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_module"] == "networks.lora"
    assert json.loads(metadata["ss_network_args"])["conv_dim"] == "4"
    second = tiny_components("sdxl")
    fresh = _network(second, "sdxl", config)
    fresh.load_weights(load_file(str(path)))
    fresh.apply_to()
    fresh.eval()
    with torch.no_grad():
        got = _run(second, "sdxl")
    for key in expected:  # fp16 storage: close, not equal
        torch.testing.assert_close(got[key], expected[key], atol=2e-3, rtol=2e-3, msg=key)


def test_sdxl_per_block_settings_use_23_blocks(
    tiny_components: Components, make_config: Any
) -> None:
    # Tiny SDXL: attention in input_blocks_4/5/7/8 (blocks 5/6/8/9), middle_block_1 (block 11),
    # output_blocks_0-5 (blocks 13-18). down_lr_weight[i] is block i + 1.
    components = tiny_components("sdxl")
    dims = [4] * 23
    dims[11] = 0
    down = [1.0] * 9
    down[4], down[7] = 0.5, 0.0
    config = make_config(dim=4, alpha=4, block_dims=dims, down_lr_weight=down, mid_lr_weight=2.0)
    network = _network(components, "sdxl", config)
    names = [m.lora_name for m in network.adapters()]
    assert not any(
        n.startswith(("lora_unet_middle_block_1_", "lora_unet_input_blocks_7_")) for n in names
    )
    assert any(n.startswith("lora_unet_input_blocks_8_") for n in names)
    groups = {g["name"]: g["lr"] for g in network.param_groups(1e-3, 1e-4)}
    assert groups == {
        "textencoder": 1e-4,
        "unet_block5": pytest.approx(0.5e-3),
        "unet_block6": 1e-3,
        "unet_block9": 1e-3,
        **{f"unet_block{b}": 1e-3 for b in range(13, 19)},
    }


def test_a_training_step_moves_only_the_adapter(
    tiny_components: Components, make_config: Any
) -> None:
    components = tiny_components("sd1")
    for module in components.values():
        module.requires_grad_(False)
    base = {k: v.clone() for k, v in components["unet"].state_dict().items()}
    network = _network(components, "sd1", make_config(algorithm="dylora", dim=4, args={"unit": 2}))
    network.apply_to()
    network.train()
    optimizer = torch.optim.AdamW(network.param_groups(1e-2, 1e-2))
    before = network.state_dict_for_save(torch.float32)
    loss = _run(components, "sd1")["unet"].pow(2).mean()
    loss.backward()
    optimizer.step()
    after = network.state_dict_for_save(torch.float32)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for key, value in components["unet"].state_dict().items():
        assert torch.equal(value, base[key]), key
