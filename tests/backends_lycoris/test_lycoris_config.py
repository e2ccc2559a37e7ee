"""What the LyCORIS backend accepts, and the metadata it writes (sd-scripts + lycoris.kohya)."""

from __future__ import annotations

import inspect
import json
from typing import Any

import pytest

from loraforge.backends import get_backend
from loraforge.backends.lycoris_config import (
    ALGORITHM_ARGS,
    check_config,
    network_metadata,
    resolve_options,
)
from loraforge.errors import DependencyError, RecipeError

# network.args name -> the keyword lycoris-lora's module constructors take
_MODULE_KWARG = {
    "dora_wd": "weight_decompose",
    "weight_decompose": "weight_decompose",
    "wd_on_output": "wd_on_out",
}
_NOT_MODULE_KWARGS = {"preset", "train_norm", "unit"}  # network-level, handled by loraforge


def test_registry_returns_the_lycoris_backend() -> None:
    backend = get_backend("lycoris")
    assert backend.name == "lycoris"
    assert type(backend).__name__ == "LycorisBackend"


def test_accepted_args_are_real_module_arguments() -> None:
    """Every argument accepted for an algorithm is a parameter of its lycoris-lora class."""
    pytest.importorskip("lycoris")
    from loraforge.backends.lycoris_modules import MODULE_CLASSES

    for algorithm, accepted in ALGORITHM_ARGS.items():
        cls = MODULE_CLASSES[algorithm]
        parameters = set(inspect.signature(cls.__init__).parameters)
        for arg in accepted - _NOT_MODULE_KWARGS:
            assert _MODULE_KWARG.get(arg, arg) in parameters, (algorithm, arg)


@pytest.mark.parametrize(
    ("algorithm", "arg"),
    [
        ("loha", "factor"),
        ("lora", "constraint"),
        ("lora", "rescaled"),
        ("ia3", "use_scalar"),
        ("diag-oft", "block_size"),
        ("glora", "use_tucker"),
        ("full", "dora_wd"),
        ("boft", "dora_wd"),
    ],
)
def test_an_argument_the_algorithm_does_not_take_names_the_algorithm(
    algorithm: str, arg: str, lyco_config: Any
) -> None:
    with pytest.raises(RecipeError, match=f'algorithm "{algorithm}".*does not take "{arg}"'):
        check_config(lyco_config(algorithm=algorithm, args={arg: 1}))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"algorithm": "lora-fa"}, "network.algorithm"),
        ({"block_dims": (4,) * 25}, "network.block_dims"),
        ({"down_lr_weight": (1.0,) * 12}, "network.down_lr_weight"),
        ({"algorithm": "loha", "loraplus_lr_ratio": 16.0}, "network.loraplus_lr_ratio"),
        ({"dropout": 0.1}, "network.dropout"),
        ({"algorithm": "ia3", "rank_dropout": 0.1}, "network.rank_dropout"),
        ({"algorithm": "dylora", "dim": 6}, "network.dim"),
        ({"algorithm": "dylora", "args": {"block_size": 2}, "conv_dim": 3}, "network.conv_dim"),
        ({"args": {"dora_wd": True, "weight_decompose": True}}, "network.args"),
        ({"args": {"wd_on_output": True}}, "network.args.wd_on_output: .*DoRA is off"),
        ({"algorithm": "ia3", "conv_dim": 4}, "network.conv_dim: algorithm 'ia3' does not use"),
        ({"algorithm": "full", "conv_alpha": 1.0}, "network.conv_alpha: algorithm 'full'"),
        ({"algorithm": "diag-oft", "conv_alpha": 1.0}, "network.conv_alpha"),
        ({"algorithm": "boft", "conv_alpha": 1.0}, "network.conv_alpha"),
    ],
)
def test_unsupported_settings_are_refused(overrides: dict, field: str, lyco_config: Any) -> None:
    with pytest.raises(RecipeError, match=field):
        check_config(lyco_config(**overrides))


def test_valid_settings_pass(lyco_config: Any) -> None:
    check_config(lyco_config(algorithm="lora", rank_dropout=0.1, module_dropout=0.1))
    check_config(lyco_config(algorithm="lokr", args={"factor": 8, "decompose_both": True}))
    check_config(lyco_config(algorithm="dylora", dim=8, args={"unit": 2}))
    check_config(lyco_config(algorithm="locon", loraplus_lr_ratio=16.0))
    check_config(lyco_config(algorithm="diag-oft", conv_dim=4))  # conv block count


def test_options_follow_lycoris_defaults(lyco_config: Any) -> None:
    options = resolve_options(lyco_config(dim=8, alpha=None))
    assert (options.preset, options.conv_dim, options.conv_alpha, options.alpha) == (
        "full",
        8,
        None,
        None,
    )
    options = resolve_options(
        lyco_config(algorithm="lora", args={"weight_decompose": True}, conv_dim=2, conv_alpha=1)
    )
    assert options.module_kwargs["weight_decompose"] is True
    assert options.module_kwargs["wd_on_out"] is False  # the axis every UI applies alike
    on_output = lyco_config(algorithm="loha", args={"dora_wd": True, "wd_on_output": True})
    assert resolve_options(on_output).module_kwargs["wd_on_out"] is True
    assert (options.conv_dim, options.conv_alpha) == (2, 1)
    assert resolve_options(lyco_config(algorithm="dylora", dim=8)).module_kwargs["block_size"] == 4


def test_metadata_is_what_sd_scripts_writes_for_lycoris_kohya(lyco_config: Any) -> None:
    config = lyco_config(
        algorithm="lokr",
        dim=16,
        alpha=8,
        conv_dim=4,
        rank_dropout=0.05,
        args={"factor": 8, "decompose_both": True, "weight_decompose": True, "preset": "full"},
    )
    meta = network_metadata(config, conv_enabled=True)
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("16", "8.0")
    assert meta["ss_network_dropout"] == "None"
    args = json.loads(meta["ss_network_args"])
    assert args == {
        "algo": "lokr",
        "preset": "full",
        "conv_dim": "4",
        "conv_alpha": "8",
        "factor": "8",
        "decompose_both": "True",
        "dora_wd": "True",
        "wd_on_output": "False",
        "rank_dropout": "0.05",
    }
    assert all(isinstance(v, str) for v in args.values())


def test_metadata_without_conv_and_dylora_block(lyco_config: Any) -> None:
    config = lyco_config(algorithm="dylora", dim=8, alpha=None, args={"unit": 2})
    args = json.loads(network_metadata(config, conv_enabled=False)["ss_network_args"])
    assert args == {"algo": "dylora", "preset": "full", "block_size": "2"}
    meta = network_metadata(config, conv_enabled=False)
    assert meta["ss_network_alpha"] == "8.0"  # alpha null = dim


def test_missing_package_is_a_dependency_error(
    lyco_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "lycoris", None)  # import lycoris raises ImportError
    with pytest.raises(DependencyError, match="lycoris-lora") as info:
        get_backend("lycoris").create(lyco_config(), "sd1", None, [])
    assert "pip install" in str(info.value.hint)


def test_too_old_lycoris_is_a_dependency_error(
    lyco_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("lycoris")
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "3.2.0")
    with pytest.raises(DependencyError, match=r"4\.1 or newer, found 3\.2\.0"):
        get_backend("lycoris").create(lyco_config(), "sd1", None, [])
