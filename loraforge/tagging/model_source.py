"""Where a tagger or captioner comes from: a local folder, or a Hugging Face hub id.

Hub models are downloaded into the standard Hugging Face cache (``HF_HOME``/``HF_HUB_CACHE``),
so other tools share them. Offline (``HF_HUB_OFFLINE=1`` or no connection, found out at once by
:func:`loraforge.models.hub.hub_reachable`) cached models are used as they are, and a model that
is not cached raises a :class:`ModelError` naming the model, the files it needs and a folder to
put them in.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraforge.errors import DependencyError, ModelError

TAGGER_FILES = ("model.onnx", "selected_tags.csv")
# What a transformers image-to-text model needs. Weights only as safetensors: loraforge never
# unpickles a download by default (DESIGN.md, data safety).
CAPTIONER_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "merges*")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class TaggerFiles:
    """The two files a WD14-family tagger consists of."""

    model: Path
    labels: Path


def looks_like_hub_id(model: str) -> bool:
    """``owner/name`` with no path syntax (``./``, ``~``, a drive, backslashes)."""
    return bool(_HUB_ID.match(model)) and not model.startswith((".", "~"))


def resolve_tagger(model: str, suggest_dir: Path | None = None) -> TaggerFiles:
    """Find ``model.onnx`` and ``selected_tags.csv`` of a tagger.

    Args:
        model: a folder holding both files, the path of the ``.onnx`` file (the CSV next to it),
            or a hub id such as ``SmilingWolf/wd-v1-4-convnext-tagger-v2``.
        suggest_dir: where the error message suggests putting a model that cannot be
            downloaded (default ``./models``).

    Raises:
        ModelError: the folder lacks a file, the path does not exist, or a hub model is not
            cached and cannot be downloaded.
    """
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == ".onnx":
        return _local_tagger(path.parent, path)
    if path.is_dir():
        return _local_tagger(path, path / TAGGER_FILES[0])
    if not looks_like_hub_id(model):
        raise ModelError(
            f"tagger model {model!r}: no such folder",
            hint="set tagging.model to a folder holding model.onnx and selected_tags.csv, "
            "or to a hub id such as SmilingWolf/wd-v1-4-convnext-tagger-v2",
        )
    files = [_hub_file(model, name, suggest_dir) for name in TAGGER_FILES]
    return TaggerFiles(model=files[0], labels=files[1])


def _local_tagger(folder: Path, onnx_path: Path) -> TaggerFiles:
    labels = folder / TAGGER_FILES[1]
    missing = [p.name for p in (onnx_path, labels) if not p.is_file()]
    if missing:
        raise ModelError(
            f"tagger folder {folder} lacks {' and '.join(missing)}",
            hint="a WD14-format tagger folder holds model.onnx and selected_tags.csv "
            "(download both from the model's Hugging Face page)",
        )
    return TaggerFiles(model=onnx_path, labels=labels)


def _hub_file(repo_id: str, filename: str, suggest_dir: Path | None) -> Path:
    from loraforge.models.hub import hub_reachable

    hf = _huggingface_hub()
    online = hub_reachable()
    try:
        return Path(hf.hf_hub_download(repo_id, filename, local_files_only=not online))
    except Exception as e:  # the hub raises many types (offline, 404, HTTP, connection)
        raise _download_error(repo_id, TAGGER_FILES, suggest_dir, e, offline=not online) from e


def resolve_captioner(model: str, suggest_dir: Path | None = None) -> Path:
    """The local folder of a transformers image-to-text model.

    Args:
        model: a folder with ``config.json`` (and processor files, safetensors weights), or a
            hub id such as ``Salesforce/blip-image-captioning-base``.
        suggest_dir: see :func:`resolve_tagger`.

    Raises:
        ModelError: the folder has no ``config.json``, the path does not exist, or a hub model
            is not cached and cannot be downloaded.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"captioner folder {path} has no config.json",
                hint="use a transformers model folder (config.json, processor files, "
                "*.safetensors), e.g. one saved with save_pretrained()",
            )
        return path
    if not looks_like_hub_id(model):
        raise ModelError(
            f"captioner model {model!r}: no such folder",
            hint="set tagging.model to a transformers model folder or a hub id such as "
            "Salesforce/blip-image-captioning-base",
        )
    from loraforge.models.hub import hub_reachable

    hf = _huggingface_hub()
    online = hub_reachable()
    try:
        return Path(
            hf.snapshot_download(
                model, allow_patterns=list(CAPTIONER_PATTERNS), local_files_only=not online
            )
        )
    except Exception as e:
        needs = ("config.json", "the processor/tokenizer files", "*.safetensors")
        raise _download_error(model, needs, suggest_dir, e, offline=not online) from e


def _download_error(
    repo_id: str,
    files: tuple[str, ...],
    suggest_dir: Path | None,
    cause: Exception,
    *,
    offline: bool = False,
) -> ModelError:
    folder = (suggest_dir or Path("models")) / repo_id.split("/")[-1]
    offline = offline or _is_offline(cause)
    what = (
        "is not in the Hugging Face cache and this machine is offline"
        if offline
        else (f"cannot be downloaded ({type(cause).__name__}: {_first_line(cause)})")
    )
    return ModelError(
        f"model {repo_id!r} {what}",
        hint=f"put {', '.join(files)} from https://huggingface.co/{repo_id} into {folder} and set "
        f"tagging.model: {folder} in the recipe, or run once online to fill the cache "
        f"({_hub_cache()})",
    )


def _is_offline(error: Exception) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError"})


def _hub_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # an old huggingface_hub without constants: name the usual place
        return "~/.cache/huggingface/hub"


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else ""


def _huggingface_hub() -> Any:
    try:
        import huggingface_hub
    except ImportError as e:  # pragma: no cover - a dependency of transformers
        raise DependencyError(
            "huggingface_hub is needed to download models", hint="pip install huggingface_hub"
        ) from e
    return huggingface_hub
