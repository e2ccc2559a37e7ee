"""What the native backend accepts from the recipe, and the backend registry."""

from __future__ import annotations

from typing import Any

import pytest

from loraforge.backends import get_backend
from loraforge.backends.kohya import KohyaBackend
from loraforge.backends.kohya_blocks import layout_for, lr_weights_for
from loraforge.backends.kohya_config import check_config
from loraforge.errors import RecipeError


def test_registry_gives_the_kohya_backend() -> None:
    assert isinstance(get_backend("kohya"), KohyaBackend)
    with pytest.raises(RecipeError, match="unknown backend 'peft'"):
        get_backend("peft")


@pytest.mark.parametrize("algorithm", ["lora", "locon", "lora-fa", "dylora"])
def test_native_algorithms_pass(algorithm: str, make_config: Any) -> None:
    check_config(make_config(algorithm=algorithm))


def test_lycoris_algorithms_point_to_the_lycoris_backend(make_config: Any) -> None:
    with pytest.raises(RecipeError) as error:
        check_config(make_config(algorithm="loha"))
    assert "network.algorithm" in str(error.value)
    assert "network.backend: lycoris" in str(error.value)


def test_lycoris_arguments_are_refused(make_config: Any) -> None:
    with pytest.raises(RecipeError, match=r"network\.args: dora_wd"):
        check_config(make_config(args={"dora_wd": True}))
    with pytest.raises(RecipeError, match="dylora only"):
        check_config(make_config(args={"unit": 4}))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"dropout": 0.1}, r"network\.dropout: dylora has no dropout"),
        ({"module_dropout": 0.1}, r"network\.module_dropout"),
        ({"block_dims": (4,) * 25}, r"network\.block_dims: dylora"),
        ({"up_lr_weight": (1.0,) * 12}, r"network\.up_lr_weight: dylora"),
        ({"conv_dim": 8}, r"network\.conv_dim: dylora needs conv_dim equal to dim \(16\)"),
        ({"conv_dim": 16, "conv_alpha": 1.0}, r"network\.conv_alpha"),
        ({"args": {"unit": 5}}, r"network\.args\.unit: dim 16 must be a multiple"),
    ],
)
def test_dylora_limits(fields: dict[str, Any], message: str, make_config: Any) -> None:
    with pytest.raises(RecipeError, match=message):
        check_config(make_config(algorithm="dylora", **fields))


def test_dylora_accepts_unit_or_block_size(make_config: Any) -> None:
    check_config(make_config(algorithm="dylora", args={"unit": 4}))
    check_config(make_config(algorithm="dylora", args={"block_size": 8}, conv_dim=16))


def test_sd_lr_weights_follow_sd_scripts_block_order() -> None:
    down = [0.1 * i for i in range(12)]
    up = [1.0 + 0.1 * i for i in range(12)]
    weights = lr_weights_for(layout_for("sd1"), "sd1", down, 3.0, up)
    assert weights is not None and len(weights) == 25
    assert weights[:12] == tuple(0.0 if w <= 0 else w for w in down)
    assert weights[12] == 3.0
    assert weights[13:] == tuple(up)


def test_sdxl_lr_weights_add_the_edge_blocks_and_spread_mid() -> None:
    down = [0.5] * 9
    weights = lr_weights_for(layout_for("sdxl"), "sdxl", down, 2.0, None)
    assert weights == (1.0, *[0.5] * 9, 2.0, 2.0, 2.0, *[1.0] * 9, 1.0)
    assert lr_weights_for(layout_for("sdxl"), "sdxl", None, None, None) is None
