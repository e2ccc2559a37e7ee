"""Inputs of ``gpu_truth.py``: full-size random-weight models, a drawn dataset, row recipes.

Nothing is downloaded. A full-size model is the published architecture of its family (the
configs shipped in ``loraforge/models/configs``) with seeded random weights, written as a
diffusers folder in fp16 together with OpenAI CLIP's tokenizer (which loraforge ships); a
``--smoke`` run uses the built-in tiny models instead. Row recipes are the shipped presets with
only what a benchmark must change: the model, the dataset, the number of steps, no saving
between steps and no samples.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import yaml

DATASET_IMAGES = 8
DATASET_FOLDER = "10_lfdemo shape"


def write_full_size_model(family: str, folder: Path, device: str) -> Path:
    """Write ``family``'s full-size architecture with seeded random weights (fp16) to ``folder``.

    Weights are initialised on ``device`` (``cuda`` takes seconds where a CPU takes minutes
    for SDXL).

    Returns:
        ``folder``, a diffusers model folder ``loraforge train`` reads like a downloaded one.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from loraforge.models.clip_tokenizer import clip_merges, write_clip_tokenizer
    from loraforge.models.configs import architecture_config_dir
    from loraforge.models.tiny import _model_kwargs

    source = architecture_config_dir(family)

    def config(name: str) -> dict[str, Any]:
        return _model_kwargs(json.loads((source / name / "config.json").read_text("utf-8")))

    torch.manual_seed(0)
    with torch.device(device):
        parts: dict[str, Any] = {
            "unet": UNet2DConditionModel.from_config(config("unet")),
            "vae": AutoencoderKL.from_config(config("vae")),
        }
        encoders = ("text_encoder", "text_encoder_2") if family == "sdxl" else ("text_encoder",)
        for name in encoders:
            cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
            parts[name] = cls(CLIPTextConfig(**config(name)))
    for name, module in parts.items():
        module.to(torch.float16).save_pretrained(folder / name, safe_serialization=True)
        del module
    for index in range(len(encoders)):
        name = "tokenizer" if index == 0 else "tokenizer_2"
        specials = json.loads((source / name / "special_tokens_map.json").read_text("utf-8"))
        write_clip_tokenizer(folder / name, clip_merges(), pad_token=specials["pad_token"])
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    for name in ("model_index.json", "scheduler/scheduler_config.json"):
        (folder / name).write_text((source / name).read_text("utf-8"), "utf-8")
    return folder


def write_model(family: str, folder: Path, *, smoke: bool, device: str) -> Path:
    """The full-size model, or in a smoke run the built-in tiny one."""
    if smoke:
        from loraforge.models.tiny import write_tiny_model

        return write_tiny_model(family, folder)  # type: ignore[arg-type]
    return write_full_size_model(family, folder, device)


def write_dataset(root: Path, size: int, count: int = DATASET_IMAGES) -> Path:
    """``count`` square ``size`` px images of drawn shapes with captions, in a kohya folder."""
    from loraforge.demo import BACKGROUNDS, COLOURS, TRIGGER, caption, draw_shape

    folder = root / DATASET_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)
    for index in range(count):
        colour, background = colours[index % len(colours)], backgrounds[index % len(backgrounds)]
        image = draw_shape("cross", COLOURS[colour], BACKGROUNDS[background], (size, size), rng)
        image.save(folder / f"{index:02d}.png")
        text = caption(colour, TRIGGER, background)
        (folder / f"{index:02d}.txt").write_text(text + "\n", "utf-8")
    return root


def preset_data(name: str) -> dict[str, Any]:
    """A shipped preset as plain data."""
    from loraforge.presets import list_presets

    for preset in list_presets():
        if preset.name == name:
            return yaml.safe_load(Path(preset.path).read_text("utf-8"))
    raise ValueError(f"no preset {name!r}")


def row_recipe(
    preset: str,
    changes: dict[str, Any],
    *,
    model: Path,
    dataset: Path,
    out: Path,
    steps: int,
    resolution: int | None,
) -> dict[str, Any]:
    """The recipe a row trains: the preset, ``changes`` (``"training.optimizer": …``) and the
    benchmark's model, data, length and output; ``resolution`` replaces the preset's (smoke)."""
    data = preset_data(preset)
    data["model"]["base"] = str(model)
    dataset_section = data["dataset"]
    for subset in dataset_section["subsets"]:
        subset["dir"] = str(dataset)
    if resolution is not None:
        dataset_section["resolution"] = resolution
        dataset_section["enable_bucket"] = False
    training = data["training"]
    training.pop("max_train_epochs", None)
    training["max_train_steps"] = steps
    for path, value in changes.items():
        section, field = path.split(".")
        data[section][field] = value
    output = data["output"]
    output.update({"dir": str(out), "name": "truth"})
    for key in ("save_every_n_epochs", "save_every_n_steps", "save_last_n", "save_state"):
        output.pop(key, None)
    data.pop("sample", None)
    return data


def write_recipe(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), "utf-8")
    return path
