"""Loading the tiny models from folders and single files, offline; detection and refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraforge.errors import ModelError
from loraforge.models.families import (
    Detection,
    detect_family_from_configs,
    detect_family_from_keys,
    resolve_family,
)
from loraforge.models.loading import load_model
from loraforge.models.single_file import detect_checkpoint_family
from loraforge.models.tiny import build_tiny_components


def _same_weights(module: torch.nn.Module, reference: torch.nn.Module) -> bool:
    got, want = module.state_dict(), reference.state_dict()
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("family", ["sd1", "sd2-v", "sdxl"])
@pytest.mark.parametrize("kind", ["dir", "file"])
def test_tiny_models_load_with_the_weights_written(family, kind, request) -> None:
    base = request.getfixturevalue(f"tiny_{family.replace('-', '')}_{kind}")
    model = load_model(str(base))
    reference = build_tiny_components(family, seed=0)
    assert model.family == family
    assert model.v_prediction is (family == "sd2-v") and model.prediction_known
    prediction = "v_prediction" if family == "sd2-v" else "epsilon"
    assert model.noise_scheduler.config.prediction_type == prediction
    assert type(model.noise_scheduler).__name__ == "DDPMScheduler"
    assert _same_weights(model.unet, reference["unet"])
    assert _same_weights(model.vae, reference["vae"])
    names = ["text_encoder", "text_encoder_2"][: len(model.text_encoders)]
    assert len(names) == (2 if family == "sdxl" else 1) == len(model.tokenizers)
    for encoder, name in zip(model.text_encoders, names, strict=True):
        assert _same_weights(encoder, reference[name])
    assert not any(p.requires_grad for p in model.unet.parameters())
    assert model.model_identity == model.vae_identity


def test_dtype_is_applied(tiny_sd1_file) -> None:
    model = load_model(str(tiny_sd1_file), dtype=torch.bfloat16)
    assert next(model.unet.parameters()).dtype == torch.bfloat16
    assert next(model.text_encoders[0].parameters()).dtype == torch.bfloat16


def test_family_mismatch_says_what_was_found(tiny_sd1_dir, tiny_sdxl_file) -> None:
    with pytest.raises(ModelError, match=r"model.family sdxl but the model is sd1") as info:
        load_model(str(tiny_sd1_dir), family="sdxl")
    assert "sd1" in (info.value.hint or "")
    with pytest.raises(ModelError, match=r"says model.family sd2 but the model is sdxl"):
        load_model(str(tiny_sdxl_file), family="sd2")


def test_explicit_matching_family_loads(tiny_sdxl_dir) -> None:
    assert load_model(str(tiny_sdxl_dir), family="sdxl").family == "sdxl"


def test_pickle_is_refused_without_opt_in(tiny_sd1_file, tmp_path) -> None:
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(tiny_sd1_file)}, ckpt)
    with pytest.raises(ModelError, match="pickle") as info:
        load_model(str(ckpt))
    assert "allow_pickle" in (info.value.hint or "")


def test_pickle_with_opt_in_is_read_with_weights_only(tiny_sd1_file, tmp_path) -> None:
    from loraforge.models.single_file import read_checkpoint

    state = load_file(tiny_sd1_file)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": state}, ckpt)
    got, metadata = read_checkpoint(ckpt, allow_pickle=True)
    assert got.keys() == state.keys() and metadata == {}
    assert all(torch.equal(got[k], state[k]) for k in state)
    # a .ckpt cannot carry the tiny configs, so it is read with the published SD 1.5
    # architecture, which the tiny weights do not fit: a ModelError, not a crash
    with pytest.raises(ModelError, match="as a sd1 model"):
        load_model(str(ckpt), allow_pickle=True)


def test_pickle_with_code_is_rejected_even_with_opt_in(tmp_path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": Evil()}}, ckpt)
    with pytest.raises(ModelError, match="weights_only"):
        load_model(str(ckpt), allow_pickle=True)


def test_missing_and_non_model_paths(tmp_path) -> None:
    with pytest.raises(ModelError, match="not found"):
        load_model(str(tmp_path / "nope.safetensors"))
    with pytest.raises(ModelError, match=r"model_index\.json"):
        load_model(str(tmp_path))
    junk = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(junk))
    with pytest.raises(ModelError, match="not a Stable Diffusion"):
        load_model(str(junk))


def test_hub_id_offline_is_a_clear_error() -> None:
    with pytest.raises(ModelError, match="hub") as info:
        load_model("loraforge-test/definitely-not-cached-model")
    assert "HF_HUB_OFFLINE" in (info.value.hint or "")


def test_vae_override_from_folder_and_file(tiny_sd1_dir, tmp_path) -> None:
    other = build_tiny_components("sd1", seed=7)["vae"]
    folder = tmp_path / "vae"
    other.save_pretrained(folder)
    model = load_model(str(tiny_sd1_dir), vae=str(folder))
    assert _same_weights(model.vae, other)
    assert model.vae_identity != model.model_identity
    # a diffusers-layout single VAE file
    file = tmp_path / "vae.safetensors"
    save_file(other.state_dict(), str(file))
    assert _same_weights(load_model(str(tiny_sd1_dir), vae=str(file)).vae, other)


def test_vae_override_ldm_layout_file(tiny_sd1_dir, tiny_sdxl_file, tmp_path) -> None:
    # cut the VAE out of a single-file checkpoint: LDM keys `first_stage_model.encoder.down.0…`
    state = load_file(tiny_sdxl_file)
    vae_state = {
        k[len("first_stage_model.") :]: v
        for k, v in state.items()
        if k.startswith("first_stage_model.")
    }
    file = tmp_path / "sdxl_vae.safetensors"
    save_file(vae_state, str(file))
    model = load_model(str(tiny_sd1_dir), vae=str(file))
    assert _same_weights(model.vae, build_tiny_components("sdxl", seed=0)["vae"])


def test_missing_vae_override(tiny_sd1_dir, tmp_path) -> None:
    with pytest.raises(ModelError, match="VAE not found"):
        load_model(str(tiny_sd1_dir), vae=str(tmp_path / "missing.safetensors"))


def test_identity_changes_when_weights_change(tiny_sd1_dir, tmp_path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_sd1_dir, copy)
    from loraforge.models.loading import weights_identity

    before = weights_identity(copy)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    save_file({k: v + 1 if k == "conv_in.bias" else v for k, v in state.items()}, str(weights))
    assert weights_identity(copy) != before


def test_detect_from_configs() -> None:
    sd15 = {"cross_attention_dim": 768}
    sd2 = {"cross_attention_dim": 1024, "use_linear_projection": True}
    assert detect_family_from_configs({"text_encoder": []}, sd15, None).family == "sd1"
    eps = {"prediction_type": "epsilon"}
    assert detect_family_from_configs({"text_encoder": []}, sd2, eps).family == "sd2"
    v = {"prediction_type": "v_prediction"}
    assert detect_family_from_configs({"text_encoder": []}, sd2, v).family == "sd2-v"
    xl = {"text_encoder": [], "text_encoder_2": []}
    assert (
        detect_family_from_configs(xl, {"addition_embed_type": "text_time"}, None).family == "sdxl"
    )
    with pytest.raises(ModelError, match="refiner"):
        detect_family_from_configs(
            {"text_encoder_2": []}, {"addition_embed_type": "text_time"}, None
        )


def test_detect_from_keys() -> None:
    sd2 = {"cond_stage_model.model.token_embedding.weight": torch.zeros(1)}
    found = detect_family_from_keys(sd2)
    assert (found.family, found.prediction_known) == ("sd2", False)
    assert detect_family_from_keys({**sd2, "v_pred": torch.zeros(0)}).family == "sd2-v"
    attn2 = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    unet_only = {attn2: torch.zeros(320, 768)}
    assert detect_family_from_keys(unet_only).family == "sd1"
    with pytest.raises(ModelError, match="refiner"):
        detect_family_from_keys({"conditioner.embedders.0.model.text_projection": torch.zeros(1)})


def test_checkpoint_written_by_loraforge_says_epsilon_or_v(tiny_sd2v_file) -> None:
    sd2 = {"cond_stage_model.model.token_embedding.weight": torch.zeros(1)}
    unmarked = detect_checkpoint_family(sd2, None, source="x")
    assert (unmarked.family, unmarked.prediction_known) == ("sd2", False)
    for written_as in ("sd2", "sd2-v"):
        found = detect_checkpoint_family(sd2, {"family": written_as}, source="x")
        assert (found.family, found.prediction_known) == (written_as, True)
    sdxl = {"conditioner.embedders.1.model.positional_embedding": torch.zeros(1)}
    assert detect_checkpoint_family(sdxl, {"family": "sd2-v"}, source="x").family == "sdxl"
    with pytest.raises(ModelError, match=r"says model\.family sd2 but the model is sd2-v"):
        load_model(str(tiny_sd2v_file), family="sd2")


def test_resolve_family_trusts_the_recipe_on_unknown_prediction() -> None:
    unknown = Detection("sd2", False, "OpenCLIP")
    assert resolve_family("sd2-v", unknown, source="x") == "sd2-v"
    assert resolve_family("auto", unknown, source="x") == "sd2"
    known = Detection("sd2", True, "scheduler says epsilon")
    with pytest.raises(ModelError, match="sd2-v"):
        resolve_family("sd2-v", known, source="x")


def test_shipped_architecture_configs_build_real_sizes() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from loraforge.models.configs import architecture_config_dir

    expected_unet = {
        "sd1": 859_520_964,
        "sd2": 865_910_724,
        "sd2-v": 865_910_724,
        "sdxl": 2_567_463_684,
    }
    for family, count in expected_unet.items():
        folder = architecture_config_dir(family)
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(folder / "unet")
            )
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        assert sum(p.numel() for p in unet.parameters()) == count, family
        assert sum(p.numel() for p in vae.parameters()) == 83_653_863, family
        index = json.loads((folder / "model_index.json").read_text())
        assert ("text_encoder_2" in index) == (family == "sdxl")


def test_architecture_config_dir_unknown_family() -> None:
    from loraforge.models.configs import architecture_config_dir

    with pytest.raises(ValueError, match="family"):
        architecture_config_dir("sd3")
    assert isinstance(architecture_config_dir("sd1"), Path)


def test_loading_draws_no_library_progress_bars(tiny_sd1_dir, capfd) -> None:
    import warnings

    from transformers.utils import logging as transformers_logging

    with warnings.catch_warnings():  # conftest sets HF_HUB_DISABLE_PROGRESS_BARS; the hub warns
        warnings.simplefilter("ignore")
        transformers_logging.enable_progress_bar()
    capfd.readouterr()
    load_model(str(tiny_sd1_dir))
    captured = capfd.readouterr()
    assert "Loading" not in captured.err + captured.out
    assert transformers_logging.is_progress_bar_enabled()  # restored afterwards


@pytest.mark.parametrize(
    ("family", "index", "pad_id"),
    [("sd1", 0, 49407), ("sd2-v", 0, 0), ("sdxl", 0, 49407), ("sdxl", 1, 0)],
)
def test_published_configs_tokenise_offline_with_clips_vocabulary(family, index, pad_id) -> None:
    # What single-file checkpoints without embedded configs use (no hub, no cache).
    from loraforge.models.configs import architecture_config_dir
    from loraforge.models.loading import _tokenizer_for

    tokenizer = _tokenizer_for(family, index, architecture_config_dir(family))
    assert len(tokenizer) == 49408
    # OpenAI CLIP's ids for this caption, as published with CLIP
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tokenizer("a cat", padding="max_length", max_length=77)["input_ids"]
    assert len(padded) == 77 and padded[-1] == pad_id


def test_unmarked_sd2_single_file_is_epsilon_unless_the_recipe_says_v(
    tiny_sd2v_file, tmp_path
) -> None:
    # Like a real SD 2.x checkpoint: nothing in the file says epsilon or v.
    from safetensors import safe_open
    from safetensors.torch import save_file

    from loraforge.models.single_file import EMBEDDED_CONFIG_KEY

    with safe_open(str(tiny_sd2v_file), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
        embedded = json.loads(f.metadata()[EMBEDDED_CONFIG_KEY])
    del embedded["family"]
    unmarked = tmp_path / "sd2.safetensors"
    save_file(tensors, str(unmarked), metadata={EMBEDDED_CONFIG_KEY: json.dumps(embedded)})
    assumed = load_model(str(unmarked))
    assert (assumed.family, assumed.v_prediction, assumed.prediction_known) == ("sd2", False, False)
    told = load_model(str(unmarked), family="sd2-v")
    assert (told.family, told.v_prediction, told.prediction_known) == ("sd2-v", True, True)


def _with_pickled_text_encoder(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    encoder = target / "text_encoder"
    for weights in encoder.glob("*.safetensors"):
        weights.unlink()
    torch.save({"w": torch.zeros(1)}, encoder / "pytorch_model.bin")
    return target


def test_pickled_weights_are_refused_before_loading_with_the_opt_in_named(
    tiny_sd1_dir: Path, tmp_path: Path, capsys
) -> None:
    """Issue 17: a diffusers folder whose text_encoder has only pytorch_model.bin made train try
    to unpickle it (a traceback), and check/--dry-run accepted a .ckpt model.base."""
    from loraforge.cli import main

    folder = _with_pickled_text_encoder(tiny_sd1_dir, tmp_path / "model")
    with pytest.raises(ModelError, match=r"text_encoder/pytorch_model\.bin is a pickle") as info:
        load_model(str(folder))
    assert "model.allow_pickle: true" in info.value.hint
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    (tmp_path / "data").mkdir()
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "data" / "a.png")
    for base, allow in ((folder, False), (ckpt, False), (ckpt, True)):
        recipe = tmp_path / "r.yaml"
        recipe.write_text(
            f"model: {{base: '{base}', allow_pickle: {str(allow).lower()}}}\n"
            "dataset: {subsets: [{dir: data}]}\n"
        )
        capsys.readouterr()
        with pytest.raises(SystemExit):
            main(["check", str(recipe), "--format", "json"])
        problems = json.loads(capsys.readouterr().out)[0]["problems"]
        pickled = [p for p in problems if p["path"] == "model.base" and "pickle" in p["message"]]
        assert bool(pickled) is not allow, problems
        if not allow:
            assert pickled[0]["severity"] == "error" and "allow_pickle" in pickled[0]["hint"]
            with pytest.raises(SystemExit) as exit_info:
                main(["train", str(recipe), "--dry-run"])
            assert exit_info.value.code == 2
            assert "allow_pickle" in capsys.readouterr().err
