"""Load SD3 / FLUX.1 models: a diffusers folder, or single files as users hold them.

FLUX is usually four files (the transformer in BFL layout, ``clip_l``, ``t5xxl``, ``ae``) and SD3.5
one file with or without its text encoders; the recipe names the separate files
(``model.clip_l``, ``model.clip_g``, ``model.t5xxl``, ``model.vae``, sd-scripts' option names).
Architectures come from the configs shipped in ``loraforge/models/configs`` (the variant read
from the transformer's keys picks the folder), so nothing is downloaded when files are given.
fp32/fp16/bf16 and fp8 (``float8_e4m3fn``) weight files load; weights are cast to the training
dtype. The T5 tokenizer's vocabulary is not shipped: it is taken from a diffusers folder, or from
the Hugging Face cache (``google/t5-v1_1-xxl``, the tokenizer sd-scripts uses).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraforge.errors import ModelError
from loraforge.fileio import read_json
from loraforge.models.configs import architecture_config_dir
from loraforge.models.families import (
    Detection,
    detect_transformer_family,
    resolve_family,
)
from loraforge.models.flow_tokenizers import folder_tokenizer
from loraforge.models.single_file import read_checkpoint

if TYPE_CHECKING:
    import torch

_CONFIG_FOLDERS = {
    ("flux", "dev"): "flux-dev",
    ("flux", "schnell"): "flux-schnell",
    ("sd3", "medium"): "sd3-medium",
    ("sd3", "5-medium"): "sd35-medium",
    ("sd3", "5-large"): "sd35-large",
}
# where full single-file checkpoints keep each text encoder (ComfyUI / SAI layout)
_EMBEDDED_ENCODERS = {
    "clip_l": ("text_encoders.clip_l.transformer.",),
    "clip_g": ("text_encoders.clip_g.transformer.",),
    "t5xxl": ("text_encoders.t5xxl.transformer.",),
}


def flow_config_dir(family: str, variant: str | None) -> Path:
    """The shipped config folder of a flow variant (``flux-dev``, ``sd35-large`` …)."""
    default = "dev" if family == "flux" else "5-large"
    return architecture_config_dir(_CONFIG_FOLDERS[(family, variant or default)])


def encoder_slots(family: str) -> tuple[str, ...]:
    """The text encoders of a family in order, by recipe option: FLUX ``clip_l, t5xxl``; SD3
    ``clip_l, clip_g, t5xxl``."""
    return ("clip_l", "t5xxl") if family == "flux" else ("clip_l", "clip_g", "t5xxl")


def is_flow_folder(folder: Path) -> bool:
    """Whether a diffusers folder holds a transformer (SD3 / FLUX) rather than a UNet."""
    return (folder / "transformer" / "config.json").is_file()


def load_flow_folder(
    folder: Path,
    requested: str,
    dtype: torch.dtype,
    files: Mapping[str, str | None],
    *,
    source: str,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """The parts of a diffusers SD3 / FLUX folder (``files`` replace its text encoders)."""
    from diffusers import AutoencoderKL

    index_path = folder / "model_index.json"
    model_index = read_json(index_path) if index_path.is_file() else {}
    detection = detect_transformer_family(
        model_index, read_json(folder / "transformer" / "config.json")
    )
    family = resolve_family(requested, detection, source=source)
    try:
        transformer = transformer_class(family).from_pretrained(
            folder, subfolder="transformer", torch_dtype=dtype
        )
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"{source}: cannot load the model ({e})") from e
    encoders, tokenizers = [], []
    for index, slot in enumerate(encoder_slots(family)):
        sub = "text_encoder" if index == 0 else f"text_encoder_{index + 1}"
        if files.get(slot):
            encoders.append(
                load_encoder_file(str(files[slot]), slot, folder / sub, dtype, allow_pickle)
            )
        else:
            encoders.append(
                _encoder_class(family, slot).from_pretrained(
                    folder, subfolder=sub, torch_dtype=dtype
                )
            )
        tokenizers.append(folder_tokenizer(folder, index, family, slot))
    return _parts(family, detection, transformer, vae, encoders, tokenizers, folder)


def load_flow_checkpoint(
    path: Path,
    state: dict[str, Any],
    metadata: Mapping[str, str],
    detection: Detection,
    requested: str,
    dtype: torch.dtype,
    files: Mapping[str, str | None],
    allow_pickle: bool,
) -> dict[str, Any]:
    """:func:`load_flow_file` on the configs a loraforge-written file carries, else the
    shipped ones."""
    from loraforge.models.single_file import embedded_configs, materialise_config_dir

    embedded = embedded_configs(metadata)
    with tempfile.TemporaryDirectory(prefix="loraforge-config-") as tmp:
        own = materialise_config_dir(embedded, Path(tmp)) if embedded else None
        return load_flow_file(
            path, state, detection, requested, dtype, files,
            allow_pickle=allow_pickle, config_dir=own,
        )  # fmt: skip


def load_flow_file(
    path: Path,
    state: dict[str, Any],
    detection: Detection,
    requested: str,
    dtype: torch.dtype,
    files: Mapping[str, str | None],
    *,
    allow_pickle: bool = False,
    config_dir: Path | None = None,
) -> dict[str, Any]:
    """The parts of a single-file SD3 / FLUX checkpoint (transformer only, or with VAE and text
    encoders), with the separate files named in ``files`` (``clip_l``, ``clip_g``, ``t5xxl``).
    ``config_dir`` replaces the shipped configs (a file loraforge wrote carries its own).

    The VAE comes from the file when it has one; otherwise ``model.vae`` must name it (the
    caller loads that override onto the shipped config's VAE).

    Raises:
        ModelError: a text encoder neither in the file nor named in the recipe; unreadable or
            incomplete weights.
    """
    from diffusers import AutoencoderKL

    family = resolve_family(requested, detection, source=str(path))
    config_dir = config_dir or flow_config_dir(family, detection.variant)
    common = {"config": str(config_dir), "local_files_only": True, "torch_dtype": dtype}
    others = ("text_encoders.", "first_stage_model.", "vae.", "cond_stage_model.", "conditioner.")
    own = {k: v for k, v in state.items() if not k.startswith(others)}  # the transformer's keys
    try:
        if any(
            k.startswith(("double_blocks.", "joint_blocks.", "model.diffusion_model.")) for k in own
        ):
            blocks = flux_block_counts(own) if family == "flux" else {}
            transformer = transformer_class(family).from_single_file(
                own, subfolder="transformer", **common, **blocks
            )
        else:  # already diffusers' layout (a saved diffusers transformer)
            transformer = _diffusers_transformer(family, config_dir, own, dtype)
        if any(k.startswith(("first_stage_model.", "vae.")) for k in state):
            vae = AutoencoderKL.from_single_file(state, subfolder="vae", **common)
        elif files.get("vae"):  # a transformer-only file: model.vae's weights replace these
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
        else:
            raise ModelError(
                f"{path} holds no VAE",
                hint="set model.vae to the autoencoder file (FLUX: ae.safetensors), as "
                "sd-scripts' --ae",
            )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(
            f"{path}: cannot convert the checkpoint as a {family} transformer ({e})",
            hint="check model.family, or that the file is a complete transformer",
        ) from e
    encoders, tokenizers = [], []
    for index, slot in enumerate(encoder_slots(family)):
        sub = "text_encoder" if index == 0 else f"text_encoder_{index + 1}"
        if files.get(slot):
            encoder = load_encoder_file(
                str(files[slot]), slot, config_dir / sub, dtype, allow_pickle
            )
        else:
            encoder = _encoder_from_checkpoint(state, slot, config_dir / sub, dtype, path)
        encoders.append(encoder)
        beside = Path(str(files[slot])).expanduser().parent if files.get(slot) else None
        tokenizers.append(folder_tokenizer(config_dir, index, family, slot, beside))
    return _parts(family, detection, transformer, vae, encoders, tokenizers, path)


def flux_block_counts(state: Mapping[str, Any]) -> dict[str, int]:
    """``num_layers`` / ``num_single_layers`` of a BFL-layout FLUX transformer from its keys
    (``double_blocks.N.`` / ``single_blocks.N.``), which override the config's 19 + 38: pruned
    FLUX models have fewer blocks, and diffusers would leave the missing ones without weights."""
    indices: dict[str, set[int]] = {"double_blocks": set(), "single_blocks": set()}
    for key in state:
        parts = key.removeprefix("model.diffusion_model.").split(".")
        if len(parts) > 2 and parts[0] in indices and parts[1].isdigit():
            indices[parts[0]].add(int(parts[1]))
    options = {"double_blocks": "num_layers", "single_blocks": "num_single_layers"}
    return {options[kind]: max(found) + 1 for kind, found in indices.items() if found}


def _diffusers_transformer(
    family: str, config_dir: Path, state: Mapping[str, Any], dtype: torch.dtype
) -> Any:
    """A transformer from a state dict in diffusers' own layout (strict: every key must fit)."""
    import torch

    cls = transformer_class(family)
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(str(config_dir / "transformer")))
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.to(dtype)


