"""A base model's weights as one flat state dict with kohya targets: load, merge into, write back.

Handles both layouts: a diffusers folder (UNet and text encoders read component by component,
keys ``"<component>/<key>"``) and an original-layout single file (A1111/ComfyUI checkpoints, read
with :func:`loraforge.models.single_file.read_checkpoint`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraforge.errors import ModelError
from loraforge.fileio import read_json
from loraforge.ops.model_files import (
    is_diffusers_folder,
    read_diffusers_components,
    write_diffusers_folder,
    write_single_file,
)
from loraforge.ops.targets import (
    Target,
    diffusers_targets,
    flatten_components,
    single_file_targets,
    split_components,
)


@dataclass
class BaseWeights:
    """A loaded base model (mutable: merging changes ``state`` in place).

    Attributes:
        path: the folder or file it came from.
        layout: ``diffusers`` or ``single_file``.
        family: ``sd1``, ``sd2``, ``sdxl``, ``sd3`` or ``flux``.
        v_prediction: the model predicts v (SD 2.x 768-v), when known.
        state: the weights (diffusers: keys ``"<component>/<key>"``).
        targets: ``{kohya module name: Target}``.
        metadata: the single file's safetensors metadata (empty for folders).
        views: FLUX/SD3 diffusers folders: ``{view key: [(key, rows, dest)]}``, state entries
            that stand for an original fused layer (see :mod:`loraforge.ops.flow_targets`);
            :func:`write_base` writes them back into their layers.
    """

    path: Path
    layout: str
    family: str
    v_prediction: bool | None
    state: dict[str, torch.Tensor]
    targets: dict[str, Target]
    metadata: dict[str, str] = field(default_factory=dict)
    views: dict[str, list[tuple[str, tuple[int, int], int]]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return str(self.path)


def load_base(path: Path, *, allow_pickle: bool = False) -> BaseWeights:
    """Load a diffusers folder or a single-file checkpoint.

    Raises:
        ModelError: missing, unreadable, or not a Stable Diffusion 1.x/2.x/XL model.
    """
    path = Path(path)
    if path.is_dir():
        if not is_diffusers_folder(path):
            raise ModelError(
                f"{path}: is a folder without model_index.json",
                hint="pass a diffusers model folder or a .safetensors checkpoint",
            )
        return _load_diffusers(path)
    return _load_single_file(path, allow_pickle)


def _read_json_if_present(path: Path) -> dict:
    return read_json(path) if path.is_file() else {}


def _load_diffusers(path: Path) -> BaseWeights:
    from loraforge.models.families import detect_family_from_configs

    components = read_diffusers_components(path)
    if "transformer" in components:
        from loraforge.ops.flow_targets import flow_diffusers_base

        return flow_diffusers_base(path, {n: (c.state, c.config) for n, c in components.items()})
    unet_config = components["unet"].config
    scheduler = _read_json_if_present(path / "scheduler" / "scheduler_config.json")
    detection = detect_family_from_configs(
        _read_json_if_present(path / "model_index.json"), unet_config, scheduler
    )
    family = "sd2" if detection.family == "sd2-v" else detection.family
    states = {name: c.state for name, c in components.items()}
    targets = diffusers_targets(family, states, unet_config)
    v_pred = detection.family == "sd2-v" if family == "sd2" else False
    return BaseWeights(path, "diffusers", family, v_pred, flatten_components(states), targets)


def _load_single_file(path: Path, allow_pickle: bool) -> BaseWeights:
    from loraforge.models.configs import architecture_config_dir
    from loraforge.models.single_file import (
        detect_checkpoint_family,
        embedded_configs,
        read_checkpoint,
    )

    state, metadata = read_checkpoint(path, allow_pickle=allow_pickle)
    embedded = embedded_configs(metadata)
    detection = detect_checkpoint_family(state, embedded, source=str(path))
    detection_family = detection.family
    if detection_family in ("flux", "sd3"):
        from loraforge.ops.flow_targets import flow_single_file_targets

        targets = flow_single_file_targets(detection_family, state, source=str(path))
        return BaseWeights(
            path, "single_file", detection_family, False, state, targets, dict(metadata)
        )
    family = "sd2" if detection_family == "sd2-v" else detection_family
    v_pred = (detection_family == "sd2-v") if detection.prediction_known else None
    if embedded is not None:
        unet_config = embedded["configs"]["unet"]
    else:
        config_file = architecture_config_dir(detection_family) / "unet" / "config.json"
        unet_config = json.loads(config_file.read_text("utf-8"))
    targets = single_file_targets(family, state, unet_config)
    return BaseWeights(path, "single_file", family, v_pred, state, targets, dict(metadata))


def extraction_pairs(
    base: BaseWeights, tuned: BaseWeights, *, conv: bool
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{kohya name: (base weight, tuned weight)}`` over kohya's default (LoCon: ``conv``) targets.

    Raises:
        ModelError: the two models are of different families.
    """
    from loraforge.ops.targets import default_targets, weight_of

    if base.family != tuned.family:
        raise ModelError(
            f"{base.label} is a {base.family} model but {tuned.label} is a {tuned.family} model",
            hint="extract between a model and its own fine-tune",
        )
    names = [n for n in default_targets(base.targets, conv=conv) if n in tuned.targets]
    return {
        n: (weight_of(base.state, base.targets[n]), weight_of(tuned.state, tuned.targets[n]))
        for n in names
    }


def resolver(base: BaseWeights):
    """The name -> :class:`~loraforge.ops.merge_into.TargetRef` function merge needs."""

    def resolve(name: str):
        target = base.targets.get(name)
        return None if target is None else target.ref

    return resolve


def write_base(
    base: BaseWeights,
    out: Path,
    *,
    extra_metadata: dict[str, str],
    dtype: torch.dtype | None,
    force: bool,
) -> None:
    """Write the (merged) model in the layout it was read in.

    Args:
        out: a ``.safetensors`` file for a single-file base, a folder for a diffusers base.
        extra_metadata: added to a single file's metadata.
        dtype: cast floating tensors (default: keep).
        force: overwrite ``out``.

    Raises:
        ModelError: the output kind does not match the base's layout.
        OutputExistsError: ``out`` exists and ``force`` is false.
    """
    if base.layout == "single_file":
        if out.suffix.lower() != ".safetensors":
            raise ModelError(
                f"{out}: a single-file base is written as .safetensors",
                hint="name the output *.safetensors",
            )
        write_single_file(
            out, base.state, {**base.metadata, **extra_metadata}, dtype=dtype, force=force
        )
        return
    if out.suffix.lower() == ".safetensors":
        raise ModelError(
            f"{out}: the base is a diffusers folder, so the merged model is written as a folder",
            hint="pass a folder name as --output",
        )
    state = dict(base.state)
    if base.views:
        from loraforge.ops.flow_targets import scatter_views

        scatter_views(state, base.views)
    states = split_components(state)
    write_diffusers_folder(base.path, out, states, dtype=dtype, force=force)
