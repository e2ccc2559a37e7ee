"""The ``demo`` and ``demo-sdxl`` projects: a built-in tiny model, generated images and a recipe.

``loraforge init --preset demo --dir demo`` writes::

    demo/
      model/                      the built-in tiny SD1 model (diffusers folder, seeded weights)
      dataset/5_lfdemo shape/     a dozen drawn images (three aspect ratios) with .txt captions
      recipe.yaml                 tuned to train in about a minute on two CPU cores

and ``loraforge train demo/recipe.yaml`` trains it. ``demo-sdxl`` is the same on the tiny SDXL
model. The images are simple coloured shapes on gradients, so the loss visibly falls.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

from loraforge.errors import OutputExistsError, RecipeError
from loraforge.fileio import atomic_path, write_text_atomic

DEMO_FAMILIES = {"demo": "sd1", "demo-sdxl": "sdxl"}
FOLDER = "5_lfdemo shape"
# (width, height): square, landscape and portrait images, so bucketing has work to do
_SIZES = ((96, 96), (128, 72), (72, 128))
_SHAPES = ("circle", "square", "triangle")
_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
}
_BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "grey": (128, 128, 128)}
NUM_IMAGES = 12

_RECIPE = """\
# loraforge demo project ({preset}): the built-in tiny {family} model and generated images.
# Train it with:  loraforge train {recipe}
# It runs on a CPU in about a minute and writes output/lfdemo.safetensors.
model:
  base: model
  family: {family}
dataset:
  resolution: 96
  enable_bucket: true
  min_bucket_reso: 64
  max_bucket_reso: 128
  bucket_reso_steps: 64
  num_workers: 0
  subsets:
    - dir: dataset
      caption_extension: .txt
cache:
  latents: memory
network:
{network}training:
  max_train_steps: {steps}
  batch_size: 2
  learning_rate: 2.0e-3
  text_encoder_lr: 5.0e-4
  optimizer: AdamW
  lr_scheduler: constant
  mixed_precision: "no"
  seed: 42
output:
  dir: output
  name: lfdemo
  save_every_n_steps: {save_every}
  save_last_n: 2
  save_precision: fp16
sample:
  every_n_steps: {sample_every}
  sampler: euler_a
  width: 64
  height: 64
  steps: 8
  cfg_scale: 5.0
  prompts:
    - prompt: lfdemo shape, red circle, white background
      seed: 1
    - prompt: lfdemo shape, blue square, black background
      seed: 2
"""

# Tuned for about a minute on two CPU cores while the loss visibly falls. The tiny SDXL UNet
# learns little through its attention layers alone, so its demo trains LoCon (conv 3x3 too).
_STEPS = {"sd1": 160, "sdxl": 150}
_NETWORK = {
    "sd1": "  algorithm: lora\n  dim: 8\n  alpha: 8\n",
    "sdxl": "  algorithm: locon\n  dim: 8\n  alpha: 8\n  conv_dim: 8\n  conv_alpha: 8\n",
}


def _draw(
    shape: str,
    colour: tuple[int, int, int],
    background: tuple[int, int, int],
    size: tuple[int, int],
    rng: random.Random,
):
    """One image: a vertical gradient of ``background`` with a shape in ``colour``."""
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    for y in range(height):  # a soft gradient, so the background is not flat
        shade = tuple(max(0, min(255, c + (y - height // 2) // 3)) for c in background)
        draw.line([(0, y), (width, y)], fill=shade)
    side = min(width, height) * rng.uniform(0.45, 0.7)
    cx = width / 2 + rng.uniform(-0.1, 0.1) * width
    cy = height / 2 + rng.uniform(-0.1, 0.1) * height
    box = [cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=colour)
    return image


def write_demo_images(folder: Path, count: int = NUM_IMAGES, seed: int = 0) -> list[Path]:
    """Draw ``count`` captioned images into ``folder`` (PNG + ``.txt``), reproducibly."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    colours, backgrounds = list(_COLOURS), list(_BACKGROUNDS)
    for index in range(count):
        shape = _SHAPES[index % len(_SHAPES)]
        colour = colours[index % len(colours)]
        background = backgrounds[(index // len(_SHAPES)) % len(backgrounds)]
        size = _SIZES[index % len(_SIZES)]
        image = _draw(shape, _COLOURS[colour], _BACKGROUNDS[background], size, rng)
        path = folder / f"shape_{index:02d}.png"
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        caption = f"lfdemo shape, {colour} {shape}, {background} background"
        write_text_atomic(path.with_suffix(".txt"), caption + "\n")
        written.append(path)
    return written


def demo_recipe_text(preset: str, recipe_path: Path) -> str:
    """The recipe of a demo project."""
    family = DEMO_FAMILIES[preset]
    steps = _STEPS[family]
    return _RECIPE.format(
        preset=preset,
        family=family,
        network=_NETWORK[family],
        recipe=recipe_path,
        steps=steps,
        save_every=steps // 2,
        sample_every=steps // 2,
    )


def write_demo_project(preset: str, directory: Path, *, force: bool) -> Path:
    """Write a runnable demo project into ``directory``.

    Args:
        preset: ``demo`` (tiny SD1) or ``demo-sdxl`` (tiny SDXL).
        directory: the project folder (created).
        force: replace an existing project there.

    Returns:
        The recipe path (``directory/recipe.yaml``).

    Raises:
        RecipeError: an unknown demo preset.
        OutputExistsError: the folder already holds a project and ``force`` is false.
    """
    if preset not in DEMO_FAMILIES:
        raise RecipeError(
            f"no demo project named {preset!r}", hint=f"use one of {', '.join(DEMO_FAMILIES)}"
        )
    directory = Path(directory)
    recipe_path = directory / "recipe.yaml"
    parts = [recipe_path, directory / "model", directory / "dataset"]
    existing = [p for p in parts if p.exists()]
    if existing and not force:
        raise OutputExistsError(
            f"{directory} already holds a project ({', '.join(p.name for p in existing)})",
            hint="pass --force to replace it, or choose another --dir",
        )
    from loraforge.models.tiny import write_tiny_model

    for part in parts[1:]:
        if part.exists():
            shutil.rmtree(part)
    write_tiny_model(DEMO_FAMILIES[preset], directory / "model", seed=0)  # type: ignore[arg-type]
    write_demo_images(directory / "dataset" / FOLDER)
    write_text_atomic(recipe_path, demo_recipe_text(preset, recipe_path), force=True)
    return recipe_path
