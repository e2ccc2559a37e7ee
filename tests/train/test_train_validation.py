"""Validation loss, the best checkpoint and early stopping, on the tiny SD1 model.

The validation loss is checked against a computation written here from the formulas (VAE
posterior sample, DDPM forward process at the fixed timestep grid, epsilon MSE), not with the
code under test.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from loraforge.recipe import load_recipe
from loraforge.training.run import run_training
from loraforge.training.setup import setup_run

from .conftest import train_quietly


@pytest.fixture(scope="module")
def held_out_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three drawn images in a folder of their own (held out with ``is_validation``)."""
    from loraforge.demo import write_demo_images

    root = tmp_path_factory.mktemp("held_out") / "val"
    write_demo_images(root, count=3)
    return root


def _validation_subsets(shapes: Path, held_out: Path, **train) -> dict:
    return {
        "subsets": [{"dir": str(shapes), **train}, {"dir": str(held_out), "is_validation": True}]
    }


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def _independent_loss(run, timesteps: list[int]) -> float:
    """The mean over held-out images and timesteps of ``mean((unet(x_t, t) - eps)^2)``."""
    from loraforge.data.cache import centre_pixels, entry_generator
    from loraforge.models.prompts import encode_prompts

    setup = run.loss_setup
    cond = setup.conditioning
    alphas = setup.schedule.scheduler.alphas_cumprod.double()
    run.network.eval()
    losses = []
    with torch.no_grad():
        for planned in run.data.plan.validation:
            key = planned.record.key
            pixels = centre_pixels(planned)[None]
            posterior = cond.vae.encode(pixels).latent_dist
            latents = posterior.sample(generator=entry_generator(cond.vae, 7, key))
            latents = latents * cond.vae.config.scaling_factor
            hidden = encode_prompts(
                cond.text_encoders, cond.tokenizers, "sd1", [planned.record.caption]
            ).hidden
            seed = random.Random(f"loraforge:validation:{key}").getrandbits(63)
            noise = torch.randn(latents.shape, generator=torch.Generator("cpu").manual_seed(seed))
            for t in timesteps:
                a = alphas[t]
                noisy = (a.sqrt() * latents + (1 - a).sqrt() * noise).float()
                pred = setup.unet(noisy, torch.tensor([t]), encoder_hidden_states=hidden).sample
                losses.append(float(((pred.float() - noise) ** 2).mean()))
    run.network.train()
    return sum(losses) / len(losses)


def test_validation_loss_matches_an_independent_computation(
    write_recipe, shapes_dataset, held_out_dataset
) -> None:
    recipe = load_recipe(
        write_recipe(
            {
                "dataset": _validation_subsets(shapes_dataset, held_out_dataset),
                # dropout and rank dropout would change the loss if validation ran in train mode
                "network": {"dropout": 0.5, "rank_dropout": 0.5, "module_dropout": 0.5},
                "training": {"min_timestep": 100, "max_timestep": 900},
            }
        )
    )
    run = setup_run(recipe)
    assert run.validator is not None and run.validator.timesteps == (260, 420, 580, 740)
    assert run.validator.num_images == 3
    # train a little so the LoRA is not zero and its dropout would matter
    train_quietly(run)
    value = run.validator.loss(run.network, run.optimizer, run.accelerator.autocast)
    assert run.network.training  # train mode restored
    expected = _independent_loss(run, [260, 420, 580, 740])
    assert value == pytest.approx(expected, rel=1e-5)
    # deterministic: the same weights give the same number
    again = run.validator.loss(run.network, run.optimizer, run.accelerator.autocast)
    assert again == value


def test_cached_and_live_latents_give_the_same_validation_loss(
    write_recipe, shapes_dataset, held_out_dataset, tmp_path
) -> None:
    values = []
    for latents in ("none", "memory"):
        recipe = load_recipe(
            write_recipe(
                {
                    "dataset": _validation_subsets(shapes_dataset, held_out_dataset),
                    "cache": {"latents": latents},
                    "training": {"batch_size": 2 if latents == "none" else 3},
                },
                name=f"{latents}.yaml",
                out=tmp_path / latents,
            )
        )
        run = setup_run(recipe)
        values.append(run.validator.loss(run.network, run.optimizer, run.accelerator.autocast))
    # the batch size differs too: every (image, timestep) counts once whatever the batching
    assert values[0] == pytest.approx(values[1], rel=1e-5)


def test_validation_split_holds_images_out_of_training(write_recipe, tmp_path) -> None:
    recipe = load_recipe(
        write_recipe(
            {
                "dataset": {"validation_split": 0.34},
                "training": {"max_train_steps": 2, "validate_every_n_steps": 1},
            }
        )
    )
    run = setup_run(recipe)
    held = {p.record.path for p in run.data.plan.validation}
    trained = {p.record.path for p in run.data.plan.images}
    assert len(held) == 2 and len(trained) == 4 and not held & trained
    result = train_quietly(run)
    meta = _metadata(result.final_path)
    assert meta["ss_num_validation_images"] == "2"
    assert meta["ss_validation_split"] == "0.34"
    assert meta["ss_validation_step"] == "2"
    assert float(meta["ss_validation_loss"]) > 0
    # the metrics file has one validation record per validation (the epoch end at step 2 is
    # not validated twice), the last one the file's
    from loraforge.training.metrics import read_metrics

    records = read_metrics(tmp_path / "out" / "t-metrics.jsonl")
    validations = [r for r in records if r["kind"] == "validation"]
    assert [r["step"] for r in validations] == [1, 2]
    assert validations[-1]["validation_loss"] == float(meta["ss_validation_loss"])
    assert validations[-1]["best_step"] in (1, 2)