def _parts(family, detection, transformer, vae, encoders, tokenizers, origin) -> dict[str, Any]:
    from loraforge.models.loading import weights_identity

    scheduler_dir = flow_config_dir(family, detection.variant) / "scheduler"
    own = Path(origin) / "scheduler" if Path(origin).is_dir() else scheduler_dir
    scheduler = own / "scheduler_config.json"
    return {
        "family": family,
        "variant": detection.variant,
        "unet": transformer,
        "vae": vae,
        "text_encoders": encoders,
        "tokenizers": tokenizers,
        "scheduler_config": read_json(scheduler) if scheduler.is_file() else None,
        "prediction_known": True,
        "identity": weights_identity(Path(origin)),
    }


def transformer_class(family: str) -> Any:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    return FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel


def _encoder_class(family: str, slot: str) -> Any:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    if slot == "t5xxl":
        return T5EncoderModel
    # FLUX reads CLIP-L's pooled output; SD3 the projected ones of CLIP-L and CLIP-G
    return CLIPTextModel if family == "flux" else CLIPTextModelWithProjection


def load_encoder_file(
    file: str, slot: str, config_folder: Path, dtype: torch.dtype, allow_pickle: bool
) -> Any:
    """A text encoder from a separate weights file (``clip_l.safetensors``, ``t5xxl_fp8…``).

    Raises:
        ModelError: missing or unreadable file, or weights that do not fit the architecture.
    """
    from loraforge.models.pickles import refuse_pickles

    refuse_pickles(file, f"model.{slot}", allow_pickle)
    state, _ = read_checkpoint(Path(file).expanduser(), allow_pickle=allow_pickle)
    return _build_encoder(state, slot, config_folder, dtype, file)


