"""The ``demo``, ``demo-sdxl``, ``demo-flux`` and ``demo-sd3`` projects: a built-in tiny model,
generated images and a recipe.

``loraforge init --preset demo --dir demo`` writes::

    demo/
      model/                the tiny SD1 model, pretrained on drawn shapes (see below)
      dataset/5_lfdemo/     a dozen drawn crosses (three aspect ratios) with .txt captions
      recipe.yaml           tuned to train in about a minute on two CPU cores

and ``loraforge train demo/recipe.yaml`` trains it. The base model
(:mod:`loraforge.models.pretrained`, made by ``scripts/pretrain_demo_model.py``) draws coloured
circles, squares and triangles on white, black or grey backgrounds (``red circle, white
background``) but has never seen a cross. The dataset shows crosses captioned ``red lfdemo,
white background``, so the LoRA teaches the trigger word ``lfdemo`` to mean a cross: the samples
(step 0, the middle and the end, also side by side in ``output/sample/lfdemo_grid.png``) show
the shape appear. ``demo-sdxl`` trains the same dataset on the tiny SDXL model, whose weights are
random (a check that SDXL training runs, not a picture); ``demo-flux`` and ``demo-sd3`` do the same
with tiny FLUX.1 and SD3.5 transformers (a LoRA on the transformer, text encoders cached).
"""

from __future__ import annotations

import math
import random
import shutil
from pathlib import Path

from loraforge.errors import OutputExistsError, RecipeError
from loraforge.fileio import atomic_path, write_text_atomic

DEMO_FAMILIES = {"demo": "sd1", "demo-sdxl": "sdxl", "demo-flux": "flux", "demo-sd3": "sd3"}
#: the demo's trigger word: the LoRA teaches it to mean :data:`DEMO_SHAPE`
TRIGGER = "lfdemo"
FOLDER = f"5_{TRIGGER}"
# (width, height): square, landscape and portrait images, so bucketing has work to do
_SIZES = ((96, 96), (128, 72), (72, 128))
#: the shapes the demo's base model was pretrained on ("red circle, white background")
BASE_SHAPES = ("circle", "square", "triangle")
#: the shape the demo dataset shows; the base model has never seen it
DEMO_SHAPE = "cross"
#: every shape :func:`draw_shape` draws (the pretrained VAE saw them all)
CODEC_SHAPES = (*BASE_SHAPES, DEMO_SHAPE, "ring", "diamond", "star")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "grey": (128, 128, 128)}
NUM_IMAGES = 12

_RECIPE = """\
# loraforge demo project ({preset}): the built-in tiny {family} model and generated images.
# Train it with:  loraforge train {recipe}
# It runs on a CPU in about a minute and writes output/lfdemo.safetensors; the samples
# (output/sample, side by side in output/sample/lfdemo_grid.png) show "lfdemo" become a cross.
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
  learning_rate: 5.0e-3
{text_encoder_lr}  optimizer: AdamW
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
  at_first: true
  every_n_steps: {sample_every}
  sampler: euler_a
  width: 64
  height: 64
  steps: 8
  cfg_scale: 5.0
  prompts:
    - prompt: red lfdemo, white background
      seed: 1
    - prompt: blue lfdemo, black background
      seed: 2
    - prompt: yellow lfdemo, grey background
      seed: 3
"""

# Tuned for about a minute on two CPU cores. A new shape is drawn by the UNet's convolutions
# more than by its attention layers, so both demos train LoCon (conv 3x3 too).
_STEPS = {"sd1": 160, "sdxl": 150, "flux": 120, "sd3": 120}
_LOCON = "  algorithm: locon\n  dim: 8\n  alpha: 8\n  conv_dim: 8\n  conv_alpha: 8\n"
# the transformers have no convolutions to adapt; their text encoders stay frozen (cached)
_FLOW = "  algorithm: lora\n  dim: 8\n  alpha: 8\n  train_text_encoder: false\n"
_NETWORK = {"sd1": _LOCON, "sdxl": _LOCON, "flux": _FLOW, "sd3": _FLOW}


