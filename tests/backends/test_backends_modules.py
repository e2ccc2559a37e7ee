"""The adapter modules on single layers, against formulas written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loraforge.backends.dylora import DyLoRAModule
from loraforge.backends.lora_modules import LoRAModule


def _random_weights_(module: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))


def _hand_delta(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``up @ down`` in the target's weight shape, written independently of the code under test."""
    out_features, rank = up.shape[0], up.shape[1]
    flat = up.reshape(out_features, rank) @ down.reshape(rank, -1)
    return flat.reshape(out_features, *down.shape[1:])


def test_linear_forward_is_base_plus_scaled_low_rank() -> None:
    torch.manual_seed(0)
    target = nn.Linear(6, 5)
    x = torch.randn(3, 4, 6)
    base_expected = x @ target.weight.T + target.bias
    lora = LoRAModule("lora_te_x", target, 4, 2.0, multiplier=0.7)
    _random_weights_(lora)
    lora.apply_to()
    down, up = lora.lora_down.weight, lora.lora_up.weight
    expected = base_expected + (x @ down.T @ up.T) * (2.0 / 4) * 0.7
    torch.testing.assert_close(target(x), expected)
    lora.restore()
    torch.testing.assert_close(target(x), base_expected)


@pytest.mark.parametrize(("kernel", "stride", "padding"), [(1, 1, 0), (3, 1, 1), (3, 2, 1)])
def test_conv_forward_matches_merged_weight(kernel: int, stride: int, padding: int) -> None:
    torch.manual_seed(0)
    target = nn.Conv2d(3, 5, kernel, stride=stride, padding=padding)
    x = torch.randn(2, 3, 7, 7)
    lora = LoRAModule("lora_unet_c", target, 2, 1.0)
    _random_weights_(lora)
    assert tuple(lora.lora_down.weight.shape) == (2, 3, kernel, kernel)
    assert tuple(lora.lora_up.weight.shape) == (5, 2, 1, 1)
    merged = target.weight + _hand_delta(lora.lora_down.weight, lora.lora_up.weight) * 0.5
    expected = F.conv2d(x, merged, target.bias, stride=stride, padding=padding)
    lora.apply_to()
    torch.testing.assert_close(target(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("alpha", [None, 0])
def test_alpha_none_or_zero_means_rank(alpha: float | None) -> None:
    lora = LoRAModule("lora_te_x", nn.Linear(4, 4), 8, alpha)
    assert lora.scale == 1.0
    assert float(lora.alpha) == 8.0


def test_initialisation_is_kohya_and_starts_as_no_op() -> None:
    torch.manual_seed(0)
    target = nn.Linear(300, 300)
    lora = LoRAModule("lora_te_x", target, 64, 32)
    assert torch.count_nonzero(lora.lora_up.weight) == 0
    # kaiming_uniform_(a=sqrt(5)) on a fan_in of 300: U(-1/sqrt(300), 1/sqrt(300)).
    bound = 1 / math.sqrt(300)
    assert lora.lora_down.weight.abs().max() <= bound
    assert lora.lora_down.weight.abs().max() > 0.9 * bound
    x = torch.randn(2, 300)
    expected = target(x)
    lora.apply_to()
    torch.testing.assert_close(target(x), expected)


def test_lora_fa_down_is_frozen_and_normal() -> None:
    torch.manual_seed(0)
    lora = LoRAModule("lora_te_x", nn.Linear(200, 100), 56, 1.0, freeze_down=True)
    assert not lora.lora_down.weight.requires_grad
    assert lora.lora_up.weight.requires_grad
    lora.requires_grad_(True)
    assert not lora.lora_down.weight.requires_grad
    std = float(lora.lora_down.weight.std())
    assert std == pytest.approx(math.sqrt(2.0 / (200 + 56)), rel=0.05)
    assert lora.trainable_parameters() == [lora.lora_up.weight]


def test_dropouts_only_in_training() -> None:
    torch.manual_seed(0)
    target = nn.Linear(6, 6)
    lora = LoRAModule("lora_te_x", target, 4, 4, dropout=0.5, rank_dropout=0.5, module_dropout=0.5)
    _random_weights_(lora)
    lora.apply_to()
    x = torch.randn(3, 6)
    lora.eval()
    plain = x @ target.weight.T + target.bias + x @ lora.lora_down.weight.T @ lora.lora_up.weight.T
    torch.testing.assert_close(target(x), plain)
    torch.testing.assert_close(target(x), target(x))
    lora.train()
    outputs = [target(x) for _ in range(8)]
    assert any(not torch.allclose(o, plain) for o in outputs)


def test_network_dropout_keeps_the_expected_update() -> None:
    torch.manual_seed(0)
    target = nn.Linear(4, 3, bias=False)
    lora = LoRAModule("lora_te_x", target, 4, 4, dropout=0.3)
    _random_weights_(lora)
    x = torch.randn(1, 4).expand(20000, 4)
    expected = x[0] @ lora.lora_down.weight.T @ lora.lora_up.weight.T
    lora.train()
    out = lora.adapter_output(x)
    assert not torch.allclose(out[0], out[1])  # a different mask per row
    torch.testing.assert_close(out.mean(0), expected, atol=0.05, rtol=0.05)


def test_rank_dropout_masks_ranks_per_sample_and_rescales() -> None:
    target = nn.Linear(5, 3, bias=False)
    lora = LoRAModule("lora_te_x", target, 4, 2, rank_dropout=0.25)
    _random_weights_(lora)
    lora.train()
    x = torch.randn(6, 7, 5)  # (B, L, in): one mask per sample, shared by its tokens
    torch.manual_seed(123)
    out = lora.adapter_output(x)
    torch.manual_seed(123)
    keep = (torch.rand(6, 4) > 0.25).float()
    hidden = (x @ lora.lora_down.weight.T) * keep[:, None, :]
    expected = hidden @ lora.lora_up.weight.T * (2 / 4) / (1 - 0.25)
    torch.testing.assert_close(out, expected)


def test_rank_dropout_on_conv_masks_channels() -> None:
    lora = LoRAModule("lora_unet_c", nn.Conv2d(2, 3, 3, padding=1), 4, 4, rank_dropout=0.5)
    _random_weights_(lora)
    lora.train()
    x = torch.randn(2, 2, 5, 5)
    torch.manual_seed(7)
    out = lora.adapter_output(x)
    torch.manual_seed(7)
    keep = (torch.rand(2, 4) > 0.5).float()
    hidden = F.conv2d(x, lora.lora_down.weight, padding=1) * keep[:, :, None, None]
    expected = F.conv2d(hidden, lora.lora_up.weight) * 2.0
    torch.testing.assert_close(out, expected)


def test_module_dropout_skips_the_whole_module() -> None:
    target = nn.Linear(4, 4)
    lora = LoRAModule("lora_te_x", target, 2, 2, module_dropout=1.0)
    _random_weights_(lora)
    lora.apply_to()
    x = torch.randn(2, 4)
    base = x @ target.weight.T + target.bias
    lora.train()
    torch.testing.assert_close(target(x), base)
    lora.eval()
    assert not torch.allclose(target(x), base)


def test_hooks_stack_and_restore_in_reverse_order() -> None:
    target = nn.Linear(4, 4)
    first = LoRAModule("lora_te_a", target, 2, 2)
    second = LoRAModule("lora_te_b", target, 2, 2)
    _random_weights_(first, 1)
    _random_weights_(second, 2)
    x = torch.randn(3, 4)
    base = target(x)
    first.apply_to()
    with_first = target(x)
    second.apply_to()
    both = target(x)
    torch.testing.assert_close(both - with_first, second.adapter_output(x))
    second.restore()
    torch.testing.assert_close(target(x), with_first)
    first.restore()
    torch.testing.assert_close(target(x), base)
    assert "forward" not in target.__dict__


def test_target_is_not_part_of_the_adapter_state() -> None:
    lora = LoRAModule("lora_te_x", nn.Linear(4, 4), 2, 1)
    assert set(lora.state_dict()) == {"alpha", "lora_down.weight", "lora_up.weight"}


def _dylora(unit: int = 2) -> tuple[nn.Linear, DyLoRAModule]:
    torch.manual_seed(0)
    target = nn.Linear(5, 3)
    module = DyLoRAModule("lora_te_x", target, 6, 3.0, unit=unit)
    _random_weights_(module)
    return target, module


def test_dylora_trains_one_unit_of_a_truncated_rank() -> None:
    _, module = _dylora(unit=2)
    module.train()
    x = torch.randn(4, 5)
    torch.manual_seed(5)
    out = module.adapter_output(x)
    torch.manual_seed(5)
    k = int(torch.randint(3, (1,)))
    rank = (k + 1) * 2
    down, up = module.down_weight()[:rank], module.up_weight()[:, :rank]
    expected = x @ down.T @ up.T * (3.0 / 6) * math.sqrt(6 / rank)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    for i, (d, u) in enumerate(zip(module.lora_down_blocks, module.lora_up_blocks, strict=True)):
        assert (d.grad is not None) == (i == k)
        assert (u.grad is not None) == (i == k)


def test_dylora_draws_every_unit_and_eval_uses_full_rank() -> None:
    _, module = _dylora(unit=2)
    x = torch.randn(2, 5)
    module.train()
    torch.manual_seed(0)
    seen = set()
    for _ in range(60):
        module.zero_grad(set_to_none=True)
        module.adapter_output(x).sum().backward()
        seen |= {i for i, b in enumerate(module.lora_down_blocks) if b.grad is not None}
    assert seen == {0, 1, 2}
    module.eval()
    full = x @ module.down_weight().T @ module.up_weight().T * 0.5
    torch.testing.assert_close(module.adapter_output(x), full)


def test_dylora_full_rank_tensors_round_trip() -> None:
    target, module = _dylora(unit=3)
    assert tuple(module.down_weight().shape) == (6, 5)
    assert tuple(module.up_weight().shape) == (3, 6)
    other = DyLoRAModule("lora_te_x", target, 6, 3.0, unit=3)
    other.load_down_up(module.down_weight(), module.up_weight())
    torch.testing.assert_close(other.down_weight(), module.down_weight())
    torch.testing.assert_close(other.up_weight(), module.up_weight())


def test_dylora_conv_matches_merged_weight() -> None:
    torch.manual_seed(0)
    target = nn.Conv2d(3, 4, 3, padding=1)
    module = DyLoRAModule("lora_unet_c", target, 4, 4, unit=2)
    _random_weights_(module)
    module.eval()
    module.apply_to()
    x = torch.randn(1, 3, 6, 6)
    merged = target.weight + _hand_delta(module.down_weight(), module.up_weight())
    expected = F.conv2d(x, merged, target.bias, padding=1)
    torch.testing.assert_close(target(x), expected, atol=1e-5, rtol=1e-5)


def test_dylora_rank_must_be_a_multiple_of_unit() -> None:
    with pytest.raises(ValueError, match="multiple of unit"):
        DyLoRAModule("lora_te_x", nn.Linear(4, 4), 6, 1, unit=4)
