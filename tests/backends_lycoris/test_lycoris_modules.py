"""LyCORIS modules on hand-made layers: file formulas, merges, loading, hooks, groups, max-norm."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("lycoris")

import torch
from torch import nn
from torch.nn import functional as F

from loraforge.backends.lycoris import LycorisAdapterNetwork
from loraforge.backends.lycoris_config import resolve_options
from loraforge.backends.lycoris_modules import build_module
from loraforge.backends.lycoris_targets import Target
from loraforge.errors import LoraFileError

LIN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


class Layers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.lin = nn.Linear(12, 16)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.te = nn.Linear(16, 16)
        for p in self.parameters():
            p.requires_grad_(False)

    def targets(self) -> dict[str, nn.Module]:
        return {LIN: self.lin, CONV: self.conv, TE: self.te}


def _inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return {
        LIN: torch.randn(3, 12, generator=generator),
        CONV: torch.randn(2, 8, 5, 5, generator=generator),
        TE: torch.randn(3, 16, generator=generator),
    }


def _outputs(layers: Layers) -> dict[str, torch.Tensor]:
    inputs = _inputs()
    return {name: layer(inputs[name]) for name, layer in layers.targets().items()}


def _network(layers: Layers, config: Any) -> LycorisAdapterNetwork:
    options = resolve_options(config)
    modules = []
    for name, layer in layers.targets().items():
        kind = "conv" if isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1) else "linear"
        target = Target(name, layer, name.startswith("lora_unet_"), kind)
        modules.append((target, build_module(target, options, config.multiplier)))
    return LycorisAdapterNetwork(config, modules, conv_enabled=True)


def _randomize(network: nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)


def _delta_output(layer: nn.Module, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x, delta, padding=layer.padding)
    return F.linear(x, delta)


# Independent readings of the saved tensors, as A1111/ComfyUI apply them: weight delta per module.
def _lora_delta(t: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    down, up = t["lora_down.weight"], t["lora_up.weight"]
    scale = t["alpha"] / down.shape[0]
    if "lora_mid.weight" in t:  # Tucker: 1x1 down, kxk core, 1x1 up
        core = t["lora_mid.weight"]
        delta = torch.einsum("rskl,or,si->oikl", core, up.flatten(1), down.flatten(1))
        return delta * scale
    flat = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
    return flat.reshape(shape) * scale


def _loha_delta(t: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    w1 = t["hada_w1_a"] @ t["hada_w1_b"]
    w2 = t["hada_w2_a"] @ t["hada_w2_b"]
    return (w1 * w2).reshape(shape) * (t["alpha"] / t["hada_w1_b"].shape[0])


def _lokr_delta(t: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    # the rank is that of a low-rank factor (w2's first); no low-rank factor: scale 1
    low_rank = [t[k] for k in ("lokr_w2_b", "lokr_w1_b") if k in t]
    rank = low_rank[0].shape[0] if low_rank else None
    if len(shape) == 4:
        w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
        w1 = w1[:, :, None, None]
    scale = 1.0 if rank is None else t["alpha"] / rank
    return torch.kron(w1, w2).reshape(shape) * scale


def _ia3_delta(t: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    w = t["weight"].reshape(-1)
    return weight * w.reshape(-1, *[1] * (weight.dim() - 1))


def _module_tensors(saved: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    return {k.split(".", 1)[1]: v for k, v in saved.items() if k.split(".")[0] == name}


@pytest.mark.parametrize(
    ("algorithm", "args"),
    [
        ("lora", {}),
        ("lora", {"use_tucker": True, "use_scalar": True}),
        ("loha", {}),
        ("loha", {"use_scalar": True}),
        ("lokr", {"factor": 4}),
        ("lokr", {"factor": 4, "decompose_both": True}),
        ("lokr", {"full_matrix": True}),
        ("ia3", {}),
        ("full", {}),
        ("dylora", {"block_size": 2}),
    ],
)
def test_forward_matches_the_file_as_other_tools_read_it(
    algorithm: str, args: dict, lyco_config: Any
) -> None:
    """alpha != dim and a trained scalar: what the hooked layer adds is what the file says."""
    layers = Layers()
    base = _outputs(layers)
    network = _network(layers, lyco_config(algorithm=algorithm, args=args, dim=4, alpha=3))
    network.apply_to()
    _randomize(network)
    network.eval()
    hooked = _outputs(layers)
    saved = network.state_dict_for_save(torch.float32)
    inputs = _inputs()
    for name, layer in layers.targets().items():
        tensors = _module_tensors(saved, name)
        if algorithm in ("lora", "dylora"):
            delta = _lora_delta(tensors, layer.weight.shape)
        elif algorithm == "loha":
            delta = _loha_delta(tensors, layer.weight.shape)
        elif algorithm == "lokr":
            delta = _lokr_delta(tensors, layer.weight.shape)
        elif algorithm == "ia3":
            delta = _ia3_delta(tensors, layer.weight)
        else:
            delta = tensors["diff"]
        expected = base[name] + _delta_output(layer, delta, inputs[name])
        if algorithm == "full":
            expected = expected + tensors["diff_b"].reshape(-1, *[1] * (base[name].dim() - 2))
        torch.testing.assert_close(hooked[name], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("on_output", [False, True], ids=["input-axis", "output-axis"])
def test_dora_rescales_to_the_trained_magnitude(on_output: bool, lyco_config: Any) -> None:
    """Default: one magnitude per input column, ``dora_scale`` ``(1, in, …)``; with
    ``wd_on_output`` one per output row, ``(out, 1, …)``."""
    layers = Layers()
    args = {"dora_wd": True, **({"wd_on_output": True} if on_output else {})}
    network = _network(layers, lyco_config(algorithm="lora", args=args, alpha=3))
    network.apply_to()
    _randomize(network)
    network.eval()
    hooked = _outputs(layers)
    saved = network.state_dict_for_save(torch.float32)
    for name, layer in layers.targets().items():
        tensors = _module_tensors(saved, name)
        merged = layer.weight + _lora_delta(tensors, layer.weight.shape)
        axis = 0 if on_output else 1
        norm = merged.transpose(0, axis).reshape(merged.shape[axis], -1).norm(dim=1)
        magnitude = tensors["dora_scale"]
        assert magnitude.shape[axis] == merged.shape[axis] and magnitude.shape[1 - axis] == 1
        view = [1] * merged.dim()
        view[axis] = -1
        weight = merged * (magnitude.reshape(-1) / norm).reshape(view)
        x = _inputs()[name]
        if isinstance(layer, nn.Conv2d):
            expected = F.conv2d(x, weight, layer.bias, padding=1)
        else:
            expected = F.linear(x, weight, layer.bias)
        torch.testing.assert_close(hooked[name], expected, rtol=1e-4, atol=1e-5)


ALL = [
    ("lora", {}),
    ("lora", {"dora_wd": True, "use_scalar": True}),
    ("loha", {"use_tucker": True, "use_scalar": True}),
    ("loha", {"dora_wd": True}),
    ("lokr", {"factor": 4, "use_tucker": True}),
    ("lokr", {"dora_wd": True}),
    ("ia3", {}),
    ("dylora", {"block_size": 2}),
    ("diag-oft", {"rescaled": True, "constraint": 0.1}),
    ("boft", {}),
    ("full", {}),
    ("glora", {"use_scalar": True}),
]


@pytest.mark.parametrize(("algorithm", "args"), ALL)
@pytest.mark.parametrize("multiplier", [1.0, 0.5])
def test_merge_equals_the_hooked_forward(
    algorithm: str, args: dict, multiplier: float, lyco_config: Any
) -> None:
    layers = Layers()
    network = _network(layers, lyco_config(algorithm=algorithm, args=args, alpha=3))
    network.apply_to()
    _randomize(network)
    network.set_multiplier(multiplier)
    network.eval()
    hooked = _outputs(layers)
    network.merge_into_base(multiplier)
    assert all("forward" not in layer.__dict__ for layer in layers.targets().values())
    merged = _outputs(layers)
    for name in hooked:
        torch.testing.assert_close(merged[name], hooked[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("algorithm", "args"), ALL)
def test_save_load_round_trip_and_restore(algorithm: str, args: dict, lyco_config: Any) -> None:
    config = lyco_config(algorithm=algorithm, args=args, alpha=3)
    layers = Layers()
    base = _outputs(layers)
    network = _network(layers, config)
    network.apply_to()
    _randomize(network)
    network.apply_max_norm(0.5)  # folds a scale into lycoris-lora's scalar where it has one
    network.eval()
    hooked = _outputs(layers)
    saved = network.state_dict_for_save(torch.float16)
    assert all(t.dtype == torch.float16 for t in saved.values() if t.is_floating_point())
    network.restore()
    for name, out in _outputs(layers).items():
        torch.testing.assert_close(out, base[name], rtol=0, atol=0)

    network.apply_to()  # re-applying after restore gives the same network again
    for name, out in _outputs(layers).items():
        torch.testing.assert_close(out, hooked[name], rtol=1e-5, atol=1e-6)
    network.restore()

    other = _network(layers, config)
    other.apply_to()
    result = other.load_weights(saved)
    assert result.missing == () and result.unexpected == ()
    other.eval()
    for name, out in _outputs(layers).items():
        torch.testing.assert_close(out, hooked[name], rtol=2e-2, atol=2e-3)  # fp16 file


@pytest.mark.parametrize(("algorithm", "args"), ALL)
def test_module_state_dict_round_trip_resumes_the_network(
    algorithm: str, args: dict, lyco_config: Any
) -> None:
    """The training state saves ``network.state_dict()`` and resumes with ``load_state_dict``."""
    config = lyco_config(algorithm=algorithm, args=args, alpha=3)
    layers = Layers()
    network = _network(layers, config)
    network.apply_to()
    _randomize(network)
    network.eval()
    hooked = _outputs(layers)
    state = {k: v.detach().clone() for k, v in network.state_dict().items()}
    network.restore()
    resumed = _network(layers, config)
    resumed.apply_to()
    missing, unexpected = resumed.load_state_dict(state, strict=False)
    assert (missing, unexpected) == ([], [])
    resumed.eval()
    for name, out in _outputs(layers).items():
        torch.testing.assert_close(out, hooked[name], rtol=1e-5, atol=1e-6)


def test_dylora_eval_is_full_rank_and_deterministic(lyco_config: Any) -> None:
    layers = Layers()
    network = _network(layers, lyco_config(algorithm="dylora", args={"block_size": 2}, dim=4))
    network.apply_to()
    _randomize(network)
    network.eval()
    first, second = _outputs(layers), _outputs(layers)
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0)
    saved = network.state_dict_for_save(torch.float32)
    assert tuple(saved[f"{CONV}.lora_up.weight"].shape) == (16, 4, 1, 1)  # kohya conv layout
    assert tuple(saved[f"{CONV}.lora_down.weight"].shape) == (4, 8, 3, 3)
    network.train()
    drawn = {tuple(_outputs(layers)[LIN].flatten()[:4].tolist()) for _ in range(12)}
    assert len(drawn) > 1  # training draws a rank


def test_loading_a_different_alpha_changes_the_scale(lyco_config: Any) -> None:
    layers = Layers()
    base = _outputs(layers)
    network = _network(layers, lyco_config(algorithm="loha", alpha=3))
    network.apply_to()
    _randomize(network)
    saved = network.state_dict_for_save(torch.float32)
    for name in layers.targets():
        saved[f"{name}.alpha"] = saved[f"{name}.alpha"] * 2
    other = _network(Layers(), lyco_config(algorithm="loha", alpha=3))
    other.load_weights(saved)
    layers2 = Layers()
    other2 = _network(layers2, lyco_config(algorithm="loha", alpha=3))
    other2.apply_to()
    other2.load_weights(saved)
    other2.eval()
    network.eval()
    hooked = _outputs(layers)
    for name, out in _outputs(layers2).items():
        # twice the alpha: twice the change
        torch.testing.assert_close(
            out - base[name], 2 * (hooked[name] - base[name]), rtol=1e-4, atol=1e-5
        )


def test_load_refuses_what_does_not_fit(lyco_config: Any) -> None:
    layers = Layers()
    network = _network(layers, lyco_config(algorithm="lora"))
    saved = network.state_dict_for_save(torch.float32)

    wrong_rank = dict(saved)
    wrong_rank[f"{LIN}.lora_down.weight"] = torch.zeros(7, 12)
    with pytest.raises(LoraFileError, match=r"lora_down\.weight: shape"):
        _network(layers, lyco_config(algorithm="lora")).load_weights(wrong_rank)

    tucker = _network(layers, lyco_config(algorithm="lora", args={"use_tucker": True}))
    with pytest.raises(LoraFileError, match=r"lora_mid\.weight"):
        tucker.load_weights(saved)  # the file has no lora_mid for the 3x3 conv

    partial = {k: v for k, v in saved.items() if not k.startswith(TE)}
    partial["lora_unet_somewhere_else.lora_up.weight"] = torch.zeros(1)
    with pytest.raises(LoraFileError, match="1 modules have no tensors"):
        _network(layers, lyco_config(algorithm="lora")).load_weights(partial)
    result = _network(layers, lyco_config(algorithm="lora")).load_weights(partial, strict=False)
    assert result.missing == (TE,)
    assert result.unexpected == ("lora_unet_somewhere_else.lora_up.weight",)


def test_param_groups_split_freeze_and_loraplus(lyco_config: Any) -> None:
    layers = Layers()
    network = _network(layers, lyco_config(algorithm="lora", loraplus_lr_ratio=16))
    groups = {g["name"]: g for g in network.param_groups(1e-4, 5e-5)}
    assert set(groups) == {"textencoder", "textencoder plus", "unet", "unet plus"}
    assert groups["unet plus"]["lr"] == pytest.approx(1.6e-3)
    assert groups["textencoder"]["lr"] == 5e-5
    up = {id(m.lora_up.weight) for m in network.adapters()}
    assert {id(p) for p in groups["unet plus"]["params"]} <= up
    assert not ({id(p) for p in groups["unet"]["params"]} & up)

    plain = _network(layers, lyco_config(algorithm="loha"))
    groups = plain.param_groups(1e-4, 0.0)
    assert [g["name"] for g in groups] == ["unet"]
    te_module = dict(plain.named_children())[TE]
    assert not any(p.requires_grad for p in te_module.parameters())
    counted = sum(p.numel() for g in groups for p in g["params"])
    assert plain.trainable_parameter_count() == counted


def test_max_norm_caps_each_module(lyco_config: Any) -> None:
    layers = Layers()
    network = _network(layers, lyco_config(algorithm="lora", alpha=4))
    network.apply_to()
    _randomize(network, scale=1.0)
    result = network.apply_max_norm(0.05)
    assert result.keys_scaled == 3
    assert result.max_norm == pytest.approx(0.05, rel=1e-4)
    saved = network.state_dict_for_save(torch.float32)
    for name, layer in layers.targets().items():
        delta = _lora_delta(_module_tensors(saved, name), layer.weight.shape)
        assert float(delta.norm()) == pytest.approx(0.05, rel=1e-4)


def test_full_restore_puts_the_base_weight_back_as_it_was(lyco_config: Any) -> None:
    layers = Layers()
    before = {
        n: (layer.weight.clone(), layer.weight.requires_grad)
        for n, layer in layers.targets().items()
    }
    network = _network(layers, lyco_config(algorithm="full"))
    network.apply_to()
    network.apply_to()  # idempotent
    _randomize(network)
    network.restore()
    for name, layer in layers.targets().items():
        weight, requires_grad = before[name]
        torch.testing.assert_close(layer.weight, weight, rtol=0, atol=0)
        assert layer.weight.requires_grad == requires_grad
    saved = network.state_dict_for_save(torch.float32)
    network.apply_to()
    network.restore()
    torch.testing.assert_close(network.state_dict_for_save(torch.float32), saved)


@pytest.mark.parametrize("algorithm", ["lora", "lokr", "full"])
def test_rank_and_module_dropout_act_only_while_training(algorithm: str, lyco_config: Any) -> None:
    layers = Layers()
    config = lyco_config(algorithm=algorithm, rank_dropout=0.5, args={"factor": 4})
    if algorithm != "lokr":
        config = lyco_config(algorithm=algorithm, rank_dropout=0.5)
    network = _network(layers, config)
    network.apply_to()
    _randomize(network)
    network.train()
    torch.manual_seed(0)
    drawn = {tuple(_outputs(layers)[LIN][0, :4].tolist()) for _ in range(8)}
    assert len(drawn) > 1
    network.eval()
    fixed = {tuple(_outputs(layers)[LIN][0, :4].tolist()) for _ in range(3)}
    assert len(fixed) == 1


@pytest.mark.parametrize(("algorithm", "args"), [*ALL, ("boft", {"constraint": 0.1})])
def test_merging_the_saved_file_equals_the_hooked_forward(
    algorithm: str, args: dict, lyco_config: Any
) -> None:
    """What `loraforge merge --base` does with the saved file is what training computed
    (the square text-encoder layer makes GLoRA's two tensor layouts look alike)."""
    from loraforge.ops.delta import apply_module
    from loraforge.ops.modules import parse_lora

    layers = Layers()
    network = _network(layers, lyco_config(algorithm=algorithm, args=args, alpha=3))
    network.apply_to()
    _randomize(network)
    network.eval()
    hooked = _outputs(layers)
    parsed = parse_lora(network.state_dict_for_save(torch.float32))
    network.restore()
    inputs = _inputs()
    for name, layer in layers.targets().items():
        weight = apply_module(parsed.modules[name], layer.weight.detach(), 1.0)
        if isinstance(layer, nn.Conv2d):
            merged = F.conv2d(inputs[name], weight, layer.bias, padding=layer.padding)
        else:
            merged = F.linear(inputs[name], weight, layer.bias)
        if algorithm == "full":  # the bias difference travels as diff_b
            diff_b = _module_tensors(network.state_dict_for_save(torch.float32), name)["diff_b"]
            merged = merged + diff_b.reshape(-1, *[1] * (merged.dim() - 2))
        torch.testing.assert_close(merged, hooked[name], rtol=1e-4, atol=1e-5)
