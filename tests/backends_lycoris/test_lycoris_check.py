"""What check tells about a LyCORIS recipe from the architecture alone: the layers each preset
trains (compared with the real selection on the tiny models) and BOFT's block sizes (compared
with lycoris-lora's own factorisation, on the full SD 1.5 and SDXL widths)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from loraforge.backends.lycoris_check import (
    PRESETS,
    boft_layers,
    boft_problem,
    butterfly_factor,
    preset_layers,
)
from loraforge.models.naming import text_encoder_lora_name, unet_lora_name
from loraforge.vram.arch import published_architecture
from loraforge.vram.structure import text_structure, unet_structure


def _structures(configs: dict[str, Any]) -> tuple[Any, list[Any]]:
    unet = unet_structure(configs["unet"])
    names = [n for n in ("text_encoder", "text_encoder_2") if n in configs]
    encoders = [text_structure(configs[n], projection=n == "text_encoder_2") for n in names]
    return unet, encoders


def test_butterfly_factor_is_lycoris_power2factorization() -> None:
    pytest.importorskip("lycoris")
    from lycoris.functional import power2factorization

    for dimension in [*range(1, 700), 768, 1024, 1280, 2048, 2560, 3072, 5120, 10240]:
        for factor in (-1, 1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 32, 64, 100):
            m, n = power2factorization(dimension, factor)
            ours = butterfly_factor(dimension, factor)
            assert ours == (None if n == 0 else (m, n)), (dimension, factor)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_layers_are_what_the_backend_selects(
    preset: str, family: str, tiny_models: Any
) -> None:
    pytest.importorskip("lycoris")
    from loraforge.backends.lycoris_targets import load_preset, select_targets
    from loraforge.models.tiny import tiny_component_configs

    configs = tiny_component_configs(family)
    unet, encoders = _structures(configs)
    config = configs["unet"] if family == "sdxl" else None
    ours = {}
    for layer in preset_layers(preset, unet, encoders):
        if layer.owner == "text":
            index = 1 if layer.path.startswith("text_model.") and family == "sdxl" else 0
            name = text_encoder_lora_name(family, index, layer.path)
        else:
            name = unet_lora_name(family, layer.path, unet_config=config)
        ours[name] = layer.out_features
    models = tiny_models(family)
    real = select_targets(
        load_preset(preset), family, models.unet, models.text_encoders, train_norm=False
    )
    theirs = {t.lora_name: _out_features(t.module) for t in real}
    assert ours and ours == theirs


def _out_features(module: Any) -> int:
    return int(getattr(module, "out_features", 0) or module.out_channels)


def _boft_recipe(family: str, dim: int, **network: Any) -> Any:
    from loraforge.recipe import parse_recipe_text

    doc = {
        "model": {"base": "example/model", "family": family},
        "dataset": {"subsets": [{"dir": "images"}]},
        "network": {
            "backend": "lycoris",
            "algorithm": "boft",
            "dim": dim,
            "alpha": None,
            **network,
        },
    }
    return parse_recipe_text(yaml.safe_dump(doc), base_dir=Path("/tmp"))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_boft_dims_on_the_full_architectures_match_lycoris(family: str) -> None:
    """dim 8 fails on width 320 (as lycoris-lora says); the smallest dim reported works on
    every layer, and the one below it does not, by lycoris-lora's own rule."""
    pytest.importorskip("lycoris")
    from lycoris.modules.boft import butterfly_factor as lycoris_factor

    unet, encoders = _structures(dict(published_architecture(family).configs))
    bad = _boft_recipe(family, 8).network
    message = boft_problem(bad, boft_layers(bad, unet, encoders), family)
    assert message is not None and "320" in message and "10 or more" in message
    widths = {layer.out_features for layer in boft_layers(bad, unet, encoders)}
    assert {320, 640, 1280, 4} <= widths  # conv_out's 4 channels too
    with pytest.raises(ValueError, match="impossible to decompose 320 with factor 8"):
        lycoris_factor(320, 8)
    for width in widths:
        lycoris_factor(width, 10)  # raises if 10 does not work
    with pytest.raises(ValueError):
        for width in widths:
            lycoris_factor(width, 9)
    good = _boft_recipe(family, 10).network
    assert boft_problem(good, boft_layers(good, unet, encoders), family) is None


def test_text_encoder_only_boft_needs_less() -> None:
    unet, encoders = _structures(dict(published_architecture("sd1").configs))
    config = _boft_recipe("sd1", 6, train_unet=False).network
    assert boft_problem(config, boft_layers(config, unet, encoders), "sd1") is None  # 768 = 6·128
    config = _boft_recipe("sd1", 4, train_unet=False).network
    assert "6 or more" in (boft_problem(config, boft_layers(config, unet, encoders), "sd1") or "")
