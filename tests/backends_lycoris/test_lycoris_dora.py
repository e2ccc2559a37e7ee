"""DoRA files load the same everywhere: a trained (randomised) DoRA/DoHa/DoKr network on the tiny
SD1 model, saved, then applied by independent re-implementations of the formulas A1111 (v1.10),
ComfyUI and Forge publish, by loraforge's own merge, and by lycoris-lora's merge (what training
computed). With the input-axis layout (loraforge's default) all of them agree to 1e-6; with the
output-axis layout (``wd_on_output: true``) the UIs do not, which is why ``check`` warns."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("lycoris")

import torch
from torch import nn

from loraforge.backends import get_backend
from loraforge.errors import LoraFileError
from loraforge.ops.delta import apply_module
from loraforge.ops.modules import parse_lora

CASES = [
    ("lora", {"dora_wd": True}),  # the full preset: LoCon on the 3x3 convs too
    ("loha", {"dora_wd": True}),
    ("lokr", {"dora_wd": True, "factor": 4}),
]


# ---- the UIs' readings of one module's tensors, written from their published loader code ----
def _raw_delta(t: dict[str, torch.Tensor], shape: torch.Size) -> tuple[torch.Tensor, float]:
    """``(ΔW before alpha/rank, alpha/rank)`` as comfy/weight_adapter (lora, loha, lokr) reads
    a module; A1111's network_lora/hada/lokr and Forge's patcher compute the same products."""
    alpha = float(t["alpha"])
    if "lora_down.weight" in t:
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        diff = torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1))
        return diff.reshape(shape), alpha / down.shape[0]
    if "hada_w1_a" in t:
        m1 = torch.mm(t["hada_w1_a"], t["hada_w1_b"])
        m2 = torch.mm(t["hada_w2_a"], t["hada_w2_b"])
        return (m1 * m2).reshape(shape), alpha / t["hada_w1_b"].shape[0]
    dim = None
    if "lokr_w1" in t:
        w1 = t["lokr_w1"]
    else:
        dim, w1 = t["lokr_w1_b"].shape[0], torch.mm(t["lokr_w1_a"], t["lokr_w1_b"])
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    else:
        dim, w2 = t["lokr_w2_b"].shape[0], torch.mm(t["lokr_w2_a"], t["lokr_w2_b"])
    if w2.dim() == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    return torch.kron(w1, w2).reshape(shape), (alpha / dim if dim is not None else 1.0)


def comfyui(weight: torch.Tensor, t: dict[str, torch.Tensor], strength: float) -> torch.Tensor:
    """comfy/weight_adapter/base.py ``weight_decompose`` (v0.3.77 and later)."""
    diff, alpha = _raw_delta(t, weight.shape)
    dora_scale = t["dora_scale"]
    weight = weight.clone()
    weight_calc = weight + diff * alpha
    if dora_scale.shape[0] == weight_calc.shape[0]:  # output axis: the ORIGINAL weight's norm
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        norm = (
            weight_calc.transpose(0, 1)
            .reshape(weight_calc.shape[1], -1)
            .norm(dim=1, keepdim=True)
            .reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1))
            .transpose(0, 1)
        )
    norm = norm + torch.finfo(weight.dtype).eps
    weight_calc = weight_calc * (dora_scale / norm)
    if strength != 1.0:
        return weight + strength * (weight_calc - weight)
    return weight_calc


def forge(weight: torch.Tensor, t: dict[str, torch.Tensor], strength: float) -> torch.Tensor:
    """Forge's backend/patcher/lora.py: ``merge_lora_to_weight`` -> ``weight_decompose``."""
    diff, alpha = _raw_delta(t, weight.shape)
    dora_scale = t["dora_scale"]
    weight = weight.clone()
    lora_diff = diff * alpha
    weight_calc = weight + lora_diff
    if dora_scale.shape[0] == weight_calc.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        flat = weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1)
        norm = flat.norm(dim=1, keepdim=True)
        norm = norm.reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1)).transpose(0, 1)
    weight_calc = weight_calc * (dora_scale / (norm + torch.finfo(weight.dtype).eps))
    if strength == 1.0:
        return weight_calc
    weight_calc = weight_calc - weight
    return weight + strength * weight_calc


def a1111(weight: torch.Tensor, t: dict[str, torch.Tensor], multiplier: float) -> torch.Tensor:
    """extensions-builtin/Lora/network.py (v1.10): ``finalize_updown`` scales by alpha/dim,
    ``apply_weight_decompose`` takes column norms (a ``(1, in)`` scale), then the multiplier."""
    diff, scale = _raw_delta(t, weight.shape)
    updown = diff * scale
    dora_norm_dims = weight.dim() - 1
    merged_scale1 = updown + weight
    merged_scale1_norm = (
        merged_scale1.transpose(0, 1)
        .reshape(merged_scale1.shape[1], -1)
        .norm(dim=1, keepdim=True)
        .reshape(merged_scale1.shape[1], *[1] * dora_norm_dims)
        .transpose(0, 1)
    )
    updown = merged_scale1 * (t["dora_scale"] / merged_scale1_norm) - weight
    return weight + updown * multiplier


UIS = {"A1111": a1111, "ComfyUI": comfyui, "Forge": forge}


