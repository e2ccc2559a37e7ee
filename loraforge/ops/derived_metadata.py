"""Metadata for LoRA files that loraforge derives (resized, merged, extracted), sd-scripts style."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence

#: sd-scripts' ``ss_base_model_version`` values.
BASE_MODEL_VERSION = {
    ("sd1", False): "sd_v1",
    ("sd1", True): "sd_v1_v",
    ("sd2", False): "sd_v2",
    ("sd2", True): "sd_v2_v",
    ("sdxl", False): "sdxl_base_v1-0",
    ("sdxl", True): "sdxl_base_v1-0",
}

_FLOW = {
    "flux": ("flux-1", "https://github.com/black-forest-labs/flux", "flux1"),
    "sd3": ("stable-diffusion-3", "https://github.com/Stability-AI/generative-models", None),
}


def base_model_metadata(
    family: str | None, v_prediction: bool | None, title: str
) -> dict[str, str]:
    """``ss_v2``/``ss_base_model_version`` and the modelspec 1.0.1 "must" fields for a LoRA.

    Args:
        family: ``sd1``, ``sd2``, ``sdxl``, ``sd3``, ``flux`` or ``None`` (then only the title
            is written).
        v_prediction: a v-prediction base.
        title: ``modelspec.title`` (usually the output file's stem).
    """
    meta: dict[str, str] = {"modelspec.sai_model_spec": "1.0.1", "modelspec.title": title}
    meta["modelspec.date"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())
    if family is None:
        return meta
    if family in _FLOW:
        # the variant (dev/schnell, SD3 Medium/3.5 Large) is not in the LoRA: sd-scripts' generic
        # architecture names; ss_base_model_version only where it does not depend on it
        arch, impl, version = _FLOW[family]
        meta |= {"ss_v2": "False", "modelspec.architecture": f"{arch}/lora"}
        meta |= {"modelspec.implementation": impl, "modelspec.resolution": "1024x1024"}
        if version:
            meta["ss_base_model_version"] = version
        return meta
    v = bool(v_prediction)
    meta["ss_v2"] = str(family == "sd2")
    meta["ss_base_model_version"] = BASE_MODEL_VERSION[(family, v)]
    if family == "sdxl":
        arch, impl, reso = (
            "stable-diffusion-xl-v1-base",
            "https://github.com/Stability-AI/generative-models",
            "1024x1024",
        )
    elif family == "sd2":
        arch = "stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512"
        impl, reso = "diffusers", "768x768" if v else "512x512"
    else:
        arch, impl, reso = "stable-diffusion-v1", "diffusers", "512x512"
    meta["modelspec.architecture"] = f"{arch}/lora"
    meta["modelspec.implementation"] = impl
    meta["modelspec.resolution"] = reso
    if v:
        meta["modelspec.prediction_type"] = "v"
    return meta


def network_metadata(
    dims: tuple[str, str], conv: tuple[str, str] | None, comment: str
) -> dict[str, str]:
    """``ss_network_*`` for a plain kohya LoRA/LoCon file.

    Args:
        dims: ``(ss_network_dim, ss_network_alpha)`` as strings (``"Dynamic"`` allowed).
        conv: ``(conv_dim, conv_alpha)`` when the file has conv 3x3 modules.
        comment: ``ss_training_comment``.
    """
    args = {"conv_dim": conv[0], "conv_alpha": conv[1]} if conv else {}
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": dims[0],
        "ss_network_alpha": dims[1],
        "ss_network_args": json.dumps(args),
        "ss_training_comment": comment,
    }


def common_rank_alpha(pairs: list[tuple[int, float]]) -> tuple[str, str]:
    """The shared ``(rank, alpha)`` as metadata strings, or ``("Dynamic", "Dynamic")``."""
    distinct = {(r, round(a, 6)) for r, a in pairs}
    if len(distinct) != 1:
        return "Dynamic", "Dynamic"
    rank, alpha = distinct.pop()
    return str(rank), str(float(alpha))


def derived_lora_metadata(
    family: str | None,
    v_prediction: bool | None,
    title: str,
    modules: list[tuple[int, float, bool]],
    comment: str,
) -> dict[str, str]:
    """Metadata for a LoRA loraforge computed (merged or extracted): base model + network keys.

    Args:
        family, v_prediction: the base-model family it is for (``None``: unknown).
        title: ``modelspec.title``.
        modules: ``(rank, alpha, is_conv3x3)`` per written module.
        comment: ``ss_training_comment``.
    """
    meta = base_model_metadata(family, v_prediction, title)
    linear = [(r, a) for r, a, conv in modules if not conv]
    conv = [(r, a) for r, a, is_conv in modules if is_conv]
    dims = common_rank_alpha(linear) if linear else ("Dynamic", "Dynamic")
    meta.update(network_metadata(dims, common_rank_alpha(conv) if conv else None, comment))
    return meta


def training_comment(metadata: Mapping[str, str]) -> str:
    """``ss_training_comment``, or ``""`` when absent (sd-scripts writes ``"None"`` for none)."""
    comment = (metadata.get("ss_training_comment") or "").strip()
    return "" if comment == "None" else comment


def resolution_of(metadata: Mapping[str, str]) -> tuple[int, int] | None:
    """``(width, height)`` from ``modelspec.resolution`` (``96x96``) or ``ss_resolution``
    (``(96, 96)``, as sd-scripts writes it); ``None`` when neither says."""
    for key in ("modelspec.resolution", "ss_resolution"):
        numbers = re.findall(r"\d+", metadata.get(key) or "")
        if len(numbers) == 1:
            return int(numbers[0]), int(numbers[0])
        if len(numbers) == 2:
            return int(numbers[0]), int(numbers[1])
    return None


def resolution_text(resolution: tuple[int, int]) -> str:
    """``96x96``: the one way loraforge shows a resolution."""
    return f"{resolution[0]}x{resolution[1]}"


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _json_dict(text: str | None) -> dict:
    try:
        value = json.loads(text or "")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def inherited_metadata(inputs: Sequence[Mapping[str, str]]) -> dict[str, str]:
    """What a LoRA merged from ``inputs`` keeps of their metadata.

    The training resolution (the largest when they differ, in both sd-scripts' and modelspec's
    form), trigger phrases and tags (each once, in order), and the dataset folders and tag
    counts (``ss_dataset_dirs``, ``ss_tag_frequency``: counts of a folder in several inputs
    are added), so ``check`` and the UIs show what the merged LoRA responds to.
    """
    meta: dict[str, str] = {}
    sizes = [size for size in map(resolution_of, inputs) if size is not None]
    if sizes:
        width, height = max(sizes, key=lambda s: (s[0] * s[1], s))
        meta["modelspec.resolution"] = resolution_text((width, height))
        meta["ss_resolution"] = str((width, height))
    for key in ("modelspec.trigger_phrase", "modelspec.tags"):
        values: list[str] = []
        for m in inputs:
            values += [v for v in _split(m.get(key)) if v not in values]
        if values:
            meta[key] = ", ".join(values)
    dirs: dict[str, dict] = {}
    tags: dict[str, dict[str, int]] = {}
    for m in inputs:
        for folder, info in _json_dict(m.get("ss_dataset_dirs")).items():
            dirs.setdefault(folder, info)
        for folder, counts in _json_dict(m.get("ss_tag_frequency")).items():
            merged = tags.setdefault(folder, {})
            for tag, n in (counts if isinstance(counts, dict) else {}).items():
                if isinstance(n, int | float):
                    merged[tag] = merged.get(tag, 0) + int(n)
    if dirs:
        meta["ss_dataset_dirs"] = json.dumps(dirs)
    if tags:
        meta["ss_tag_frequency"] = json.dumps(tags)
    return meta
