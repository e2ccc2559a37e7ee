"""Loading SD3 / FLUX: diffusers folders, and the separate files FLUX users hold (transformer,
clip_l, t5xxl in fp8, ae), offline, with the weights landing where they belong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loraforge.errors import ModelError
from loraforge.models.loading import load_model


@pytest.fixture(scope="module")
def flux_parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from loraforge.models.tiny_flow import build_tiny_flow_components

    return build_tiny_flow_components("flux", seed=3)


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory: pytest.TempPathFactory, flux_parts) -> dict[str, Path]:
    """The tiny FLUX as separate files: a bf16 transformer carrying its configs (as every
    loraforge-written file of a non-published architecture does), clip_l in fp16 with the
    ``text_model.`` keys ComfyUI's file has, T5 with fp8 Linear weights and no tied copy of its
    embedding, and the autoencoder in the original (LDM) layout."""
    from loraforge.models.single_file import EMBEDDED_CONFIG_KEY, _vae_ldm_item
    from loraforge.models.tiny_flow import tiny_flow_configs, write_tiny_t5_tokenizer

    root = tmp_path_factory.mktemp("flux-files")
    configs = tiny_flow_configs("flux")
    tok = write_tiny_t5_tokenizer(root / "t5_tokenizer")  # where ComfyUI keeps it
    tokenizers = {"tokenizer_2": {p.name: p.read_text("utf-8") for p in tok.iterdir()}}
    meta = {EMBEDDED_CONFIG_KEY: json.dumps({"configs": configs, "tokenizers": tokenizers})}
    state = {k: v.to(torch.bfloat16) for k, v in flux_parts["transformer"].state_dict().items()}
    save_file(state, str(root / "flux1-tiny.safetensors"), metadata=meta)
    bare = {EMBEDDED_CONFIG_KEY: json.dumps({"configs": configs})}  # no tokenizer inside
    save_file(state, str(root / "flux1-bare.safetensors"), metadata=bare)
    clip = flux_parts["text_encoder"].state_dict()
    save_file(
        {f"text_model.{k}": v.half() for k, v in clip.items()}, str(root / "clip_l.safetensors")
    )
    t5 = {
        k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 and "shared" not in k else v)
        for k, v in flux_parts["text_encoder_2"].state_dict().items()
        if k != "encoder.embed_tokens.weight"
    }
    save_file(t5, str(root / "t5xxl_fp8_e4m3fn.safetensors"))
    vae = flux_parts["vae"]
    levels = len(vae.config.block_out_channels)
    ae = dict(_vae_ldm_item(k, v, levels) for k, v in vae.state_dict().items())
    ae = {k.removeprefix("first_stage_model."): v.contiguous() for k, v in ae.items()}
    save_file(ae, str(root / "ae.safetensors"))
    return {p.stem: p for p in root.glob("*.safetensors")}


def test_flux_from_separate_files(flux_files, flux_parts) -> None:
    files = {"clip_l": str(flux_files["clip_l"]), "t5xxl": str(flux_files["t5xxl_fp8_e4m3fn"])}
    model = load_model(
        str(flux_files["flux1-tiny"]),
        vae=str(flux_files["ae"]),
        encoder_files=files,
        dtype=torch.bfloat16,
    )
    assert (model.family, model.variant) == ("flux", "dev")
    assert type(model.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    for loaded, original in (
        (model.unet, flux_parts["transformer"]),
        (model.text_encoders[0], flux_parts["text_encoder"]),
        (model.vae, flux_parts["vae"]),
    ):
        got, want = loaded.state_dict(), original.state_dict()
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == torch.bfloat16
            torch.testing.assert_close(got[key].float(), want[key].to(torch.bfloat16).float(),
                                       rtol=1e-2, atol=1e-3)  # fmt: skip
    t5 = model.text_encoders[1].state_dict()
    expected = flux_parts["text_encoder_2"].state_dict()
    # fp8 weights come back as their fp8 values; the tied embedding is the shared one
    key = "encoder.block.0.layer.0.SelfAttention.q.weight"
    torch.testing.assert_close(
        t5[key].float(), expected[key].to(torch.float8_e4m3fn).to(torch.bfloat16).float()
    )
    assert torch.equal(t5["encoder.embed_tokens.weight"], t5["shared.weight"])
    ids = model.tokenizers[1]("red lfdemo, white background").input_ids
    assert ids[-1] == 1 and 2 not in ids  # </s> appended, every word known


def test_missing_parts_name_the_recipe_option(flux_files) -> None:
    with pytest.raises(ModelError, match=r"no VAE") as info:
        load_model(str(flux_files["flux1-tiny"]), encoder_files={})
    assert "model.vae" in str(info.value.hint)
    with pytest.raises(ModelError, match=r"no clip_l text encoder") as info:
        load_model(str(flux_files["flux1-tiny"]), vae=str(flux_files["ae"]))
    assert "model.clip_l" in str(info.value.hint)
    with pytest.raises(ModelError, match=r"not a t5xxl text encoder"):
        load_model(
            str(flux_files["flux1-tiny"]),
            vae=str(flux_files["ae"]),
            encoder_files={"clip_l": str(flux_files["clip_l"]), "t5xxl": str(flux_files["clip_l"])},
        )


@pytest.mark.parametrize(
    ("family", "variant", "encoders"), [("flux", "dev", 2), ("sd3", "5-large", 3)]
)
def test_diffusers_folders(family, variant, encoders, tmp_path) -> None:
    from loraforge.models.tiny_flow import write_tiny_flow_model

    folder = write_tiny_flow_model(family, tmp_path / family)
    model = load_model(str(folder))
    assert (model.family, model.variant) == (family, variant)
    assert len(model.text_encoders) == len(model.tokenizers) == encoders
    with pytest.raises(ModelError, match=r"model\.family sdxl"):
        load_model(str(folder), family="sdxl")


def test_t5_tokenizer_beside_the_t5_file(flux_files) -> None:
    files = {"clip_l": str(flux_files["clip_l"]), "t5xxl": str(flux_files["t5xxl_fp8_e4m3fn"])}
    model = load_model(
        str(flux_files["flux1-bare"]), vae=str(flux_files["ae"]), encoder_files=files
    )
    assert model.tokenizers[1]("red lfdemo").input_ids[-1] == 1


def test_sd3_one_file_with_its_encoders_and_vae(tmp_path) -> None:
    """An SD3.5 checkpoint that carries its text encoders (``text_encoders.clip_l.transformer.…``,
    SAI's layout) and VAE (``first_stage_model.…``) needs no other file."""
    from loraforge.models.single_file import EMBEDDED_CONFIG_KEY, _vae_ldm_item
    from loraforge.models.tiny_flow import (
        build_tiny_flow_components,
        tiny_flow_configs,
        write_tiny_t5_tokenizer,
    )

    parts = build_tiny_flow_components("sd3", seed=5)
    configs = tiny_flow_configs("sd3")
    tok = write_tiny_t5_tokenizer(tmp_path / "tok")
    tokenizers = {"tokenizer_3": {p.name: p.read_text("utf-8") for p in tok.iterdir()}}
    state = dict(parts["transformer"].state_dict())
    for slot, name in (
        ("clip_l", "text_encoder"),
        ("clip_g", "text_encoder_2"),
        ("t5xxl", "text_encoder_3"),
    ):
        for key, value in parts[name].state_dict().items():
            state[f"text_encoders.{slot}.transformer.{key}"] = value
    levels = len(parts["vae"].config.block_out_channels)
    for key, value in parts["vae"].state_dict().items():
        ldm_key, ldm_value = _vae_ldm_item(key, value, levels)
        state["first_stage_model." + ldm_key.removeprefix("first_stage_model.")] = ldm_value
    meta = {EMBEDDED_CONFIG_KEY: json.dumps({"configs": configs, "tokenizers": tokenizers})}
    path = tmp_path / "sd3.5-tiny.safetensors"
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(path), metadata=meta)
    model = load_model(str(path))
    assert (model.family, model.variant) == ("sd3", "5-large") and len(model.text_encoders) == 3
    for loaded, original in zip(
        (model.unet, model.vae, *model.text_encoders),
        (parts["transformer"], parts["vae"], parts["text_encoder"], parts["text_encoder_2"],
         parts["text_encoder_3"]),
        strict=True,
    ):  # fmt: skip
        want = original.state_dict()
        got = loaded.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), type(original).__name__


