"""Load a base model (diffusers folder, single file, or hub id) into a :class:`LoadedModel`."""

from __future__ import annotations

import hashlib
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge.errors import ModelError
from loraforge.fileio import read_json
from loraforge.models.families import (
    FAMILIES,
    architecture_config_dir,
    detect_family_from_configs,
    detect_flow_family_from_keys,
    family_spec,
    resolve_family,
)
from loraforge.models.flow_loading import is_flow_folder, load_flow_checkpoint, load_flow_folder
from loraforge.models.pickles import refuse_pickles
from loraforge.models.quiet import no_hf_progress_bars
from loraforge.models.single_file import (
    detect_checkpoint_family,
    embedded_configs,
    materialise_config_dir,
    read_checkpoint,
)

if TYPE_CHECKING:
    import torch

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# what a hub download fetches: configs, tokenizers and the full-precision safetensors weights
_HUB_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "scheduler/scheduler_config.json",
    "tokenizer*/*",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder*/model.safetensors",
]


@dataclass(frozen=True)
class LoadedModel:
    """A base model ready for training (all parts on CPU, frozen weights in ``dtype``).

    Args:
        family: ``sd1`` | ``sd2`` | ``sd2-v`` | ``sdxl``.
        unet: the diffusers ``UNet2DConditionModel``.
        vae: the diffusers ``AutoencoderKL`` (the override when one was given).
        text_encoders: ``(CLIPTextModel,)``; SDXL: ``(CLIPTextModel, CLIPTextModelWithProjection)``.
        tokenizers: one ``CLIPTokenizer`` per text encoder.
        noise_scheduler: a ``DDPMScheduler`` for training (prediction type set from the family).
        v_prediction: whether the model predicts v.
        prediction_known: whether the model or the recipe said epsilon or v (an SD 2.x single
            file without a marker says neither; it is then taken as epsilon, ``sd2``).
        source: what was loaded (path or hub id), for messages.
        model_identity: changes whenever the base model's weights change (path, size, mtime);
            for cache invalidation.
        vae_identity: the same for the VAE actually used.
    """

    family: str
    unet: Any
    vae: Any
    text_encoders: tuple[Any, ...]
    tokenizers: tuple[Any, ...]
    noise_scheduler: Any
    v_prediction: bool
    prediction_known: bool
    source: str
    model_identity: str
    vae_identity: str
    variant: str | None = None