def test_keep_best_writes_the_lowest_validation_loss_and_rotation_keeps_it(
    write_recipe, shapes_dataset, held_out_dataset, tmp_path
) -> None:
    recipe = load_recipe(
        write_recipe(
            {
                "dataset": _validation_subsets(shapes_dataset, held_out_dataset),
                "training": {"max_train_steps": 6, "validate_every_n_steps": 1},
                "output": {"keep_best": True, "save_every_n_steps": 1, "save_last_n": 1},
            }
        )
    )
    run = setup_run(recipe)
    seen: list[tuple[int, float]] = []
    original = run.validator.loss

    def recording(*args, **kwargs):
        value = original(*args, **kwargs)
        seen.append((len(seen) + 1, value))
        return value

    run.validator.loss = recording  # type: ignore[method-assign]
    train_quietly(run)
    out = tmp_path / "out"
    best_step, best_loss = min(seen, key=lambda s: (s[1], s[0]))
    best = out / "t-best.safetensors"
    assert best.is_file()
    meta = _metadata(best)
    assert meta["ss_steps"] == str(best_step) == meta["ss_validation_step"]
    assert float(meta["ss_validation_loss"]) == best_loss
    # save_last_n: 1 left one numbered file, and the best file
    assert sorted(p.name for p in out.glob("t-*.safetensors")) == [
        "t-best.safetensors",
        "t-step00000005.safetensors",
    ]
    assert _metadata(out / "t.safetensors")["ss_validation_step"] == "6"


def test_early_stopping_stops_and_saves_as_at_the_end(
    write_recipe, shapes_dataset, held_out_dataset, tmp_path
) -> None:
    recipe = load_recipe(
        write_recipe(
            {
                "dataset": _validation_subsets(shapes_dataset, held_out_dataset),
                "training": {
                    "max_train_steps": 20,
                    "validate_every_n_steps": 2,
                    # nothing improves by 1000: the second and third validations count
                    "early_stopping": {"patience": 2, "min_delta": 1000.0},
                },
                "output": {"save_state": True},
            }
        )
    )
    result = run_training(recipe)
    assert result.stopped_early and not result.interrupted
    assert result.progress.global_step == 6
    out = tmp_path / "out"
    assert result.final_path == out / "t.safetensors"
    assert _metadata(result.final_path)["ss_steps"] == "6"
    state = json.loads((out / "t-state" / "state.json").read_text())
    assert state["progress"]["global_step"] == 6
    validation = state["extra"]["validation"]
    assert validation["since_improvement"] == 2 and validation["best_step"] in (2, 4, 6)
    assert validation["last_step"] == 6


def test_validation_without_a_held_out_image_is_an_error(write_recipe) -> None:
    from loraforge.errors import DatasetError

    # 6 images x 0.05 rounds to 0 held-out images
    recipe = load_recipe(write_recipe({"dataset": {"validation_split": 0.05}}))
    with pytest.raises(DatasetError, match="no image is held out"):
        setup_run(recipe)


def test_sdxl_validation_conditions_on_the_held_out_sizes(
    tmp_path, make_recipe, tiny_sdxl_dir
) -> None:
    """SDXL's size/crop ids come from each held-out image's own size and bucket."""
    recipe = load_recipe(
        make_recipe(
            tmp_path,
            {"dataset": {"validation_split": 0.5}, "training": {"batch_size": 3}},
            model=tiny_sdxl_dir,
        )
    )
    run = setup_run(recipe)
    first = run.validator.loss(run.network, run.optimizer, run.accelerator.autocast)
    assert first > 0 and first == run.validator.loss(
        run.network, run.optimizer, run.accelerator.autocast
    )
    from loraforge.training.validation import batch_inputs

    batch = run.validator.batches[0]
    inputs = batch_inputs(batch)
    planned = batch.images[0]
    width, height = planned.record.size
    assert inputs["original_sizes_hw"][0].tolist() == [height, width]
    assert inputs["target_sizes_hw"][0].tolist() == list(reversed(planned.assignment.bucket))


def test_with_ema_the_validation_loss_is_that_of_the_averaged_weights(
    write_recipe, shapes_dataset, held_out_dataset
) -> None:
    recipe = load_recipe(
        write_recipe(
            {
                "dataset": _validation_subsets(shapes_dataset, held_out_dataset),
                "training": {
                    "max_train_steps": 3,
                    "validate_every_n_steps": 1,
                    "learning_rate": 1e-2,
                    "ema": {"decay": 0.5, "warmup": False},
                },
            }
        )
    )
    run = setup_run(recipe)
    seen: list[bool] = []
    original = run.validator.loss

    def recording(network, *args, **kwargs):
        params = dict(network.named_parameters())
        seen.append(all(torch.equal(params[n], a) for n, a in run.ema.average.items()))
        return original(network, *args, **kwargs)

    run.validator.loss = recording  # type: ignore[method-assign]
    train_quietly(run)
    # the files hold the average, so the loss that picks the best file is the average's
    assert seen == [True, True, True]
    raw = {n: p.detach().clone() for n, p in run.network.named_parameters()}
    assert any(not torch.equal(raw[n], a) for n, a in run.ema.average.items())
