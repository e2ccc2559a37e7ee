"""Base-model weights as plain state dicts: diffusers folders and single files, read and written.

Merging into a model and extracting from two models only touch tensors, so nothing here builds a
UNet or text encoder: a diffusers folder is read component by component (``unet/``,
``text_encoder/``, ``text_encoder_2/`` — single or sharded ``*.safetensors``), a single-file
checkpoint as one state dict. Outputs are written next to their destination and renamed into
place, so an interrupted merge leaves no partial checkpoint.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from loraforge.errors import ModelError, OutputExistsError
from loraforge.fileio import atomic_folder, atomic_path, read_json

#: the components whose weights LoRAs change, in text-encoder index order after the UNet or
#: (FLUX.1, SD3) the transformer.
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
_WEIGHT_NAMES = {
    "unet": "diffusion_pytorch_model",
    "transformer": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
    "text_encoder_3": "model",
}


@dataclass(frozen=True)
class DiffusersComponent:
    """One component folder's weights.

    Attributes:
        state: every tensor of the component.
        config: its ``config.json``.
        files: the weight files read (several when sharded).
    """

    state: dict[str, torch.Tensor]
    config: dict
    files: tuple[Path, ...]


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").is_file()


def read_diffusers_components(folder: Path) -> dict[str, DiffusersComponent]:
    """Read the UNet (or transformer) and text-encoder weights of a diffusers folder.

    Raises:
        ModelError: no UNet/transformer, or a component with only pickled (``.bin``) weights.
    """
    from safetensors.torch import load_file

    components = {}
    for name in COMPONENTS:
        sub = folder / name
        if not sub.is_dir():
            continue
        files = _weight_files(sub, name)
        state: dict[str, torch.Tensor] = {}
        for file in files:
            try:
                state.update(load_file(str(file), device="cpu"))
            except Exception as e:  # safetensors raises its own error type or OSError
                raise ModelError(f"{file}: not a readable safetensors file ({e})") from e
        config = read_json(sub / "config.json")
        components[name] = DiffusersComponent(state, config, tuple(files))
    if "unet" not in components and "transformer" not in components:
        raise ModelError(
            f"{folder}: has no unet/ (or transformer/) folder",
            hint="pass a diffusers model folder or a .safetensors checkpoint",
        )
    return components


def _weight_files(folder: Path, name: str) -> list[Path]:
    stem = _WEIGHT_NAMES[name]
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        return [folder / s for s in shards]
    if any(folder.glob("*.bin")):
        raise ModelError(
            f"{folder}: has only pickled .bin weights, which loraforge does not unpickle",
            hint="re-save the model with safe_serialization=True (diffusers' default)",
        )
    raise ModelError(f"{folder}: no {stem}.safetensors found")


def _cast(state: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return {k: v.contiguous() for k, v in state.items()}
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def write_single_file(
    path: Path,
    state: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    *,
    dtype: torch.dtype | None = None,
    force: bool = False,
) -> None:
    """Write a checkpoint as one ``.safetensors`` file, atomically.

    Args:
        dtype: cast floating tensors to this (default: keep each tensor's dtype).
        force: overwrite an existing file.

    Raises:
        OutputExistsError: ``path`` exists and ``force`` is false.
    """
    from safetensors.torch import save_file

    with atomic_path(path, force=force) as tmp:
        save_file(_cast(state, dtype), str(tmp), metadata=dict(metadata))


def write_diffusers_folder(
    source: Path,
    out: Path,
    components: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    dtype: torch.dtype | None = None,
    force: bool = False,
) -> None:
    """Copy a diffusers folder to ``out`` with some components' weights replaced.

    Each replaced component is written as one ``.safetensors`` file (shards of the source are
    dropped); everything else (configs, tokenizers, VAE, scheduler) is copied as it is.

    Raises:
        OutputExistsError: ``out`` exists and ``force`` is false.
    """
    from safetensors.torch import save_file

    if out.resolve() == source.resolve():
        raise OutputExistsError(
            f"{out} is the input model", hint="write the merged model to another folder"
        )
    with atomic_folder(out, force=force) as tmp:
        for item in source.iterdir():
            target = tmp / item.name
            if item.is_dir():
                shutil.copytree(item, target)
            else:
                shutil.copy2(item, target)
        for name, state in components.items():
            folder = tmp / name
            stem = _WEIGHT_NAMES[name]
            for old in folder.glob(f"{stem}*.safetensors*"):
                old.unlink()
            save_file(
                _cast(state, dtype), str(folder / f"{stem}.safetensors"), metadata={"format": "pt"}
            )
