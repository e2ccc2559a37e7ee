"""The native backend on FLUX.1 / SD3 transformers: sd-scripts' names and shapes, fused targets.

The reference names are built here from sd-scripts' rules (``networks/lora_flux.py``,
``lora_sd3.py``: every Linear of BFL's DoubleStreamBlock / SingleStreamBlock and of SAI's
SingleDiTBlock, named ``lora_unet_`` + the original module path), with the original layouts'
shapes (fused ``qkv`` 3H x H, ``linear1`` (3H + 4H) x H ...), not with loraforge's tables.
"""

from __future__ import annotations

import os
from functools import cache

import pytest
import torch

from loraforge.backends.kohya import KohyaBackend
from loraforge.errors import RecipeError
from loraforge.models.configs import architecture_config_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")


@cache
def _full(variant: str) -> torch.nn.Module:
    cls = (
        diffusers.FluxTransformer2DModel
        if variant.startswith("flux")
        else diffusers.SD3Transformer2DModel
    )
    config = cls.load_config(architecture_config_dir(variant) / "transformer")
    with torch.device("meta"):
        return cls.from_config(config)


def _flux_reference(double: int, single: int, h: int, guidance: bool) -> dict[str, tuple]:
    """sd-scripts' FLUX names -> (up rows, down cols) of the BFL layers."""
    ref = {}
    for i in range(double):
        for s in ("img", "txt"):
            n = f"lora_unet_double_blocks_{i}_{s}_"
            ref |= {
                n + "mod_lin": (6 * h, h),
                n + "attn_qkv": (3 * h, h),
                n + "attn_proj": (h, h),
                n + "mlp_0": (4 * h, h),
                n + "mlp_2": (h, 4 * h),
            }
    for i in range(single):
        n = f"lora_unet_single_blocks_{i}_"
        ref |= {
            n + "linear1": (7 * h, h),
            n + "linear2": (h, 5 * h),
            n + "modulation_lin": (3 * h, h),
        }
    del guidance  # the guidance embedder is not in the blocks
    return ref


def _sd3_reference(depth: int, h: int, dual: range) -> dict[str, tuple]:
    """sd-scripts' SD3 names -> shapes of SAI's MMDiT layers (last context block pre-only)."""
    ref = {}
    for i in range(depth):
        c, x = f"lora_unet_joint_blocks_{i}_context_block_", f"lora_unet_joint_blocks_{i}_x_block_"
        ref[c + "attn_qkv"] = (3 * h, h)
        if i == depth - 1:
            ref[c + "adaLN_modulation_1"] = (2 * h, h)
        else:
            ref |= {
                c + "attn_proj": (h, h),
                c + "mlp_fc1": (4 * h, h),
                c + "mlp_fc2": (h, 4 * h),
                c + "adaLN_modulation_1": (6 * h, h),
            }
        ref |= {x + "attn_qkv": (3 * h, h), x + "attn_proj": (h, h)}
        if i in dual:
            ref |= {x + "attn2_qkv": (3 * h, h), x + "attn2_proj": (h, h)}
        ref |= {
            x + "mlp_fc1": (4 * h, h),
            x + "mlp_fc2": (h, 4 * h),
            x + "adaLN_modulation_1": ((9 if i in dual else 6) * h, h),
        }
    return ref


def _names_and_shapes(network) -> dict[str, tuple]:
    return {m.lora_name: (m.up_shape()[0], m.down_shape()[1]) for m in network.adapters()}


@pytest.mark.parametrize(
    ("variant", "reference"),
    [
        ("flux-dev", _flux_reference(19, 38, 3072, True)),
        ("flux-schnell", _flux_reference(19, 38, 3072, False)),
        ("sd3-medium", _sd3_reference(24, 1536, range(0))),
        ("sd35-medium", _sd3_reference(24, 1536, range(13))),
        ("sd35-large", _sd3_reference(38, 2432, range(0))),
    ],
)
def test_full_architectures_get_sd_scripts_names_and_shapes(
    variant: str, reference: dict, make_config
) -> None:
    family = "flux" if variant.startswith("flux") else "sd3"
    network = KohyaBackend().create(make_config(dim=4), family, _full(variant), [])
    got = _names_and_shapes(network)
    assert set(got) == set(reference), sorted(set(got) ^ set(reference))[:5]
    assert got == reference
    assert len(got) == {"flux": 304}.get(family, len(reference))  # sd-scripts logs 304 for FLUX


