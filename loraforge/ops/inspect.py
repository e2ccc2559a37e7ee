"""Inspect a LoRA file: structure, family, ranks, norms, broken tensors and a metadata summary.

Errors (the file is broken): structural problems, NaN/inf values, module names no reader
recognises (e.g. ``lora_te_encoder_layers_…`` written through transformers 5 without the
``text_model`` wrapper), modules outside the family's target list.
Warnings: all-zero tensors (an fp16 underflow symptom, or layers that never trained — with
``clip_skip 2`` the last text-encoder layer's modules stay zero, which is expected and only noted),
missing alpha, metadata that contradicts the keys, hashes that do not match the tensors.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass

from loraforge.ops.delta import is_additive, lora_factors, module_delta
from loraforge.ops.derived_metadata import resolution_of, resolution_text, training_comment
from loraforge.ops.family import FamilyGuess, detect_family
from loraforge.ops.lora_file import LoraFile, sshs_hashes
from loraforge.ops.modules import (
    LoraModule,
    ParsedLora,
    Problem,
    glora_old_layout,
    parse_lora,
    user_algorithm,
)
from loraforge.ops.resize import module_kind
from loraforge.ops.svd import svd_of_products
from loraforge.ops.ui_support import ModuleFacts, UiSupport, file_support
from loraforge.ops.validation import ExpectedNames, is_finite, name_problems

_TE_LAYER = re.compile(r"^(lora_te[12]?)_text_model_encoder_layers_(\d+)_")


@dataclass(frozen=True)
class ModuleStats:
    """One module's numbers; ``norm`` is ``‖ΔW‖_F`` at ratio 1 (``None`` if weight-dependent)."""

    name: str
    algorithm: str
    kind: str
    rank: int | None
    alpha: float | None
    norm: float | None
    nonfinite: bool
    zero: bool


@dataclass(frozen=True)
class MetadataSummary:
    """What the metadata says about how the file was made (absent fields are ``None``)."""

    network_module: str | None
    network_dim: str | None
    network_alpha: str | None
    base_model: str | None
    resolution: str | None
    clip_skip: str | None
    steps: str | None
    epochs: str | None
    images: str | None
    trigger_phrase: str | None
    trigger_source: str | None
    top_tags: tuple[tuple[str, int], ...]
    comment: str | None
    recipe_embedded: bool
    hash_ok: bool | None


@dataclass(frozen=True)
class LoraReport:
    """Everything ``check`` shows about a file."""

    label: str
    family: FamilyGuess
    algorithm: str
    modules: tuple[ModuleStats, ...]
    problems: tuple[Problem, ...]
    notes: tuple[str, ...]
    metadata: MetadataSummary
    coverage: tuple[tuple[str, int, int | None], ...]
    ui_support: tuple[UiSupport, ...] = ()

    @property
    def broken(self) -> bool:
        return any(p.severity == "error" for p in self.problems)

    @property
    def warnings(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "warning")

    @property
    def ranks(self) -> Counter[int]:
        return Counter(m.rank for m in self.modules if m.rank is not None)

    @property
    def alphas(self) -> Counter[float]:
        return Counter(m.alpha for m in self.modules if m.alpha is not None)


def component(name: str) -> str:
    """``unet``, ``te``, ``te1``, ``te2``, ``te3`` (T5-XXL) or ``other`` from a kohya module name."""
    for prefix, label in (
        ("lora_unet_", "unet"),
        ("lora_te1_", "te1"),
        ("lora_te2_", "te2"),
        ("lora_te3_", "te3"),
        ("lora_te_", "te"),
    ):
        if name.startswith(prefix):
            return label
    return "other"