def _encoder_from_checkpoint(
    state: Mapping[str, Any], slot: str, config_folder: Path, dtype: torch.dtype, path: Path
) -> Any:
    for prefix in _EMBEDDED_ENCODERS[slot]:
        part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if part:
            return _build_encoder(part, slot, config_folder, dtype, f"{path} ({slot})")
    raise ModelError(
        f"{path} has no {slot} text encoder",
        hint=f"set model.{slot} to its file (e.g. {slot}.safetensors), as sd-scripts' --{slot}",
    )


def _build_encoder(
    state: Mapping[str, Any], slot: str, config_folder: Path, dtype: torch.dtype, source: str
) -> Any:
    """Instantiate the encoder on the meta device and assign the file's tensors (cast)."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(config_folder))
    cls = class_for_config(config)
    with torch.device("meta"):
        model = cls(config)
    expected = model.state_dict()
    tensors = _match_keys(state, expected.keys())
    if "shared.weight" in tensors:  # T5: the encoder's embedding is the shared one
        tensors.setdefault("encoder.embed_tokens.weight", tensors["shared.weight"])
    missing = [k for k in expected if k not in tensors]
    wrong = [
        k for k in expected if k in tensors and tuple(tensors[k].shape) != tuple(expected[k].shape)
    ]
    if missing or wrong:
        bad = (missing or wrong)[:3]
        raise ModelError(
            f"{source}: not a {slot} text encoder for this model "
            f"({'missing' if missing else 'wrong shape for'} {', '.join(bad)})",
            hint=f"check model.{slot}",
        )
    cast = {k: tensors[k].to(dtype) for k in expected}
    model.load_state_dict(cast, strict=True, assign=True)
    model.requires_grad_(False)
    return model.eval()


def class_for_config(config: Any) -> Any:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    arch = (getattr(config, "architectures", None) or [""])[0]
    if config.model_type == "t5":
        return T5EncoderModel
    return CLIPTextModelWithProjection if arch == "CLIPTextModelWithProjection" else CLIPTextModel


def _match_keys(state: Mapping[str, Any], expected: Any) -> dict[str, Any]:
    """Rename a file's keys onto the model's: with or without the ``text_model.`` wrapper
    (transformers 5 dropped it from ``CLIPTextModel``), without ``transformer.`` prefixes."""
    expected = set(expected)
    out: dict[str, Any] = {}
    for key, value in state.items():
        key = key.removeprefix("transformer.")
        candidates = (key, key.removeprefix("text_model."), f"text_model.{key}")
        for candidate in candidates:
            if candidate in expected:
                out[candidate] = value
                break
    return out


def models_from_configs(family: str, configs: Mapping[str, Any]) -> tuple[Any, list[Any]]:
    """The transformer and text encoders built from component configs (random or, under
    ``torch.device("meta")``, no weights): for dry runs and estimates."""
    from transformers import AutoConfig

    def kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in config.items() if not k.startswith("_")}

    transformer = transformer_class(family).from_config(kwargs(configs["transformer"]))
    encoders = []
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if name in configs:
            config = dict(configs[name])
            model_type = config.pop("model_type")
            encoder_config = AutoConfig.for_model(model_type, **kwargs(config))
            encoders.append(class_for_config(encoder_config)(encoder_config))
    return transformer, encoders
