"""Optimizers by name: construction, optimizer_args checks, optional dependencies, state size."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from loraforge.errors import DependencyError, RecipeError, TrainingError
from loraforge.training.optim import (
    OPTIMIZER_NAMES,
    build_optimizer,
    canonical_name,
    is_adaptive,
    is_schedule_free,
    optimizer_description,
    optimizer_state_bytes_per_param,
    set_eval_mode,
    validate_optimizer_args,
)

BNB = ("AdamW8bit", "PagedAdamW8bit", "Lion8bit")
WITHOUT_BNB = tuple(name for name in OPTIMIZER_NAMES if name not in BNB)
ADAPTIVE = ("Prodigy", "DAdaptAdam", "DAdaptLion", "DAdaptAdaGrad", "DAdaptSGD")


def lr_for(name: str) -> float:
    return 1.0 if is_adaptive(name) else 1e-3


def one_step(optimizer, params) -> None:
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()


@pytest.mark.parametrize("name", WITHOUT_BNB)
def test_every_optimizer_builds_and_steps(name, tiny_params):
    before = [p.detach().clone() for p in tiny_params]
    optimizer = build_optimizer(name, tiny_params, lr=lr_for(name))
    one_step(optimizer, tiny_params)
    assert any(not torch.equal(b, p) for b, p in zip(before, tiny_params, strict=True))


@pytest.mark.parametrize("name", WITHOUT_BNB)
def test_state_bytes_per_param_matches_the_real_optimizer_state(name):
    # A LoRA-sized matrix; count tensor state (scalars such as 'step' are negligible).
    param = torch.nn.Parameter(torch.randn(16, 320))
    optimizer = build_optimizer(name, [param], lr=lr_for(name))
    one_step(optimizer, [param])
    state = optimizer.state[param]
    measured = sum(
        v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.numel() > 1
    )
    expected = optimizer_state_bytes_per_param(name)
    if name == "Adafactor":  # factored: an upper estimate
        assert 0 < measured / param.numel() <= expected
    else:
        assert measured / param.numel() == expected


def test_known_state_sizes():
    assert optimizer_state_bytes_per_param("AdamW") == 8
    assert optimizer_state_bytes_per_param("AdamW8bit") == 2
    assert optimizer_state_bytes_per_param("PagedAdamW8bit") == 2
    assert optimizer_state_bytes_per_param("Lion8bit") == 1
    assert optimizer_state_bytes_per_param("lion") == 4


def test_names_are_case_insensitive_and_unknown_names_suggest():
    assert canonical_name("adamw8bit") == "AdamW8bit"
    with pytest.raises(RecipeError, match="unknown optimizer 'AdamWW'") as info:
        build_optimizer("AdamWW", [torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    assert "did you mean AdamW" in str(info.value)


def test_optimizer_args_pass_through_as_typed_values(tiny_params):
    optimizer = build_optimizer(
        "AdamW", tiny_params, lr=2e-4, args={"weight_decay": 0.1, "betas": [0.8, 0.95]}
    )
    group = optimizer.param_groups[0]
    assert group["weight_decay"] == 0.1 and group["betas"] == (0.8, 0.95) and group["lr"] == 2e-4


def test_unknown_argument_names_the_optimizer_and_the_accepted_ones():
    with pytest.raises(RecipeError) as info:
        validate_optimizer_args("AdamW", {"betass": [0.9, 0.99]})
    text = str(info.value)
    assert "AdamW has no argument 'betass'" in text
    assert "did you mean betas?" in text
    assert "weight_decay" in text and "amsgrad" in text
    assert "params" not in text.split("accepts:")[1]


@pytest.mark.parametrize(
    ("name", "args", "match"),
    [
        ("AdamW", {"lr": 1.0}, "set by loraforge"),
        ("SGDNesterov", {"nesterov": False}, "set by loraforge"),
        ("AdamW", {"weight_decay": "0.1"}, "expects a number"),
        ("AdamW", {"amsgrad": 1}, "expects true or false"),
        ("AdamW", {"betas": [0.9]}, "list of 2 values"),
        ("AdamW", {"eps": True}, "expects a number"),
    ],
)
def test_bad_optimizer_args_are_recipe_errors(name, args, match):
    with pytest.raises(RecipeError, match=match):
        validate_optimizer_args(name, args)


def test_sgd_nesterov_defaults_to_momentum_0_9(tiny_params):
    group = build_optimizer("SGDNesterov", tiny_params, lr=0.01).param_groups[0]
    assert group["nesterov"] is True and group["momentum"] == 0.9
    group = build_optimizer(
        "SGDNesterov", tiny_params, lr=0.01, args={"momentum": 0.5}
    ).param_groups[0]
    assert group["momentum"] == 0.5


def test_param_group_dicts_are_copied_not_modified(tiny_params):
    groups = [{"params": tiny_params[:1], "lr": 1e-3}, {"params": tiny_params[1:], "lr": 5e-4}]
    optimizer = build_optimizer("Adafactor", groups, lr=1e-3)
    assert groups[0]["lr"] == 1e-3 and groups[1]["lr"] == 5e-4
    # relative_step: the optimizer computes its own LR, group LRs are dropped
    assert all(group["lr"] is None for group in optimizer.param_groups)
    assert optimizer.defaults["relative_step"] is True


def test_adafactor_without_relative_step_uses_the_learning_rate(tiny_params):
    optimizer = build_optimizer(
        "Adafactor", tiny_params, lr=1e-3, args={"relative_step": False, "scale_parameter": False}
    )
    assert optimizer.param_groups[0]["lr"] == 1e-3
    warm = build_optimizer(
        "Adafactor", tiny_params, lr=0.0, args={"relative_step": False, "warmup_init": True}
    )
    assert warm.defaults["relative_step"] is True


@pytest.mark.parametrize("name", ADAPTIVE)
def test_adaptive_optimizers_warn_about_a_small_learning_rate(name, tiny_params, capsys):
    build_optimizer(name, tiny_params, lr=1e-4)
    assert "around 1.0" in " ".join(capsys.readouterr().err.split())
    build_optimizer(name, tiny_params, lr=1.0)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("name", ["Prodigy", "DAdaptAdam", "DAdaptLion", "DAdaptSGD"])
def test_adaptive_optimizers_refuse_different_group_lrs_up_front(name, tiny_params):
    groups = [{"params": tiny_params[:1], "lr": 1.0}, {"params": tiny_params[1:], "lr": 0.5}]
    with pytest.raises(RecipeError, match="different learning rates"):
        build_optimizer(name, groups, lr=1.0)
    # a zero-lr group (a frozen text encoder) is allowed
    groups[1]["lr"] = 0.0
    one_step(build_optimizer(name, groups, lr=1.0), tiny_params)


def test_schedule_free_optimizers_start_in_train_mode(tiny_params):
    assert is_schedule_free("AdamWScheduleFree") and not is_schedule_free("AdamW")
    optimizer = build_optimizer("AdamWScheduleFree", tiny_params, lr=1e-3)
    assert optimizer.param_groups[0]["train_mode"] is True
    set_eval_mode(optimizer)
    assert optimizer.param_groups[0]["train_mode"] is False


def test_no_trainable_parameters_is_a_training_error():
    with pytest.raises(TrainingError, match="no trainable parameters"):
        build_optimizer("AdamW", [], lr=1e-3)
    with pytest.raises(TrainingError):
        build_optimizer("AdamW", [{"params": []}], lr=1e-3)


def test_description_is_module_class_and_args_like_sd_scripts():
    assert optimizer_description("AdamW") == "torch.optim.adamw.AdamW"
    assert (
        optimizer_description("AdamW", {"weight_decay": 0.1})
        == "torch.optim.adamw.AdamW(weight_decay=0.1)"
    )
    assert optimizer_description("SGDNesterov") == "torch.optim.sgd.SGD(momentum=0.9)"
    assert optimizer_description("Adafactor").endswith("Adafactor(relative_step=True)")


def test_missing_optional_package_is_a_dependency_error(monkeypatch, tiny_params):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    with pytest.raises(DependencyError, match="bitsandbytes") as info:
        build_optimizer("AdamW8bit", tiny_params, lr=1e-3)
    assert "pip install bitsandbytes" in str(info.value)


def fake_bitsandbytes(monkeypatch) -> None:
    class AdamW8bit(torch.optim.AdamW):
        pass

    package = types.ModuleType("bitsandbytes")
    optim = types.ModuleType("bitsandbytes.optim")
    optim.AdamW8bit = AdamW8bit
    package.optim = optim
    monkeypatch.setitem(sys.modules, "bitsandbytes", package)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", optim)


def test_8bit_optimizer_without_a_gpu_says_so(monkeypatch, tiny_params):
    fake_bitsandbytes(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DependencyError, match="needs an NVIDIA GPU"):
        build_optimizer("AdamW8bit", tiny_params, lr=1e-3)


def test_8bit_optimizer_with_a_gpu_and_an_old_bitsandbytes(monkeypatch, tiny_params):
    fake_bitsandbytes(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    optimizer = build_optimizer("AdamW8bit", tiny_params, lr=1e-3, args={"weight_decay": 0.01})
    assert type(optimizer).__name__ == "AdamW8bit"
    with pytest.raises(DependencyError, match="has no PagedAdamW8bit"):
        build_optimizer("PagedAdamW8bit", tiny_params, lr=1e-3)