def inspect_lora(file: LoraFile, expected: ExpectedNames | None = None) -> LoraReport:
    """Inspect a LoRA file.

    Args:
        file: the file's tensors and metadata.
        expected: gives, for the detected family (and whether the file has conv 3x3 modules),
            the names of every layer of the base model and of kohya's default targets (LoCon's
            when ``has_conv``). Names outside the first set are errors; coverage is counted
            against the second. ``None``: skip both.
    """
    parsed = parse_lora(file.tensors, file.label)
    problems = list(parsed.problems)
    notes: list[str] = []
    if not parsed.modules:
        problems.append(
            Problem("error", None, "no LoRA/LyCORIS modules found: this is not a LoRA file")
        )
    family = detect_family(parsed.modules, file.metadata)
    if family.conflict:
        problems.append(Problem("warning", None, family.conflict))
    names = None
    if expected is not None and family.family is not None and parsed.modules:
        names = expected(family.family, any(m.is_conv3x3 for m in parsed.modules.values()))
    known, targets = names if names is not None else (None, None)
    problems.extend(name_problems(parsed.modules, known))
    support = file_support([_ui_facts(m) for m in parsed.modules.values()], family.family)
    problems.extend(Problem("warning", None, str(gap)) for ui in support for gap in ui.gaps)
    stats = _module_stats(parsed)
    problems.extend(_value_problems(stats, file, notes))
    summary = summarize_metadata(file)
    if summary.hash_ok is False:
        problems.append(
            Problem(
                "warning", None, "sshs_model_hash does not match the tensors (edited after saving?)"
            )
        )
    return LoraReport(
        label=file.label,
        family=family,
        algorithm=parsed.algorithm,
        modules=tuple(stats),
        problems=tuple(problems),
        notes=tuple(notes),
        metadata=summary,
        coverage=_coverage(parsed, targets),
        ui_support=support if parsed.modules else (),
    )


def _ui_facts(m: LoraModule) -> ModuleFacts:
    algorithm = "boft" if m.boft else m.algorithm
    old_glora = m.algorithm == "glora" and glora_old_layout(m.tensors)
    return ModuleFacts(m.name, algorithm, m.dora_on_output, old_glora)


def _coverage(
    parsed: ParsedLora, expected: Collection[str] | None
) -> tuple[tuple[str, int, int | None], ...]:
    found = Counter(component(n) for n in parsed.modules)
    wanted = Counter(component(n) for n in expected) if expected is not None else Counter()
    parts = sorted(
        set(found) | set(wanted), key=lambda c: ("unet", "te", "te1", "te2", "other").index(c)
    )
    return tuple((c, found[c], wanted[c] if expected is not None else None) for c in parts)


def _module_stats(parsed: ParsedLora) -> list[ModuleStats]:
    norms = _norms(parsed)
    stats = []
    for name, m in parsed.modules.items():
        floats = [t for t in m.tensors.values() if t.is_floating_point()]
        nonfinite = not all(is_finite(t) for t in floats)
        zero = _is_noop(m)
        stats.append(
            ModuleStats(
                name=name,
                algorithm=user_algorithm(m),
                kind=module_kind(m) if m.algorithm in ("lora", "full") else "-",
                rank=m.rank,
                alpha=m.alpha,
                norm=None if nonfinite else norms.get(name),
                nonfinite=nonfinite,
                zero=zero,
            )
        )
    return stats


def _is_noop(m: LoraModule) -> bool:
    """True when a tensor that multiplies the whole delta is all zeros."""
    t = m.tensors
    keys = {
        "lora": ("lora_up.weight", "lora_down.weight"),
        "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
        "full": ("diff",),
        "ia3": ("weight",),
    }.get(m.algorithm, ())
    return any(k in t and not bool(t[k].any()) for k in keys)


def _norms(parsed: ParsedLora) -> dict[str, float]:
    loras = [m for m in parsed.modules.values() if m.algorithm == "lora" and not m.dora]
    norms: dict[str, float] = {}
    finite = [m for m in loras if all(is_finite(t) for t in m.tensors.values())]
    if finite:
        factors = [lora_factors(m) for m in finite]
        svds = svd_of_products([f[0] for f in factors], [f[1] for f in factors])
        for m, svd in zip(finite, svds, strict=True):
            norms[m.name] = float(svd.s.double().norm()) * abs(m.scale)
    for m in parsed.modules.values():
        if m.name not in norms and is_additive(m) and m.algorithm != "lora":
            try:
                norms[m.name] = float(module_delta(m).double().norm())
            except (RuntimeError, ValueError):
                continue
    return norms