def _bfl_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers FLUX transformer's weights in BFL's layout (``flux1-dev.safetensors``), by the
    reference's names: fused ``qkv`` / ``linear1`` rows, ``shift, scale`` final modulation."""
    left, out = dict(state), {}

    def take(name: str) -> dict[str, torch.Tensor]:
        return {p: left.pop(f"{name}.{p}") for p in ("weight", "bias") if f"{name}.{p}" in left}

    def put(bfl: str, *names: str) -> None:
        parts = [take(n) for n in names]
        for p in parts[0]:
            out[f"{bfl}.{p}"] = torch.cat([part[p] for part in parts])

    emb = "time_text_embed."
    for bfl, diff in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                      ("guidance_in", "guidance_embedder")):  # fmt: skip
        put(f"{bfl}.in_layer", f"{emb}{diff}.linear_1")
        put(f"{bfl}.out_layer", f"{emb}{diff}.linear_2")
    put("txt_in", "context_embedder")
    put("img_in", "x_embedder")
    for i in range(1):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        put(b + "img_mod.lin", d + "norm1.linear")
        put(b + "txt_mod.lin", d + "norm1_context.linear")
        put(b + "img_attn.qkv", *(f"{d}attn.to_{x}" for x in "qkv"))
        put(b + "txt_attn.qkv", *(f"{d}attn.add_{x}_proj" for x in "qkv"))
        put(b + "img_attn.proj", d + "attn.to_out.0")
        put(b + "txt_attn.proj", d + "attn.to_add_out")
        for s, norm in (("img", "norm_"), ("txt", "norm_added_")):
            out[f"{b}{s}_attn.norm.query_norm.scale"] = left.pop(f"{d}attn.{norm}q.weight")
            out[f"{b}{s}_attn.norm.key_norm.scale"] = left.pop(f"{d}attn.{norm}k.weight")
        for s, ff in (("img", "ff"), ("txt", "ff_context")):
            put(f"{b}{s}_mlp.0", f"{d}{ff}.net.0.proj")
            put(f"{b}{s}_mlp.2", f"{d}{ff}.net.2")
    for i in range(1):
        b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        put(b + "linear1", *(f"{d}attn.to_{x}" for x in "qkv"), d + "proj_mlp")
        put(b + "linear2", d + "proj_out")
        put(b + "modulation.lin", d + "norm.linear")
        out[b + "norm.query_norm.scale"] = left.pop(d + "attn.norm_q.weight")
        out[b + "norm.key_norm.scale"] = left.pop(d + "attn.norm_k.weight")
    put("final_layer.linear", "proj_out")
    for p, value in take("norm_out.linear").items():  # diffusers: scale, shift
        scale, shift = value.chunk(2)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale])
    assert not left, sorted(left)[:5]  # every weight has its BFL name
    return out