def test_flux_block_selection_and_in_dims(make_config) -> None:
    args = {
        "train_blocks": "double",
        "train_double_block_indices": "0-1,18",
        "in_dims": [4, 0, 2, 0, 8],
    }
    network = KohyaBackend().create(make_config(dim=4, args=args), "flux", _full("flux-dev"), [])
    got = {m.lora_name: m.dim for m in network.adapters()}
    blocks = {int(n.split("_")[4]) for n in got if "double_blocks" in n}
    assert blocks == {0, 1, 18} and not any("single_blocks" in n for n in got)
    assert got["lora_unet_img_in"] == 4 and got["lora_unet_txt_in"] == 8
    assert got["lora_unet_vector_in_in_layer"] == 2 and "lora_unet_time_in_in_layer" not in got
    assert network.metadata()["ss_network_args"].count("train_double_block_indices") == 1


def test_sd3_block_indices_and_emb_dims(make_config) -> None:
    args = {"train_block_indices": "none", "emb_dims": "[0,0,4,0,2,3]"}
    network = KohyaBackend().create(make_config(dim=4, args=args), "sd3", _full("sd3-medium"), [])
    got = {m.lora_name: (m.dim, m.down_shape()) for m in network.adapters()}
    assert got == {
        "lora_unet_x_embedder_proj": (4, (4, 16, 2, 2)),
        "lora_unet_final_layer_adaLN_modulation_1": (2, (2, 1536)),
        "lora_unet_final_layer_linear": (3, (3, 1536)),
    }


@pytest.mark.parametrize(
    ("family", "args"),
    [
        ("flux", {"train_block_indices": "0"}),
        ("sd3", {"train_blocks": "single"}),
        ("flux", {"train_double_block_indices": "0-40"}),
        ("flux", {"in_dims": [1, 2]}),
        ("sd1", {"train_blocks": "single"}),
    ],
)
def test_wrong_flow_args_are_recipe_errors(family, args, make_config, hand_model) -> None:
    model = (
        _full("sd3-medium" if family == "sd3" else "flux-dev") if family != "sd1" else hand_model
    )
    with pytest.raises(RecipeError):
        KohyaBackend().create(make_config(args=args), family, model, [])


def test_per_block_fields_are_refused_for_transformers(make_config) -> None:
    with pytest.raises(RecipeError, match="train_double_block_indices"):
        KohyaBackend().create(make_config(block_dims=[4] * 25), "flux", _full("flux-dev"), [])


def _tiny_t5() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        vocab_size=50, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False,
    )  # fmt: skip
    return transformers.T5EncoderModel(config)


def test_t5_modules_only_with_train_t5xxl_and_named_like_sd_scripts(make_config) -> None:
    t5 = _tiny_t5()
    model = _full("flux-dev")
    plain = KohyaBackend().create(make_config(train_unet=False), "flux", model, [None, t5])
    assert not list(plain.adapters())
    config = make_config(train_unet=False, args={"train_t5xxl": True})
    names = {
        m.lora_name for m in KohyaBackend().create(config, "flux", model, [None, t5]).adapters()
    }
    per_block = ["layer_0_SelfAttention_" + p for p in "qkvo"]
    per_block += ["layer_1_DenseReluDense_" + p for p in ("wi_0", "wi_1", "wo")]
    assert names == {f"lora_te3_encoder_block_{i}_{p}" for i in range(2) for p in per_block}


def test_lycoris_refuses_flow_families_with_a_recipe_error(make_config) -> None:
    from loraforge.backends.lycoris import LycorisBackend

    config = make_config(backend="lycoris", algorithm="loha")
    with pytest.raises(RecipeError, match="backend: kohya"):
        LycorisBackend().create(config, "flux", _full("flux-dev"), [])


def test_per_kind_dims_like_sd_scripts_type_dims(make_config) -> None:
    args = {"img_attn_dim": 8, "single_mod_dim": 0, "txt_mlp_dim": 2}
    network = KohyaBackend().create(make_config(dim=4, args=args), "flux", _full("flux-dev"), [])
    got = {m.lora_name: m.dim for m in network.adapters()}
    n = "lora_unet_double_blocks_3_"
    assert got[n + "img_attn_qkv"] == got[n + "img_attn_proj"] == 8
    assert got[n + "txt_mlp_0"] == 2 and got[n + "txt_attn_qkv"] == 4
    assert got["lora_unet_single_blocks_5_linear1"] == 4
    assert not any(name.endswith("modulation_lin") for name in got)
    sd3 = KohyaBackend().create(
        make_config(dim=4, args={"x_attn_dim": 6, "context_mod_dim": 0}),
        "sd3",
        _full("sd35-medium"),
        [],
    )
    dims = {m.lora_name: m.dim for m in sd3.adapters()}
    assert dims["lora_unet_joint_blocks_0_x_block_attn2_qkv"] == 6
    assert dims["lora_unet_joint_blocks_0_x_block_mlp_fc1"] == 4
    assert not any("context_block_adaLN" in name for name in dims)
    with pytest.raises(RecipeError, match="x_attn_dim"):
        KohyaBackend().create(make_config(args={"x_attn_dim": 2}), "flux", _full("flux-dev"), [])
