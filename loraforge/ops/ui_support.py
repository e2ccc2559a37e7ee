"""Which of the major UIs loads what: A1111 (v1.10), ComfyUI and Forge, as their loaders behave.

Read from the loaders themselves, not from their documentation:

- **A1111** ``extensions-builtin/Lora``: module types LoRA/LoCon, LoHa, LoKr, IA3, OFT/BOFT,
  full, norm and GLoRA. Its ``network_glora`` computes ``b2 @ b1 + W @ a2 @ a1``, the layout of
  LyCORIS before 2.0; a file in today's layout (``a1 (in, r)``, ``a2 (r, in)``…) raises a shape
  error on every module (A1111 counts the network as "with errors" and leaves the layers as they
  were). The OpenCLIP text encoders (SD 2.x's, SDXL's second) keep q/k/v fused in a
  ``MultiheadAttention``, which ``networks.py`` patches only when the file has ``q_proj``,
  ``k_proj``, ``v_proj`` and ``out_proj`` of that layer, so the modules of a layer with only
  some of them are skipped. DoRA: ``apply_weight_decompose`` always takes input-column norms.
- **ComfyUI** ``comfy/weight_adapter`` (lora, loha, lokr, glora, oft, boft) plus ``diff``/
  ``diff_b``/``w_norm``/``b_norm`` in ``comfy/lora.py``: no IA3 reader, so IA3 keys are "not
  loaded". DoRA: an output-axis ``dora_scale`` (``shape[0] == out``) is divided by the norm of the
  *original* weight, an input-axis one by the column norms of ``W + ΔW``.
- **Forge** ``backend/patcher/lora.py``: ComfyUI's key reading without IA3 or OFT/BOFT (its
  patch types are lora, loha, lokr, glora, diff, set), and ComfyUI's DoRA formula.

FLUX.1 and SD3 files (sd-scripts' ``lora_unet_`` names on the BFL/SAI layouts, ``lora_te1_`` CLIP-L,
``lora_te2_`` CLIP-G, ``lora_te3_`` T5-XXL): ComfyUI and Forge run those layouts and map
``lora_unet_`` + the module path onto ``diffusion_model.…`` for every weight (ComfyUI also the
T5 names); A1111 v1.10 has no FLUX.1 model, so it loads no FLUX file (its SD3 support runs SAI's
MMDiT, onto which its ``lora_unet`` -> ``diffusion_model`` fallback maps the SD3 names).
So the input-axis DoRA layout (``dora_scale`` ``(1, in)``, lycoris-lora's ``wd_on_output=False``)
is the one all three apply as training computed it.

Pure Python (no torch): ``check`` uses it for recipes as well as for files.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loraforge.recipe.types import NetworkConfig

UIS = ("A1111", "ComfyUI", "Forge")

#: what a gap does to the modules it names
NOT_LOADED, FAILS, DIFFERS = "not loaded", "fails", "differs"

_NO_OFT = "Forge's LoRA patcher has no OFT/BOFT patch type"
#: per file-level algorithm: the UIs that do not load it, and why
_ALGORITHM_GAPS: dict[str, dict[str, tuple[str, str]]] = {
    "ia3": {
        "ComfyUI": (NOT_LOADED, "ComfyUI has no IA3 reader"),
        "Forge": (NOT_LOADED, "Forge's LoRA patcher has no IA3 patch type"),
    },
    "oft": {"Forge": (NOT_LOADED, _NO_OFT)},
    "boft": {"Forge": (NOT_LOADED, _NO_OFT)},
    "glora": {
        "A1111": (
            FAILS,
            "A1111 reads GLoRA in the pre-2.0 LyCORIS layout and raises on today's",
        )
    },
}
_DORA_OUTPUT_AXIS = {
    "A1111": "A1111 divides by input-column norms whatever the dora_scale's shape",
    "ComfyUI": "ComfyUI divides an output-axis dora_scale by the original weight's row norms",
    "Forge": "Forge divides an output-axis dora_scale by the original weight's row norms",
}
DORA_OUTPUT_AXIS_WARNING = (
    "an output-axis DoRA file (dora_scale (out, 1), wd_on_output) renders differently from its "
    "training samples in A1111, ComfyUI and Forge: ComfyUI and Forge divide by the original "
    "weight's row norms, A1111 by column norms"
)
# recipe algorithm (lycoris backend) -> the file-level algorithm names above
_RECIPE_ALGORITHMS = {"ia3": "ia3", "diag-oft": "oft", "boft": "boft", "glora": "glora"}
#: per family: the UIs that cannot run the model at all
_FAMILY_GAPS = {"flux": {"A1111": (NOT_LOADED, "A1111 (v1.10) has no FLUX.1 model")}}
#: families whose text encoder A1111 runs as OpenCLIP (fused q/k/v): LoRA name prefix
OPEN_CLIP_TEXT_ENCODERS = {"sd2": "lora_te_", "sd2-v": "lora_te_", "sdxl": "lora_te2_"}
_ATTENTION = re.compile(
    r"^(lora_te[12]?_text_model_encoder_layers_\d+_self_attn)_(q|k|v|out)_proj$"
)


@dataclass(frozen=True)
class ModuleFacts:
    """What a UI's loader looks at in one module.

    Attributes:
        name: the kohya module name.
        algorithm: ``lora`` (incl. LoCon), ``loha``, ``lokr``, ``ia3``, ``oft``, ``boft``,
            ``glora``, ``full`` or ``norm``.
        dora_on_output: ``True``/``False`` for an output-/input-axis ``dora_scale``; ``None``
            without DoRA.
        old_glora: a GLoRA module in the pre-2.0 layout (which A1111 reads).
    """

    name: str
    algorithm: str
    dora_on_output: bool | None = None
    old_glora: bool = False


@dataclass(frozen=True)
class Gap:
    """Modules a UI does not apply as loraforge does.

    Attributes:
        ui: ``A1111``, ``ComfyUI`` or ``Forge``.
        effect: ``not loaded`` (skipped), ``fails`` (the loader raises) or ``differs`` (loaded
            with other numbers than training used).
        modules: the module names.
        reason: why, naming the loader's behaviour.
    """

    ui: str
    effect: str
    modules: tuple[str, ...]
    reason: str

    def __str__(self) -> str:
        what = {
            NOT_LOADED: "skips",
            FAILS: "fails on",
            DIFFERS: "applies other numbers than training to",
        }[self.effect]
        return f"{self.ui} {what} {len(self.modules)} module(s): {self.reason}"


@dataclass(frozen=True)
class UiSupport:
    """How one UI loads a file.

    Attributes:
        ui: the UI.
        total: modules in the file.
        gaps: what it does not load, or loads differently.
    """

    ui: str
    total: int
    gaps: tuple[Gap, ...]

    @property
    def unapplied(self) -> int:
        """Modules the UI skips or fails on."""
        names = {n for g in self.gaps if g.effect != DIFFERS for n in g.modules}
        return len(names)

    @property
    def status(self) -> str:
        """``loads`` (as trained), ``differs``, ``partial`` or ``none`` (nothing applied)."""
        if self.total and self.unapplied >= self.total:
            return "none"
        if self.unapplied:
            return "partial"
        return "differs" if self.gaps else "loads"

    @property
    def headline(self) -> str:
        """What the UI does with the file, in a few words (the gaps say why)."""
        applied = self.total - self.unapplied
        return {
            "loads": f"loads all {self.total} modules",
            "differs": f"loads all {self.total} modules, not as trained",
            "partial": f"applies {applied} of {self.total} modules",
            "none": f"applies none of the {self.total} modules",
        }[self.status]


def file_support(modules: Sequence[ModuleFacts], family: str | None) -> tuple[UiSupport, ...]:
    """How A1111, ComfyUI and Forge load a file's modules.

    Args:
        modules: the file's modules.
        family: ``sd1``, ``sd2``, ``sdxl``, ``sd3`` or ``flux`` (``None``: unknown, family rules
            are skipped).
    """
    gaps: dict[str, list[Gap]] = {ui: [] for ui in UIS}
    by_algorithm: dict[str, list[str]] = {}
    for m in modules:
        if m.algorithm == "glora" and m.old_glora:
            continue
        by_algorithm.setdefault(m.algorithm, []).append(m.name)
    for algorithm, names in by_algorithm.items():
        for ui, (effect, reason) in _ALGORITHM_GAPS.get(algorithm, {}).items():
            gaps[ui].append(Gap(ui, effect, tuple(names), reason))
    for ui, (effect, reason) in _FAMILY_GAPS.get(family or "", {}).items():
        gaps[ui].append(Gap(ui, effect, tuple(m.name for m in modules), reason))
    partial = _partial_open_clip_attention([m.name for m in modules], family)
    if partial:
        gaps["A1111"].append(
            Gap(
                "A1111",
                NOT_LOADED,
                partial,
                "A1111 patches an OpenCLIP text-encoder attention only when the file has its "
                "q, k, v and out projections",
            )
        )
    on_output = tuple(m.name for m in modules if m.dora_on_output)
    if on_output:
        for ui, reason in _DORA_OUTPUT_AXIS.items():
            gaps[ui].append(Gap(ui, DIFFERS, on_output, reason))
    return tuple(UiSupport(ui, len(modules), tuple(gaps[ui])) for ui in UIS)


def _partial_open_clip_attention(names: Sequence[str], family: str | None) -> tuple[str, ...]:
    """Attention modules of OpenCLIP text-encoder layers that lack some of q/k/v/out."""
    prefix = OPEN_CLIP_TEXT_ENCODERS.get(family or "")
    if prefix is None:
        return ()
    layers: dict[str, list[str]] = {}
    for name in names:
        match = _ATTENTION.match(name)
        if match and name.startswith(prefix):
            layers.setdefault(match[1], []).append(name)
    return tuple(n for found in layers.values() if len(found) < 4 for n in found)


def recipe_gaps(config: NetworkConfig, family: str) -> list[tuple[str, str, str]]:
    """Where the file a recipe's network section trains will not load as trained in a major UI.

    Args:
        config: the recipe's network section.
        family: ``model.family`` (``auto`` when not known).

    Returns:
        ``(field path, message, hint)`` per finding (warnings: the file is valid, but a UI
        will not apply it as trained).
    """
    from loraforge.backends.lycoris_check import PRESETS
    from loraforge.backends.lycoris_config import DEFAULT_PRESET, dora_on_output

    if config.backend != "lycoris":
        return []  # the kohya backend writes LoRA/LoCon files, which every UI loads
    found = []
    uis = _ALGORITHM_GAPS.get(_RECIPE_ALGORITHMS.get(config.algorithm, ""), {})
    if uis:
        others = [ui for ui in UIS if ui not in uis]
        reasons = "; ".join(reason for _, reason in uis.values())
        found.append(
            (
                "network.algorithm",
                f"{' and '.join(uis)} will not apply {config.algorithm} files ({reasons}); "
                f"only {' and '.join(others)} will",
                "for a file every UI loads, use lora/locon, loha or lokr",
            )
        )
    if dora_on_output(config):
        found.append(
            (
                "network.args.wd_on_output",
                DORA_OUTPUT_AXIS_WARNING,
                "remove wd_on_output: the default input-axis layout loads the same everywhere",
            )
        )
    preset = str(config.args.get("preset", DEFAULT_PRESET))
    spec = PRESETS.get(preset)
    # a preset naming only some of the text encoder's q/k/v/out projections (ia3: k and v)
    partial = (
        [n for n in spec.names if n.endswith("_proj")] if spec and spec.text == "names" else []
    )
    if partial and config.train_text_encoder and family in (*OPEN_CLIP_TEXT_ENCODERS, "auto"):
        where = "on SD 2.x and SDXL " if family == "auto" else ""
        found.append(
            (
                "network.args.preset",
                f"preset {preset} trains only {'/'.join(partial)} of the text-encoder "
                f"attention; {where}A1111 patches the OpenCLIP text encoder's attention only when "
                "q, k, v and out are all in the file, so it skips those modules",
                "set network.train_text_encoder: false, or use a preset that trains whole "
                "attention layers (full, attn-mlp, attn-only)",
            )
        )
    return found