def draw_shape(
    shape: str,
    colour: tuple[int, int, int],
    background: tuple[int, int, int],
    size: tuple[int, int],
    rng: random.Random,
):
    """One image: a vertical gradient of ``background`` with a ``shape`` in ``colour``.

    ``shape`` is one of :data:`BASE_SHAPES` (what the demo's base model was pretrained on),
    :data:`DEMO_SHAPE` (the concept the demo LoRA teaches) or :data:`CODEC_SHAPES` (only the
    pretrained VAE saw those, so it can draw any simple figure).
    """
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    for y in range(height):  # a soft gradient, so the background is not flat
        shade = tuple(max(0, min(255, c + (y - height // 2) // 3)) for c in background)
        draw.line([(0, y), (width, y)], fill=shade)
    side = min(width, height) * rng.uniform(0.5, 0.75)
    cx = width / 2 + rng.uniform(-0.1, 0.1) * width
    cy = height / 2 + rng.uniform(-0.1, 0.1) * height
    left, top, right, bottom = cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2
    box = [left, top, right, bottom]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, top), (right, bottom), (left, bottom)], fill=colour)
    elif shape == "cross":  # a plus sign: arms a third of the side wide
        arm = side / 6
        draw.rectangle([cx - arm, top, cx + arm, bottom], fill=colour)
        draw.rectangle([left, cy - arm, right, cy + arm], fill=colour)
    elif shape == "ring":
        draw.ellipse(box, fill=colour)
        hole = side / 4
        draw.ellipse([cx - hole, cy - hole, cx + hole, cy + hole], fill=background)
    elif shape == "diamond":
        draw.polygon([(cx, top), (right, cy), (cx, bottom), (left, cy)], fill=colour)
    elif shape == "star":
        points = []
        for k in range(10):
            radius = side / 2 if k % 2 == 0 else side / 5
            angle = math.pi * (k / 5 - 0.5)
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return image


def caption(colour: str, shape: str, background: str) -> str:
    """``red circle, white background``: the caption form of the base model and the demo."""
    return f"{colour} {shape}, {background} background"


def write_demo_images(folder: Path, count: int = NUM_IMAGES, seed: int = 0) -> list[Path]:
    """Draw ``count`` captioned images of the demo concept into ``folder`` (PNG + ``.txt``).

    Each is a :data:`DEMO_SHAPE` in one of the colours on one of the backgrounds, captioned
    ``red lfdemo, white background``: the shape's name is the trigger word, so the LoRA learns
    what ``lfdemo`` looks like while colour and background words keep their meaning.
    """
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)
    for index in range(count):
        colour = colours[index % len(colours)]
        background = backgrounds[(index // len(colours)) % len(backgrounds)]
        size = _SIZES[index % len(_SIZES)]
        image = draw_shape(DEMO_SHAPE, COLOURS[colour], BACKGROUNDS[background], size, rng)
        path = folder / f"{TRIGGER}_{index:02d}.png"
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        write_text_atomic(path.with_suffix(".txt"), caption(colour, TRIGGER, background) + "\n")
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
        text_encoder_lr="" if family in ("flux", "sd3") else "  text_encoder_lr: 1.0e-3\n",
        recipe=recipe_path,
        steps=steps,
        save_every=steps // 2,
        sample_every=steps // 2,
    )


def write_demo_project(preset: str, directory: Path, *, force: bool) -> Path:
    """Write a runnable demo project into ``directory``.

    Args:
        preset: ``demo`` (tiny SD1), ``demo-sdxl``, ``demo-flux`` or ``demo-sd3`` (tiny SDXL,
            FLUX.1 and SD3.5 models with random weights).
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
    family = DEMO_FAMILIES[preset]
    if family in ("flux", "sd3"):
        from loraforge.models.tiny_flow import write_tiny_flow_model

        write_tiny_flow_model(family, directory / "model", seed=0)
    else:
        write_tiny_model(family, directory / "model", seed=0, pretrained=family == "sd1")  # type: ignore[arg-type]
    write_demo_images(directory / "dataset" / FOLDER)
    write_text_atomic(recipe_path, demo_recipe_text(preset, recipe_path), force=True)
    return recipe_path