# ---- the network ---------------------------------------------------------------------------
def _trained_network(
    tiny_models: Any, lyco_config: Any, algorithm: str, args: dict
) -> tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A DoRA network on the tiny SD1 model with every parameter moved off its start (as
    training would), its saved float32 file, and each module's base weight before merging."""
    models = tiny_models("sd1")
    config = lyco_config(algorithm=algorithm, args=args, dim=4, alpha=3)
    network = get_backend("lycoris").create(config, "sd1", models.unet, models.text_encoders)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in network.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    network.eval()
    tensors = network.state_dict_for_save(torch.float32)
    base = {
        name: module.org_module[0].weight.detach().clone()
        for name, module in network.named_children()
    }
    return network, tensors, base


def _module_tensors(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    return {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == name}


@pytest.mark.parametrize(("algorithm", "args"), CASES, ids=[c[0] for c in CASES])
def test_every_ui_applies_the_file_as_loraforge_merges_it_and_as_it_trained(
    algorithm: str, args: dict, tiny_models: Any, lyco_config: Any
) -> None:
    network, tensors, base = _trained_network(tiny_models, lyco_config, algorithm, args)
    parsed = parse_lora(tensors)
    assert all(tuple(m.tensors["dora_scale"].shape[:1]) == (1,) for m in parsed.modules.values())
    convs = [n for n, m in parsed.modules.items() if m.tensors["dora_scale"].dim() == 4]
    assert convs  # 3x3 and 1x1 convs are covered, not only Linear layers
    ours = {name: apply_module(parsed.modules[name], w, 1.0) for name, w in base.items()}
    ours_half = {name: apply_module(parsed.modules[name], w, 0.5) for name, w in base.items()}
    network.merge_into_base(1.0)  # lycoris-lora's merge: the weight the training forward used
    for name, module in network.named_children():
        trained = module.org_module[0].weight.detach()
        torch.testing.assert_close(ours[name], trained, rtol=0, atol=1e-6)
        t = _module_tensors(tensors, name)
        for ui, apply in UIS.items():
            at_one, at_half = apply(base[name], t, 1.0), apply(base[name], t, 0.5)
            torch.testing.assert_close(at_one, trained, rtol=0, atol=1e-6, msg=f"{ui} {name}")
            torch.testing.assert_close(at_half, ours_half[name], rtol=0, atol=1e-6, msg=ui)


def test_output_axis_is_an_explicit_option_and_the_uis_read_it_differently(
    tiny_models: Any, lyco_config: Any
) -> None:
    args = {"dora_wd": True, "wd_on_output": True}
    network, tensors, base = _trained_network(tiny_models, lyco_config, "lora", args)
    parsed = parse_lora(tensors)
    assert all(m.tensors["dora_scale"].shape[1] == 1 for m in parsed.modules.values())
    ours = {name: apply_module(parsed.modules[name], w, 1.0) for name, w in base.items()}
    network.merge_into_base(1.0)
    worst = dict.fromkeys(UIS, 0.0)
    for name, module in network.named_children():
        trained = module.org_module[0].weight.detach()
        torch.testing.assert_close(ours[name], trained, rtol=0, atol=1e-6)  # as trained
        t = _module_tensors(tensors, name)
        for ui, apply in UIS.items():
            worst[ui] = max(worst[ui], float((apply(base[name], t, 1.0) - trained).abs().max()))
    assert all(error > 1e-3 for error in worst.values()), worst


def test_the_file_says_which_axis_it_has(tiny_models: Any, lyco_config: Any) -> None:
    import json

    for args, axis in (
        ({"dora_wd": True}, "False"),
        ({"dora_wd": True, "wd_on_output": True}, "True"),
    ):
        network, _, _ = _trained_network(tiny_models, lyco_config, "lora", args)
        assert json.loads(network.metadata()["ss_network_args"])["wd_on_output"] == axis


def test_continuing_from_a_file_of_the_other_axis_is_refused_by_name(
    tiny_models: Any, lyco_config: Any
) -> None:
    old = {"dora_wd": True, "wd_on_output": True}
    _, tensors, _ = _trained_network(tiny_models, lyco_config, "lora", old)
    models = tiny_models("sd1")
    config = lyco_config(algorithm="lora", args={"dora_wd": True}, dim=4, alpha=3)
    network = get_backend("lycoris").create(config, "sd1", models.unet, models.text_encoders)
    # square attention layers too: (out, 1) must not be reshaped into (1, in)
    with pytest.raises(LoraFileError, match=r"per output row.*per input column") as error:
        network.load_weights(tensors)
    assert "wd_on_output" in (error.value.hint or "")
    again = get_backend("lycoris").create(
        lyco_config(algorithm="lora", args=old, dim=4, alpha=3),
        "sd1",
        models.unet,
        models.text_encoders,
    )
    again.load_weights(tensors)


def test_a_square_layer_keeps_its_axis_through_save_and_load(lyco_config: Any) -> None:
    """On a square layer (out == in) both layouts have the same size: loading keeps the axis."""
    from loraforge.backends.lycoris import LycorisAdapterNetwork
    from loraforge.backends.lycoris_config import resolve_options
    from loraforge.backends.lycoris_modules import build_module
    from loraforge.backends.lycoris_targets import Target

    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    config = lyco_config(algorithm="lora", args={"dora_wd": True}, dim=2, alpha=1)
    options = resolve_options(config)
    target = Target(name, layer, True, "linear")
    network = LycorisAdapterNetwork(
        config, [(target, build_module(target, options, 1.0))], conv_enabled=False
    )
    saved = network.state_dict_for_save(torch.float32)
    magnitude = saved[f"{name}.dora_scale"]
    assert tuple(magnitude.shape) == (1, 8)
    torch.testing.assert_close(magnitude.reshape(-1), layer.weight.detach().norm(dim=0))
