"""Which architecture to estimate: the component configs of the recipe's base model.

No weights are read and torch is not imported. In order of preference:

1. ``model.base`` is a local diffusers folder: its own ``*/config.json`` files.
2. ``model.base`` is a local ``.safetensors`` checkpoint: the configs a loraforge-written file
   carries in its metadata, else the published configs of its family (detected from the tensor
   names in the file header when ``model.family`` is ``auto``).
3. Otherwise (a hub id, or a file not there yet): the published configs of ``model.family``
   shipped in ``loraforge/models/configs``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraforge.errors import ModelError, RecipeError
from loraforge.fileio import read_json, read_safetensors_header
from loraforge.models.families import (
    architecture_config_dir,
    detect_family_from_configs,
    detect_family_from_keys,
    family_spec,
    resolve_family,
)
from loraforge.models.single_file import embedded_configs

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class Architecture:
    """The component configs of one model.

    Attributes:
        family: ``sd1`` | ``sd2`` | ``sd2-v`` | ``sdxl`` | ``sd3`` | ``flux``.
        configs: ``unet``, ``vae``, ``text_encoder`` (and ``text_encoder_2`` for SDXL): the
            diffusers / transformers ``config.json`` contents; SD3 / FLUX have ``transformer``
            instead of ``unet`` and up to three text encoders.
        source: where the configs came from, for the report.
        variant: SD3 / FLUX variant (``dev``, ``5-large`` …).
    """

    family: str
    configs: Mapping[str, Mapping[str, Any]]
    source: str
    variant: str | None = None

    @property
    def text_encoder_names(self) -> tuple[str, ...]:
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return tuple(n for n in names if n in self.configs)


FLOW_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def guess_flow_variant(family: str, base: str) -> str:
    """The variant a hub id or file name most likely is (``schnell``, SD3 ``medium`` /
    ``5-medium``), else the family's default (FLUX.1 dev, SD3.5 Large)."""
    name = base.lower().replace("_", "-")
    if family == "flux":
        return "schnell" if "schnell" in name else "dev"
    if "medium" in name:
        return "5-medium" if ("3.5" in name or "35" in name or "3-5" in name) else "medium"
    return "5-large"


def flow_architecture(folder: Path, family: str, variant: str | None, source: str) -> Architecture:
    """The component configs of a flow model folder (a diffusers folder or a shipped one)."""
    configs = {
        n: read_json(folder / n / "config.json")
        for n in FLOW_COMPONENTS
        if (folder / n / "config.json").is_file()
    }
    return Architecture(family, configs, source, variant)


def read_config_dir(folder: Path, family: str, *, source: str | None = None) -> Architecture:
    """Read the component configs of a diffusers folder (no weights needed).

    Args:
        folder: a folder with ``unet/config.json``, ``vae/config.json``, ``text_encoder/…``.
        family: the recipe's ``model.family``; ``auto`` detects it from the configs.
        source: label for the report (default: the folder).

    Raises:
        ModelError: a config is missing or unreadable, or the family does not match.
    """
    unet = read_json(folder / "unet" / "config.json")
    index_path = folder / "model_index.json"
    model_index = read_json(index_path) if index_path.is_file() else {}
    if not model_index:
        model_index = {n: [] for n in COMPONENTS if (folder / n / "config.json").is_file()}
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler = read_json(scheduler_path) if scheduler_path.is_file() else None
    detection = detect_family_from_configs(model_index, unet, scheduler)
    resolved = resolve_family(family, detection, source=str(folder))
    configs: dict[str, Mapping[str, Any]] = {"unet": unet}
    names = ["vae", "text_encoder", "text_encoder_2"][: 1 + family_spec(resolved).num_text_encoders]
    for name in names:
        configs[name] = read_json(folder / name / "config.json")
    return Architecture(resolved, configs, source or str(folder))


