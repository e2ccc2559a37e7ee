"""Training options end to end on the tiny model: precisions, fp8 base weights, activation
checkpointing, max-norm, stopping the text encoder, cached text, LyCORIS, TensorBoard."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraforge.recipe import load_recipe
from loraforge.training.run import run_training
from loraforge.training.setup import setup_run

from .conftest import train_quietly


def _train_quietly(recipe_path: Path):
    run = setup_run(load_recipe(recipe_path))
    return run, train_quietly(run)


@pytest.mark.parametrize(
    "training",
    [
        {"mixed_precision": "bf16"},
        {"mixed_precision": "bf16", "fp8_base": True},
        {"mixed_precision": "bf16", "full_bf16": True},
    ],
    ids=["bf16", "fp8-base", "full-bf16"],
)
def test_reduced_precisions_train_on_the_cpu(write_recipe, training) -> None:
    run, result = _train_quietly(write_recipe({"training": {"max_train_steps": 2, **training}}))
    assert all(math.isfinite(x) for x in result.losses) and result.final_path.is_file()
    to_q = run.loss_setup.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    norm = run.loss_setup.unet.down_blocks[1].resnets[0].norm1
    expected = torch.float8_e4m3fn if training.get("fp8_base") else torch.bfloat16
    assert to_q.weight.dtype == expected and norm.weight.dtype == torch.bfloat16
    network_dtype = torch.bfloat16 if training.get("full_bf16") else torch.float32
    assert {p.dtype for p in run.network.parameters()} == {network_dtype}


def test_activation_checkpointing_changes_nothing_but_memory(write_recipe, tmp_path) -> None:
    plain = write_recipe({"training": {"max_train_steps": 2}}, name="a.yaml", out=tmp_path / "a")
    ckpt = write_recipe(
        {"training": {"max_train_steps": 2, "gradient_checkpointing": True}},
        name="b.yaml",
        out=tmp_path / "b",
    )
    a, b = run_training(load_recipe(plain)), run_training(load_recipe(ckpt))
    assert a.losses == pytest.approx(b.losses, rel=1e-6)
    wa, wb = load_file(str(a.final_path)), load_file(str(b.final_path))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-6, rtol=1e-5)


def test_max_norm_keeps_every_module_under_the_limit_and_says_so(write_recipe, capsys) -> None:
    limit = 0.01
    recipe = write_recipe(
        {"training": {"max_train_steps": 2, "learning_rate": 1e-2, "scale_weight_norms": limit}}
    )
    result = run_training(load_recipe(recipe))
    tensors = load_file(str(result.final_path))
    for key in (k for k in tensors if k.endswith("lora_down.weight")):
        name = key.removesuffix(".lora_down.weight")
        down, up = tensors[key], tensors[f"{name}.lora_up.weight"]
        delta = up.flatten(1) @ down.flatten(1) * float(tensors[f"{name}.alpha"]) / down.shape[0]
        assert float(delta.norm()) <= limit * 1.001
    assert "keys scaled" in " ".join(capsys.readouterr().err.split())


def test_stop_text_encoder_training_freezes_its_weights(write_recipe) -> None:
    recipe = write_recipe(
        {
            "training": {
                "max_train_steps": 3,
                "learning_rate": 1e-2,
                "stop_text_encoder_training": 1,
            },
            "output": {"save_every_n_steps": 1},
        }
    )
    result = run_training(load_recipe(recipe))
    after_one = load_file(str(result.final_path.parent / "t-step00000001.safetensors"))
    final = load_file(str(result.final_path))
    te = [k for k in final if k.startswith("lora_te_")]
    unet = [k for k in final if k.startswith("lora_unet_") and "lora_up" in k]
    assert te and all(torch.equal(after_one[k], final[k]) for k in te)
    assert any(not torch.equal(after_one[k], final[k]) for k in unet)


@pytest.mark.slow
def test_cached_text_and_latents_with_a_lycoris_network(write_recipe) -> None:
    recipe = write_recipe(
        {
            "cache": {"latents": "disk", "text_encoder_outputs": "memory"},
            "network": {"backend": "lycoris", "algorithm": "loha", "train_text_encoder": False},
            "training": {"max_train_steps": 2},
            "sample": {
                "every_n_steps": 2,
                "steps": 2,
                "width": 64,
                "height": 64,
                "prompts": [{"prompt": "new words"}],
            },
        }
    )
    result = run_training(load_recipe(recipe))
    tensors = load_file(str(result.final_path))
    assert any(k.endswith("hada_w1_a") for k in tensors)
    assert not any(k.startswith("lora_te") for k in tensors)
    assert any((result.final_path.parent / "cache" / "latents").iterdir())
    assert len(list((result.final_path.parent / "sample").glob("t_0*.png"))) == 1


@pytest.mark.slow
def test_tensorboard_logs_losses_learning_rates_and_samples(write_recipe, tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = write_recipe(
        {
            "training": {"max_train_steps": 2},
            "logging": {"log_with": "tensorboard"},
            "sample": {
                "every_n_steps": 2,
                "steps": 2,
                "width": 64,
                "height": 64,
                "prompts": [{"prompt": "a shape"}],
            },
        }
    )
    run_training(load_recipe(recipe))
    (run_dir,) = (tmp_path / "out" / "logs").iterdir()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss/current", "loss/average", "lr/unet", "lr/textencoder", "loss/epoch"} <= scalars
    assert [e.step for e in events.Scalars("loss/current")] == [1, 2]
    assert events.Tags()["images"] == ["samples/00"]
    assert len(list((tmp_path / "out" / "sample").glob("t_000002_00_*.png"))) == 1


def test_network_weights_continue_from_an_existing_lora(write_recipe, tmp_path) -> None:
    first = run_training(
        load_recipe(
            write_recipe(
                {"training": {"max_train_steps": 2, "learning_rate": 1e-2}},
                name="a.yaml",
                out=tmp_path / "a",
            )
        )
    )
    trained = load_file(str(first.final_path))
    assert any(float(t.abs().sum()) > 0 for k, t in trained.items() if "lora_up" in k)
    assert any(float(t.abs().sum()) > 0 for k, t in trained.items() if k.startswith("lora_te_"))
    # the same file with lycoris-lora's transformers-5 text-encoder names continues the same way
    flat = tmp_path / "flat.safetensors"
    save_file({k.replace("lora_te_text_model_", "lora_te_"): t for k, t in trained.items()}, flat)

    for weights in (first.final_path, flat):
        # continue with a learning rate that cannot move the weights: the file comes back out
        again = write_recipe(
            {
                "network": {"weights": str(weights)},
                "training": {"max_train_steps": 1, "learning_rate": 1e-12},
            },
            name=f"{weights.stem}.yaml",
            out=tmp_path / f"from-{weights.stem}",
        )
        continued = load_file(str(run_training(load_recipe(again)).final_path))
        assert continued.keys() == trained.keys()
        for key in trained:
            torch.testing.assert_close(continued[key], trained[key], atol=1e-7, rtol=1e-5)


def test_samples_take_per_prompt_settings_and_show_the_training(write_recipe, tmp_path) -> None:
    from PIL import Image

    recipe = write_recipe(
        {
            "training": {"max_train_steps": 4, "learning_rate": 3e-2},
            "sample": {
                "every_n_steps": 2,
                "steps": 2,
                "width": 64,
                "height": 64,
                "prompts": [
                    {"prompt": "a shape", "width": 64, "height": 128, "seed": 5, "cfg_scale": 3},
                    {"prompt": "a shape", "negative": "blur", "seed": 5, "steps": 3},
                ],
            },
        }
    )
    run_training(load_recipe(recipe))
    folder = tmp_path / "out" / "sample"
    tall = [Image.open(folder / f"t_00000{step}_00_5.png") for step in (2, 4)]
    square = [Image.open(folder / f"t_00000{step}_01_5.png") for step in (2, 4)]
    assert {image.size for image in tall} == {(64, 128)}
    assert {image.size for image in square} == {(64, 64)}
    # same prompt and seed, frozen base model: only the trained network can change the image
    for early, late in (tall, square):
        assert early.tobytes() != late.tobytes()
