"""Which base model a LoRA is for (SD 1.x, SD 2.x, SDXL, SD3/SD3.5, FLUX.1), from key names,
metadata and shapes.

FLUX.1 and SD3 files (sd-scripts' names on the BFL/SAI layouts) are told by their transformer
names (``lora_unet_double_blocks_``/``single_blocks_`` vs ``lora_unet_joint_blocks_``), or, with
only text-encoder modules, by ``lora_te3_`` (T5-XXL; with ``lora_te2_`` CLIP-G it is SD3) and
the metadata (``ss_base_model_version`` ``flux1``, ``modelspec.architecture`` ``flux-1-…`` /
``stable-diffusion-3-…``). They are checked first: FLUX's CLIP-L is ``lora_te1_`` like SDXL's.

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

FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux")
FAMILY_NAMES = {
    "sd1": "SD 1.x",
    "sd2": "SD 2.x",
    "sdxl": "SDXL",
    "sd3": "SD3/SD3.5",
    "flux": "FLUX.1",
}

_FLUX_PREFIXES = tuple(
    f"lora_unet_{n}"
    for n in (
        "double_blocks_",
        "single_blocks_",
        "img_in",
        "txt_in",
        "time_in_",
        "vector_in_",
        "guidance_in_",
    )
)
_SD3_PREFIXES = tuple(
    f"lora_unet_{n}"
    for n in ("joint_blocks_", "x_embedder_", "context_embedder", "t_embedder_", "y_embedder_")
)
# sd-scripts' ss_base_model_version of SD3 files is its model type
_SD3_VERSIONS = ("medium", "5-medium", "5-large", "large")

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
    if version == "flux1":
        return "flux", False, f"ss_base_model_version={version}"
    if version in _SD3_VERSIONS or version.startswith("sd3"):
        return "sd3", False, f"ss_base_model_version={version}"
    if arch.startswith("flux-1"):
        return "flux", False, f"modelspec.architecture={arch}"
    if arch.startswith("stable-diffusion-3"):
        return "sd3", False, f"modelspec.architecture={arch}"
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
    """``flux``, ``sd3``, ``flow`` (T5 text encoder only: either), ``sdxl``, ``sd`` (SD 1.x or 2.x)
    or ``None`` from kohya module names."""
    names = list(names)
    if any(n.startswith(_FLUX_PREFIXES) for n in names):
        return "flux"
    if any(n.startswith(_SD3_PREFIXES) for n in names):
        return "sd3"
    if any(n.startswith("lora_te3_") for n in names):
        return "sd3" if any(n.startswith("lora_te2_") for n in names) else "flow"
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
    if by_names in ("flux", "sd3", "flow"):
        return _flow_guess(by_names, meta_family, meta_evidence)
    if meta_family in ("flux", "sd3") and by_names is not None:
        # lora_te1_ alone (a CLIP-L-only FLUX/SD3 file) looks like SDXL's names
        only_te1 = all(n.startswith("lora_te1_") for n in modules)
        if only_te1:
            return FamilyGuess(meta_family, f"{meta_evidence}; CLIP-L modules only", False)
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


def _flow_guess(by_names: str, meta_family: str | None, meta_evidence: str) -> FamilyGuess:
    names = "key names (sd-scripts' FLUX/SD3 transformer or T5 names)"
    if by_names == "flow":
        if meta_family in ("flux", "sd3"):
            return FamilyGuess(meta_family, f"{meta_evidence}; T5 (lora_te3_) modules", False)
        return FamilyGuess(None, "T5-XXL modules (lora_te3_): FLUX.1 or SD3; nothing tells which")
    conflict = None
    if meta_family is not None and meta_family != by_names:
        conflict = (
            f"metadata says {FAMILY_NAMES[meta_family]} ({meta_evidence}) "
            f"but the keys are {FAMILY_NAMES[by_names]}'s"
        )
    return FamilyGuess(by_names, names, False, conflict)
