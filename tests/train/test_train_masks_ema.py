"""Masked loss and the weight average (EMA) in real ``train`` runs on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from loraforge.recipe import load_recipe
from loraforge.training.run import run_training

GREY = 204  # a uniform mask of 204/255 = 0.8


@pytest.fixture(scope="module")
def grey_masks(shapes_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mask folder with a uniform grey mask per image of the drawn dataset."""
    folder = tmp_path_factory.mktemp("masks")
    for image in sorted(shapes_dataset.rglob("*.png")):
        with Image.open(image) as opened:
            size = opened.size
        Image.new("RGB", size, (GREY, 0, 255)).save(folder / f"{image.stem}.png")  # red = weight
    return folder


@pytest.mark.parametrize("latents", ["none", "memory"])
def test_a_uniform_mask_scales_the_loss_by_its_weight(
    write_recipe, tmp_path, grey_masks, latents
) -> None:
    """The first step's loss (same batch, noise and weights) is the mask weight times the
    unmasked one, from live latents and from cached ones."""
    base = {"training": {"max_train_steps": 1}, "cache": {"latents": latents}}
    masked = {
        **base,
        "training": {"max_train_steps": 1, "masked_loss": True},
        "dataset": {"subsets": [{"conditioning_data_dir": str(grey_masks)}]},
    }
    plain = run_training(load_recipe(write_recipe(base, name="a.yaml", out=tmp_path / "a")))
    weighted = run_training(load_recipe(write_recipe(masked, name="b.yaml", out=tmp_path / "b")))
    assert weighted.losses[0] == pytest.approx(plain.losses[0] * GREY / 255, rel=1e-5)


def test_opaque_alpha_masks_train_exactly_as_without_masks(write_recipe, tmp_path) -> None:
    """The drawn images have no transparency: a fully opaque mask changes nothing."""
    steps = {"training": {"max_train_steps": 2}}
    alpha = {
        "training": {"max_train_steps": 2, "masked_loss": True},
        "dataset": {"subsets": [{"alpha_mask": True}]},
    }
    plain = run_training(load_recipe(write_recipe(steps, name="a.yaml", out=tmp_path / "a")))
    masked = run_training(load_recipe(write_recipe(alpha, name="b.yaml", out=tmp_path / "b")))
    assert plain.losses == masked.losses
    a, b = load_file(str(plain.final_path)), load_file(str(masked.final_path))
    assert all(torch.equal(a[k], b[k]) for k in a)


DECAY, START = 0.8, 2


def test_saved_files_hold_the_average_of_the_raw_weights(write_recipe, tmp_path) -> None:
    """Files hold the EMA of the raw weights saved next to them (``-raw``), computed here in
    float64 from the rules: a copy up to ``start_step``, then ``ema = d ema + (1 - d) raw``."""
    ema = {"decay": DECAY, "warmup": False, "start_step": START, "save_raw": True}
    overrides = {
        "training": {"max_train_steps": 5, "ema": ema},
        "output": {"save_every_n_steps": 1, "save_last_n": 3},
    }
    out = tmp_path / "out"
    run_training(load_recipe(write_recipe(overrides, out=out)))
    # keep-last-3 rotates the raw files with their averaged ones
    kept = sorted(p.name for p in out.glob("t-step*.safetensors"))
    names = {s: f"t-step{s:08d}" for s in (2, 3, 4)}
    suffixes = ("-raw.safetensors", ".safetensors")
    assert kept == sorted(f"{n}{x}" for n in names.values() for x in suffixes)

    raw = {s: load_file(str(out / f"{n}-raw.safetensors")) for s, n in names.items()}
    raw[5] = load_file(str(out / "t-raw.safetensors"))
    files = {s: load_file(str(out / f"{n}.safetensors")) for s, n in names.items()}
    files[5] = load_file(str(out / "t.safetensors"))
    assert all(torch.equal(files[2][k], raw[2][k]) for k in raw[2])  # a copy until start_step
    expected = {k: v.double() for k, v in raw[2].items()}
    for step in (3, 4, 5):
        expected = {k: DECAY * expected[k] + (1 - DECAY) * raw[step][k].double() for k in expected}
        assert files[step].keys() == expected.keys()
        for key, value in files[step].items():
            assert torch.allclose(value.double(), expected[key], rtol=1e-5, atol=1e-8), (step, key)
    # the average differs from the raw weights, and the files say which is which
    ups = [k for k in files[5] if k.endswith("lora_up.weight")]
    assert any(not torch.allclose(files[5][k], raw[5][k]) for k in ups)
    with safe_open(str(out / "t.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["loraforge_weights"] == "ema" and meta["loraforge_ema_updates"] == "3"
    with safe_open(str(out / "t-raw.safetensors"), "pt") as f:
        assert f.metadata()["loraforge_weights"] == "raw"
