"""Which base model a LoRA is for (SD 1.x, SD 2.x, SDXL), from key names, metadata and shapes.

Key names decide between SDXL and SD 1.x/2.x: SDXL files use ``lora_te1_``/``lora_te2_`` and the
SGM UNet names (``input_blocks``/``middle_block``/``output_blocks``), SD 1.x/2.x files
``lora_te_`` and the diffusers UNet names (``down_blocks``/``mid_block``/``up_blocks``).
SD 1.x vs 2.x is read from sd-scripts/modelspec metadata (``ss_base_model_version``, ``ss_v2``,
``modelspec.architecture``), else from the cross-attention width (768 = CLIP-L = SD 1.x,
1024 = OpenCLIP-H = SD 2.x).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from loraforge.ops.modules import LoraModule

FAMILIES = ("sd1", "sd2", "sdxl")
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}

_SDXL_PREFIXES = (
    "lora_te1_",
    "lora_te2_",
    "lora_unet_input_blocks_",
    "lora_unet_middle_block_",
    "lora_unet_output_blocks_",
    "lora_unet_label_emb_",
)
_SD_PREFIXES = (
    "lora_te_",
    "lora_unet_down_blocks_",
    "lora_unet_mid_block_",
    "lora_unet_up_blocks_",
)


@dataclass(frozen=True)
class FamilyGuess:
    """The detected family and why.

    Attributes:
        family: ``sd1``, ``sd2``, ``sdxl``, or ``None`` when it cannot be told.
        evidence: what decided it, for reports.
        v_prediction: True/False when the metadata says, else ``None``.
        conflict: a description when metadata and key names disagree.
    """

    family: str | None
    evidence: str
    v_prediction: bool | None = None
    conflict: str | None = None

    @property
    def display(self) -> str:
        if self.family is None:
            return "unknown"
        name = FAMILY_NAMES[self.family]
        return f"{name} (v-prediction)" if self.v_prediction else name


def family_from_metadata(metadata: Mapping[str, str]) -> tuple[str | None, bool | None, str]:
    """``(family, v_prediction, evidence)`` from sd-scripts/modelspec metadata alone."""
    version = metadata.get("ss_base_model_version", "")
    arch = metadata.get("modelspec.architecture", "")
    v_pred: bool | None = None
    if metadata.get("modelspec.prediction_type"):
        v_pred = metadata["modelspec.prediction_type"] == "v"
    if version:
        if version.endswith("_v"):
            v_pred = True
        evidence = f"ss_base_model_version={version}"
        if version.startswith("sdxl"):
            return "sdxl", v_pred, evidence
        if version.startswith("sd_v2"):
            return "sd2", v_pred, evidence
        if version.startswith("sd_v1"):
            return "sd1", v_pred, evidence
    if arch:
        evidence = f"modelspec.architecture={arch}"
        if arch.startswith("stable-diffusion-xl"):
            return "sdxl", v_pred, evidence
        if arch.startswith("stable-diffusion-v2"):
            is_v = arch.split("/")[0].endswith("-v")
            return "sd2", True if is_v else v_pred, evidence
        if arch.startswith("stable-diffusion-v1"):
            return "sd1", v_pred, evidence
    if metadata.get("ss_v2") == "True":
        return "sd2", v_pred, "ss_v2=True"
    return None, v_pred, ""


def family_from_names(names: Iterable[str]) -> str | None:
    """``sdxl``, ``sd`` (SD 1.x or 2.x) or ``None`` from kohya module names."""
    names = list(names)
    if any(n.startswith(_SDXL_PREFIXES) for n in names):
        return "sdxl"
    if any(n.startswith(_SD_PREFIXES) for n in names):
        return "sd"
    return None


def _sd_version_from_widths(modules: Mapping[str, LoraModule]) -> str | None:
    for name, module in modules.items():
        if module.algorithm != "lora":
            continue
        is_cross_kv = name.startswith("lora_unet_") and name.endswith(("attn2_to_k", "attn2_to_v"))
        is_te_q = name.startswith("lora_te_") and name.endswith("self_attn_q_proj")
        if is_cross_kv or is_te_q:
            width = int(module.tensors["lora_down.weight"].shape[1])
            if width == 768:
                return "sd1"
            if width == 1024:
                return "sd2"
    return None


def detect_family(modules: Mapping[str, LoraModule], metadata: Mapping[str, str]) -> FamilyGuess:
    """Detect the base-model family of a LoRA (see the module docstring for the rules)."""
    by_names = family_from_names(modules)
    meta_family, v_pred, meta_evidence = family_from_metadata(metadata)
    if by_names == "sdxl":
        conflict = None
        if meta_family not in (None, "sdxl"):
            conflict = (
                f"metadata says {FAMILY_NAMES[meta_family]} ({meta_evidence}) "
                "but the keys are SDXL's"
            )
        return FamilyGuess(
            "sdxl", "key names (lora_te1_/lora_te2_, SGM UNet names)", v_pred, conflict
        )
    if by_names == "sd":
        if meta_family == "sdxl":
            return FamilyGuess(
                None,
                "key names",
                v_pred,
                f"metadata says SDXL ({meta_evidence}) but the keys are SD 1.x/2.x's",
            )
        if meta_family is not None:
            return FamilyGuess(meta_family, meta_evidence, v_pred)
        width = _sd_version_from_widths(modules)
        if width is not None:
            return FamilyGuess(width, "cross-attention width", v_pred)
        return FamilyGuess(None, "key names say SD 1.x or 2.x; nothing tells which", v_pred)
    if meta_family is not None:
        return FamilyGuess(meta_family, meta_evidence, v_pred)
    return FamilyGuess(None, "no kohya key names or base-model metadata", v_pred)