def published_architecture(family: str, base: str = "") -> Architecture:
    """The published full-size architecture of ``family`` (shipped with loraforge).

    Raises:
        RecipeError: ``family`` is ``auto`` (nothing to detect it from).
    """
    if family in ("sd3", "flux"):
        from loraforge.models.flow_loading import flow_config_dir

        variant = guess_flow_variant(family, base)
        folder = flow_config_dir(family, variant)
        return flow_architecture(folder, family, variant, f"published {folder.name} architecture")
    if family == "auto":
        raise RecipeError(
            "model.family is auto and model.base is neither a local diffusers folder nor a "
            ".safetensors checkpoint, so the VRAM estimate "
            "cannot tell which architecture to use",
            hint="set model.family to sd1, sd2, sd2-v, sdxl, sd3 or flux",
        )
    folder = architecture_config_dir(family)
    return read_config_dir(folder, family, source=f"published {family} architecture")


class _HeaderEntry:
    """A tensor's header entry, shaped like a tensor for family detection (``.shape``)."""

    def __init__(self, entry: Mapping[str, Any]) -> None:
        self.shape = tuple(entry.get("shape", ()))


def _from_checkpoint(path: Path, family: str) -> Architecture:
    entries, metadata = read_safetensors_header(path, error=ModelError, hint="check model.base")
    embedded = embedded_configs(metadata)
    if embedded is not None:
        configs = embedded["configs"]
        found = embedded.get("family", family)
        resolved = found if family in ("auto", found) else family
        parts = {n: configs[n] for n in COMPONENTS if n in configs}
        return Architecture(resolved, parts, f"configs embedded in {path.name}")
    keys = {k: _HeaderEntry(v) for k, v in entries.items()}
    detection = detect_family_from_keys(keys, source=str(path))
    resolved = resolve_family(family, detection, source=str(path))
    if detection.variant is not None:
        from loraforge.models.flow_loading import flow_config_dir

        folder = flow_config_dir(resolved, detection.variant)
        return flow_architecture(
            folder, resolved, detection.variant, f"published {folder.name} architecture"
        )
    published = published_architecture(resolved)
    return Architecture(resolved, published.configs, f"published {resolved} architecture")


def _vae_override(vae: str | None) -> Mapping[str, Any] | None:
    """The config of a VAE folder given as ``model.vae`` (single-file VAEs keep the base's)."""
    if vae is None:
        return None
    folder = Path(vae).expanduser()
    for candidate in (folder / "config.json", folder / "vae" / "config.json"):
        if candidate.is_file():
            return read_json(candidate)
    return None


def _flow_folder(folder: Path, family: str) -> Architecture:
    from loraforge.models.families import detect_transformer_family

    index = folder / "model_index.json"
    model_index = read_json(index) if index.is_file() else {}
    detection = detect_transformer_family(
        model_index, read_json(folder / "transformer" / "config.json")
    )
    resolved = resolve_family(family, detection, source=str(folder))
    return flow_architecture(folder, resolved, detection.variant, str(folder))


def resolve_architecture(
    base: str, family: str, *, vae: str | None = None, config_dir: Path | None = None
) -> Architecture:
    """The architecture a recipe trains on (see the module docstring for the order).

    Args:
        base: ``model.base``.
        family: ``model.family`` (``auto`` allowed when ``base`` is local).
        vae: ``model.vae``.
        config_dir: use this diffusers config folder instead of looking at ``base``.

    Raises:
        RecipeError: ``auto`` family with nothing local to detect it from.
        ModelError: unreadable configs or checkpoint header, or a family mismatch.
    """
    path = Path(base).expanduser()
    folder = Path(config_dir) if config_dir is not None else path
    if folder.is_dir() and (folder / "transformer" / "config.json").is_file():
        arch = _flow_folder(folder, family)
    elif config_dir is not None:
        arch = read_config_dir(Path(config_dir), family)
    elif path.is_dir() and (path / "unet" / "config.json").is_file():
        arch = read_config_dir(path, family)
    elif path.is_file() and path.suffix.lower() == ".safetensors":
        arch = _from_checkpoint(path, family)
    else:
        arch = published_architecture(family, base)
    override = _vae_override(vae)
    if override is not None:
        arch = Architecture(arch.family, {**arch.configs, "vae": override}, arch.source)
    return arch