def load_model(
    base: str,
    *,
    family: str = "auto",
    vae: str | None = None,
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
    encoder_files: dict[str, str | None] | None = None,
    flow_dtype: torch.dtype | None = None,
) -> LoadedModel:
    """Load a base model.

    Args:
        base: a diffusers folder, a single-file checkpoint (``.safetensors``; ``.ckpt`` with
            ``allow_pickle``), or a Hugging Face hub id (``owner/name``).
        family: the recipe's ``model.family``; ``auto`` detects it. A mismatch is an error.
        vae: optional VAE override: a diffusers VAE folder or a single VAE file.
        dtype: weight dtype (default ``torch.float32``).
        allow_pickle: allow pickled checkpoints (read with ``weights_only=True``).
        encoder_files: SD3 / FLUX text encoders as separate files, by recipe option
            (``clip_l``, ``clip_g``, ``t5xxl``); they replace the model's own.
        flow_dtype: weight dtype of SD3 / FLUX models (default ``dtype``).

    Raises:
        ModelError: missing/unreadable model, unknown or mismatched family, pickle refused,
            hub model unavailable offline.
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    if family != "auto" and family not in FAMILIES:
        raise ModelError(f"unknown model family {family!r}", hint=f"use auto or one of {FAMILIES}")
    path = Path(base).expanduser()
    refuse_pickles(path, "model.base", allow_pickle)
    if vae is not None:
        refuse_pickles(vae, "model.vae", allow_pickle)
    if not path.exists() and _HUB_ID.match(base) and not base.startswith((".", "/")):
        path = _download(base)  # with the hub's download bars
    elif not path.exists():
        raise ModelError(
            f"model not found: {base}",
            hint="set model.base to a diffusers folder, a .safetensors checkpoint or a hub id",
        )
    with no_hf_progress_bars():
        files = {**(encoder_files or {}), "vae": vae}
        if path.is_dir() and is_flow_folder(path):
            parts = load_flow_folder(
                path, family, flow_dtype or dtype, files, source=base, allow_pickle=allow_pickle
            )
        elif path.is_dir():
            parts = _load_folder(path, family, dtype, source=base)
        else:
            parts = _load_single_file(path, family, dtype, allow_pickle, files, flow_dtype)
        vae_identity = parts["identity"]
        if vae is not None:
            parts["vae"], vae_identity = load_vae(
                vae, parts["vae"], dtype, allow_pickle=allow_pickle
            )
    for module in (parts["unet"], parts["vae"], *parts["text_encoders"]):
        module.requires_grad_(False)
        module.eval()
    return LoadedModel(
        family=parts["family"],
        unet=parts["unet"],
        vae=parts["vae"],
        text_encoders=tuple(parts["text_encoders"]),
        tokenizers=tuple(parts["tokenizers"]),
        noise_scheduler=make_noise_scheduler(parts["family"], parts.get("scheduler_config")),
        variant=parts.get("variant"),
        v_prediction=family_spec(parts["family"]).v_prediction,
        prediction_known=parts["prediction_known"] or family != "auto",
        source=str(base),
        model_identity=parts["identity"],
        vae_identity=vae_identity,
    )


def make_noise_scheduler(family: str, scheduler_config: dict[str, Any] | None = None) -> Any:
    """The training ``DDPMScheduler``: sd-scripts' settings (scaled-linear betas 0.00085–0.012,
    1000 steps, no sample clipping), betas taken from the model's scheduler config when it has one.
    SD3 / FLUX: the model's ``FlowMatchEulerDiscreteScheduler`` (sampling reads its config).
    """
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    config = scheduler_config or {}
    if family_spec(family).flow_matching:
        settings = {k: v for k, v in config.items() if not k.startswith("_")}
        return FlowMatchEulerDiscreteScheduler.from_config(settings)
    return DDPMScheduler(
        num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
        beta_start=float(config.get("beta_start", 0.00085)),
        beta_end=float(config.get("beta_end", 0.012)),
        beta_schedule=str(config.get("beta_schedule", "scaled_linear")),
        clip_sample=False,
        prediction_type="v_prediction" if family_spec(family).v_prediction else "epsilon",
    )


def _load_folder(
    folder: Path, requested: str, dtype: torch.dtype, *, source: str | None = None
) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    source = source or str(folder)
    if not (folder / "model_index.json").is_file():
        raise ModelError(
            f"{folder} is not a diffusers model folder (no model_index.json)",
            hint="point model.base at the folder that holds model_index.json, or at a checkpoint",
        )
    model_index = read_json(folder / "model_index.json")
    unet_config = read_json(folder / "unet" / "config.json")
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    scheduler_config = read_json(scheduler_path) if scheduler_path.is_file() else None
    detection = detect_family_from_configs(model_index, unet_config, scheduler_config)
    family = resolve_family(requested, detection, source=source)
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype)
        encoders, tokenizers = _load_text_parts(folder, family, dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"{source}: cannot load the model ({e})") from e
    return {
        "family": family,
        "unet": unet,
        "vae": vae,
        "text_encoders": encoders,
        "tokenizers": tokenizers,
        "scheduler_config": scheduler_config,
        "prediction_known": detection.prediction_known,
        "identity": weights_identity(folder),
    }


def _load_text_parts(folder: Path, family: str, dtype: torch.dtype) -> tuple[list[Any], list[Any]]:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    names = ["text_encoder", "text_encoder_2"][: family_spec(family).num_text_encoders]
    encoders, tokenizers = [], []
    for index, name in enumerate(names):
        cls = CLIPTextModelWithProjection if index == 1 else CLIPTextModel
        encoders.append(cls.from_pretrained(folder, subfolder=name, torch_dtype=dtype))
        tok_name = "tokenizer" if index == 0 else "tokenizer_2"
        tokenizers.append(CLIPTokenizer.from_pretrained(folder, subfolder=tok_name))
    return encoders, tokenizers


def _load_single_file(
    path: Path,
    requested: str,
    dtype: torch.dtype,
    allow_pickle: bool,
    files: dict[str, str | None],
    flow_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    state, metadata = read_checkpoint(path, allow_pickle=allow_pickle)
    flow = detect_flow_family_from_keys(state)
    if flow is not None:
        flow_dtype = flow_dtype or dtype
        return load_flow_checkpoint(
            path, state, metadata, flow, requested, flow_dtype, files, allow_pickle
        )
    embedded = embedded_configs(metadata)
    detection = detect_checkpoint_family(state, embedded, source=str(path))
    family = resolve_family(requested, detection, source=str(path))
    with tempfile.TemporaryDirectory(prefix="loraforge-config-") as tmp:
        if embedded is not None:
            config_dir = materialise_config_dir(embedded, Path(tmp))
        else:
            config_dir = architecture_config_dir(family)
        parts = _components_from_state(state, family, config_dir, dtype, str(path))
        scheduler_path = config_dir / "scheduler" / "scheduler_config.json"
        parts["scheduler_config"] = read_json(scheduler_path) if scheduler_path.is_file() else None
    parts["family"] = family
    parts["prediction_known"] = detection.prediction_known
    parts["identity"] = weights_identity(path)
    return parts


def _components_from_state(
    state: dict[str, Any], family: str, config_dir: Path, dtype: torch.dtype, source: str
) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    common = {"config": str(config_dir), "local_files_only": True, "torch_dtype": dtype}
    try:
        with _quiet_diffusers():  # it warns about an empty fp32-module list on every dtype cast
            unet = UNet2DConditionModel.from_single_file(state, subfolder="unet", **common)
            vae = AutoencoderKL.from_single_file(state, subfolder="vae", **common)
        encoders = [
            create_diffusers_clip_model_from_ldm(
                CLIPTextModelWithProjection if index == 1 else CLIPTextModel,
                state,
                subfolder="text_encoder" if index == 0 else "text_encoder_2",
                **common,
            )
            for index in range(family_spec(family).num_text_encoders)
        ]
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(
            f"{source}: cannot convert the checkpoint as a {family} model ({e})",
            hint="check model.family, or that the file is a complete SD checkpoint",
        ) from e
    for name, module in (("unet", unet), ("vae", vae), *(("text encoder", m) for m in encoders)):
        missing = [k for k, v in module.state_dict().items() if v.is_meta]
        if missing:  # the converter silently skipped weights the model needs
            raise ModelError(
                f"{source}: no weights for the {name}'s {', '.join(missing[:3])}",
                hint=f"check that the file is a complete {family} checkpoint",
            )
    tokenizers = [_tokenizer_for(family, index, config_dir) for index in range(len(encoders))]
    return {"unet": unet, "vae": vae, "text_encoders": encoders, "tokenizers": tokenizers}


@contextmanager
def _quiet_diffusers() -> Iterator[None]:
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def _tokenizer_for(family: str, index: int, config_dir: Path) -> Any:
    """The tokenizer from the config folder; without a vocabulary there (the published configs),
    OpenAI CLIP's, which loraforge ships, with the folder's pad token."""
    from transformers import CLIPTokenizer

    from loraforge.models.clip_tokenizer import clip_merges, write_clip_tokenizer

    folder = config_dir / ("tokenizer" if index == 0 else "tokenizer_2")
    if (folder / "vocab.json").is_file():
        return CLIPTokenizer.from_pretrained(folder)
    specials = read_json(folder / "special_tokens_map.json")
    with tempfile.TemporaryDirectory(prefix="loraforge-tokenizer-") as tmp:
        out = write_clip_tokenizer(Path(tmp), clip_merges(), pad_token=specials["pad_token"])
        return CLIPTokenizer.from_pretrained(out)


def _download(repo_id: str) -> Path:
    """Fetch (or find in the cache) the parts of a hub model that training needs."""
    from huggingface_hub import snapshot_download

    from loraforge.models.hub import hub_reachable

    online = hub_reachable()
    try:
        return Path(
            snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=not online)
        )
    except Exception as e:  # hub errors have no common base class below Exception
        if not online:
            raise ModelError(
                f"{repo_id} is not in the Hugging Face cache and the hub cannot be reached",
                hint="download the model and set model.base to its folder, or run once online "
                "to fill the cache (with HF_HUB_OFFLINE=1 only cached models are used)",
            ) from e
        raise ModelError(
            f"cannot get {repo_id} from the Hugging Face hub ({type(e).__name__}: {e})",
            hint="check the id and your connection (HF_HUB_OFFLINE=1 allows only cached models), "
            "or download the model and set model.base to its folder",
        ) from e


def load_vae(
    vae: str, base_vae: Any, dtype: torch.dtype, *, allow_pickle: bool = False
) -> tuple[Any, str]:
    """Load a VAE override: a diffusers VAE folder (or a model folder with ``vae/``) or a file.

    A single file may be in LDM layout (``encoder.down.0…``, optionally ``first_stage_model.``)
    or diffusers layout; it takes the base model's VAE config.

    Returns:
        ``(vae, identity)``.

    Raises:
        ModelError: missing, unreadable or incompatible VAE.
    """
    from diffusers import AutoencoderKL

    path = Path(vae).expanduser()
    try:
        if path.is_dir():
            sub = "vae" if (path / "vae" / "config.json").is_file() else None
            loaded = AutoencoderKL.from_pretrained(path, subfolder=sub, torch_dtype=dtype)
        elif path.is_file():
            state, _ = read_checkpoint(path, allow_pickle=allow_pickle)
            with tempfile.TemporaryDirectory(prefix="loraforge-vae-") as tmp, _quiet_diffusers():
                base_vae.save_config(Path(tmp) / "vae")
                loaded = AutoencoderKL.from_single_file(
                    state, config=tmp, subfolder="vae", local_files_only=True, torch_dtype=dtype
                )
        else:
            raise ModelError(f"VAE not found: {vae}", hint="check model.vae in the recipe")
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"{vae}: cannot load it as a VAE for this model ({e})") from e
    return loaded, weights_identity(path)


def weights_identity(path: Path) -> str:
    """A short hash of the weight files under ``path`` (resolved path, size, mtime of each).

    Cheap (no reading of the weights) yet changes whenever a file is replaced or edited.
    """
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        if file.suffix not in (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".json"):
            continue
        stat = file.stat()
        digest.update(f"{file}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
