"""The demo projects: `loraforge init --preset demo` writes a project that `train` runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from loraforge.cli import run
from loraforge.demo import FOLDER, NUM_IMAGES, write_demo_project
from loraforge.errors import OutputExistsError
from loraforge.recipe import load_recipe


def cli(*args: str) -> int:
    return run(list(args))


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demo") / "demo"
    assert cli("init", "--preset", "demo", "--dir", str(folder)) == 0
    return folder


def test_init_writes_model_images_and_a_valid_recipe(demo_dir) -> None:
    assert (demo_dir / "model" / "model_index.json").is_file()
    images = sorted((demo_dir / "dataset" / FOLDER).glob("*.png"))
    assert len(images) == NUM_IMAGES
    captions = {p.with_suffix(".txt").read_text().strip() for p in images}
    assert len(captions) == NUM_IMAGES  # every colour on every background, once
    assert all(re.fullmatch(r"(red|green|blue|yellow) lfdemo, (white|black|grey) background", c)
               for c in captions)  # fmt: skip
    from PIL import Image

    assert {Image.open(p).size for p in images} == {(96, 96), (128, 72), (72, 128)}
    recipe = load_recipe(demo_dir / "recipe.yaml")
    assert recipe.model.base == str(demo_dir / "model") and recipe.training.mixed_precision == "no"


def test_init_refuses_an_existing_project_without_force(demo_dir, tmp_path) -> None:
    with pytest.raises(OutputExistsError):
        write_demo_project("demo", demo_dir, force=False)
    copy = tmp_path / "copy"
    write_demo_project("demo", copy, force=False)
    (copy / "dataset" / FOLDER / "extra.png").write_bytes(b"x")
    write_demo_project("demo", copy, force=True)
    assert not (copy / "dataset" / FOLDER / "extra.png").exists()


def test_demo_plan_trains_both_text_encoder_and_unet(demo_dir, capsys) -> None:
    assert cli("train", str(demo_dir / "recipe.yaml"), "--dry-run", "-f", "json") == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["family"] == "sd1" and plan["length"]["max_train_steps"] == 160
    assert set(plan["network"]["groups"]) == {"textencoder", "unet"}
    assert [b["width"] * b["height"] for b in plan["buckets"]] == [64 * 64, 64 * 128, 128 * 64]


@pytest.mark.slow
def test_demo_sdxl_project_plans_and_trains(tmp_path, capsys) -> None:
    assert cli("init", "--preset", "demo-sdxl", "--dir", str(tmp_path / "x")) == 0
    recipe = tmp_path / "x" / "recipe.yaml"
    assert cli("train", str(recipe), "--dry-run", "-f", "json") == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["family"] == "sdxl" and plan["length"]["max_train_steps"] == 150
    short = recipe.with_name("short.yaml")  # shortened to keep the suite fast
    text = recipe.read_text().replace("max_train_steps: 150", "max_train_steps: 3")
    short.write_text(text.replace("every_n_steps: 75", "every_n_steps: 2"))
    assert cli("train", str(short)) == 0
    out = tmp_path / "x" / "output"
    assert (out / "lfdemo.safetensors").is_file()
    assert (out / "lfdemo-step00000002.safetensors").is_file()
    assert list((out / "sample").glob("lfdemo_000002_*.png"))


@pytest.mark.slow
def test_demo_trains_end_to_end_with_samples(demo_dir, capsys) -> None:
    recipe = demo_dir / "recipe.yaml"
    short = demo_dir / "short.yaml"  # the demo recipe, shortened to keep the suite fast
    text = recipe.read_text().replace("max_train_steps: 160", "max_train_steps: 6")
    short.write_text(text.replace("every_n_steps: 80", "every_n_steps: 3"))
    assert cli("train", str(short)) == 0
    out = demo_dir / "output"
    assert (out / "lfdemo.safetensors").is_file() and (
        out / "lfdemo-step00000003.safetensors"
    ).is_file()
    # step 0 (the base model), the middle and the end, for three prompts; and the grid of them
    assert len(list((out / "sample").glob("lfdemo_00000[036]_0[012]_[123].png"))) == 9
    from PIL import Image

    grid = Image.open(out / "sample" / "lfdemo_grid.png")
    assert grid.width > 3 * 128 and grid.height > 3 * 128


def test_demo_base_model_is_pretrained_and_small(demo_dir) -> None:
    from safetensors.torch import load_file

    from loraforge.models.pretrained import DEMO_WEIGHTS, demo_weights_info

    assert DEMO_WEIGHTS.stat().st_size < 8 * 2**20  # a few MB in the repository
    info = demo_weights_info()
    assert info["family"] == "sd1" and info["made_by"] == "scripts/pretrain_demo_model.py"
    vae_config = json.loads((demo_dir / "model" / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] == info["vae_scaling_factor"]
    shipped = load_file(str(DEMO_WEIGHTS))
    written = load_file(str(demo_dir / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    key = "conv_in.weight"
    assert written[key].float().equal(shipped[f"unet.{key}"].float())


@pytest.mark.slow
def test_demo_base_model_draws_a_shape_on_the_prompted_background(demo_dir) -> None:
    """A random model draws coloured noise whatever the prompt; the pretrained one draws a
    smooth shape that stands out from a light or dark background, as prompted."""
    import torch

    from loraforge.models.loading import load_model
    from loraforge.models.prompts import encode_prompts
    from loraforge.training.sampling import make_scheduler

    model = load_model(str(demo_dir / "model"), family="sd1")

    def draw(prompt: str, seed: int) -> torch.Tensor:
        scheduler = make_scheduler("euler_a", model.noise_scheduler.config, False)
        scheduler.set_timesteps(8)
        generator = torch.Generator().manual_seed(seed)
        latents = torch.randn((1, 4, 8, 8), generator=generator) * scheduler.init_noise_sigma
        cond = encode_prompts(model.text_encoders, model.tokenizers, "sd1", ["", prompt]).hidden
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.scale_model_input(torch.cat([latents, latents]), t)
                uncond, text = model.unet(x, t, cond).sample.chunk(2)
                eps = uncond + 5.0 * (text - uncond)
                latents = scheduler.step(eps, t, latents, generator=generator).prev_sample
            image = model.vae.decode(latents / model.vae.config.scaling_factor).sample[0]
        return (image.clamp(-1, 1) + 1) * 127.5  # (3, 64, 64)

    def roughness(im: torch.Tensor) -> float:  # random weights: about 36
        return float(
            (im[:, 1:] - im[:, :-1]).abs().mean() + (im[..., 1:] - im[..., :-1]).abs().mean()
        )

    def corners(im: torch.Tensor) -> float:
        return float(
            torch.cat([im[:, :8, :8], im[:, :8, -8:], im[:, -8:, :8], im[:, -8:, -8:]], 1).mean()
        )

    def centre(im: torch.Tensor) -> float:
        return float(im[:, 24:40, 24:40].mean())

    for seed in (1, 2):
        light = draw("red circle, white background", seed)
        dark = draw("blue square, black background", seed)
        assert roughness(light) < 15 and roughness(dark) < 15
        assert corners(light) > corners(dark) + 40
        assert centre(light) < corners(light) - 30  # a darker shape on a light background
        assert centre(dark) > corners(dark) + 30  # a lighter shape on a dark background