@pytest.mark.slow
def test_full_width_flux_in_bfl_layout(full_width_flux, flux_files, tmp_path) -> None:
    """A BFL-layout transformer at FLUX's published width with fewer blocks than FLUX.1 (one
    double, one single) loads with its separate clip_l / t5xxl / ae files into the same weights.
    The file carries the published transformer config (19 + 38 blocks, as the shipped one) and
    the tiny encoders' configs: the block counts must come from the file's keys."""
    from loraforge.models.single_file import EMBEDDED_CONFIG_KEY
    from loraforge.models.tiny_flow import tiny_flow_configs
    from loraforge.recipe import parse_recipe_text
    from loraforge.training.build import load_base_model

    original = full_width_flux()
    state = _bfl_layout(original.state_dict())
    configs = tiny_flow_configs("flux")
    shipped = Path(__file__).parents[2] / "loraforge/models/configs/flux-dev/transformer"
    configs["transformer"] = json.loads((shipped / "config.json").read_text("utf-8"))
    assert (configs["transformer"]["num_layers"], configs["transformer"]["num_single_layers"]) == (
        19,
        38,
    )
    path = tmp_path / "flux1-narrow.safetensors"
    save_file(state, str(path), metadata={EMBEDDED_CONFIG_KEY: json.dumps({"configs": configs})})
    del state
    recipe = parse_recipe_text(
        f"model: {{base: {path}, family: flux, vae: {flux_files['ae']},\n"
        f"  clip_l: {flux_files['clip_l']}, t5xxl: {flux_files['t5xxl_fp8_e4m3fn']}}}\n"
        "dataset: {subsets: [{dir: d}]}\ntraining: {mixed_precision: bf16}\n",
        base_dir=tmp_path,
    )
    model = load_base_model(recipe)  # what `loraforge train` loads
    assert (model.family, model.variant) == ("flux", "dev")
    config = model.unet.config
    assert (config.num_layers, config.num_single_layers, config.joint_attention_dim) == (1, 1, 4096)
    got, want = model.unet.state_dict(), original.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == torch.bfloat16 and torch.equal(got[key], want[key]), key


def test_flux_block_counts_from_keys() -> None:
    from loraforge.models.flow_loading import flux_block_counts

    keys = ["model.diffusion_model.double_blocks.7.img_mod.lin.weight", "double_blocks.2.x",
            "single_blocks.37.linear1.weight", "img_in.weight", "single_blocks.x.y"]  # fmt: skip
    assert flux_block_counts(dict.fromkeys(keys)) == {"num_layers": 8, "num_single_layers": 38}
    assert flux_block_counts({"img_in.weight": None}) == {}