def _value_problems(stats: list[ModuleStats], file: LoraFile, notes: list[str]) -> list[Problem]:
    problems: list[Problem] = []  # NaN/inf values are parse errors (loraforge.ops.validation)
    zero = [s.name for s in stats if s.zero]
    if not zero:
        return problems
    expected_zero = _last_te_layer_modules(stats) if _clip_skip(file) >= 2 else set()
    if expected_zero and set(zero) <= expected_zero:
        notes.append(
            f"{len(zero)} module(s) of the last text-encoder layer are all zero: expected with "
            "clip_skip "
            f"{_clip_skip(file)} (that layer's output is never used)"
        )
        return problems
    problems.append(
        Problem(
            "warning",
            None,
            f"{len(zero)} module(s) have an all-zero factor and do nothing (e.g. {zero[0]}); "
            "with fp16 training this is usually underflow — train in bf16 or raise alpha",
        )
    )
    return problems


def _clip_skip(file: LoraFile) -> int:
    try:
        return int(file.metadata.get("ss_clip_skip", "1"))
    except ValueError:
        return 1


def _last_te_layer_modules(stats: list[ModuleStats]) -> set[str]:
    last: dict[str, int] = {}
    for s in stats:
        match = _TE_LAYER.match(s.name)
        if match:
            last[match[1]] = max(last.get(match[1], -1), int(match[2]))
    prefixes = tuple(f"{p}_text_model_encoder_layers_{n}_" for p, n in last.items())
    return {s.name for s in stats if prefixes and s.name.startswith(prefixes)}


def summarize_metadata(file: LoraFile, top: int = 10) -> MetadataSummary:
    """The training facts the metadata records (sd-scripts ``ss_*`` and ``modelspec.*`` keys)."""
    meta = file.metadata
    trigger, source = _trigger(meta)
    size = resolution_of(meta)
    hash_ok = None
    if "sshs_model_hash" in meta and file.tensors:
        hash_ok = sshs_hashes(file.tensors, meta)[0] == meta["sshs_model_hash"]
    return MetadataSummary(
        network_module=meta.get("ss_network_module"),
        network_dim=meta.get("ss_network_dim"),
        network_alpha=meta.get("ss_network_alpha"),
        base_model=meta.get("ss_sd_model_name"),
        resolution=None if size is None else resolution_text(size),
        clip_skip=meta.get("ss_clip_skip"),
        steps=meta.get("ss_steps") or meta.get("ss_max_train_steps"),
        epochs=meta.get("ss_epoch") or meta.get("ss_num_epochs"),
        images=meta.get("ss_num_train_images"),
        trigger_phrase=trigger,
        trigger_source=source,
        top_tags=_top_tags(meta.get("ss_tag_frequency"), top),
        comment=training_comment(meta) or None,
        recipe_embedded="loraforge_recipe" in meta,
        hash_ok=hash_ok,
    )


def _trigger(meta: dict[str, str]) -> tuple[str | None, str | None]:
    if meta.get("modelspec.trigger_phrase"):
        return meta["modelspec.trigger_phrase"], "modelspec.trigger_phrase"
    dirs = _json(meta.get("ss_dataset_dirs"))
    tokens = []
    for folder in dirs if isinstance(dirs, dict) else {}:
        match = re.match(r"^\d+_(.+)$", str(folder))
        if match and match[1] not in tokens:
            tokens.append(match[1])
    if tokens:
        return ", ".join(tokens), "dataset folder names"
    return None, None


def _top_tags(text: str | None, top: int) -> tuple[tuple[str, int], ...]:
    data = _json(text)
    counts: Counter[str] = Counter()
    if isinstance(data, dict):
        for tags in data.values():
            if isinstance(tags, dict):
                for tag, n in tags.items():
                    if isinstance(n, int | float):
                        counts[str(tag).strip()] += int(n)
    return tuple(counts.most_common(top))


def _json(text: str | None) -> object:
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None
