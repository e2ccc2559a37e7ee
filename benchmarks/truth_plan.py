"""Rows of ``gpu_truth.py``: which settings are measured, what a machine can run, the ratios.

Pure functions over plain data (presets as dicts, the probed environment), so the plan is tested
without a GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

PRESETS = ("char-8gb", "char-12gb", "sdxl-char-12gb", "sdxl-char-24gb")
# what each row changes in its preset: the other precision, optimizer, attention kernel
FLIPS = {
    "training.mixed_precision": {"fp16": "bf16", "bf16": "fp16", "no": "bf16"},
    "training.optimizer": {"AdamW8bit": "AdamW", "AdamW": "AdamW8bit"},
    "training.attention": {"sdpa": "xformers", "xformers": "sdpa"},
}
DEFAULTS = {"training.mixed_precision": "no", "training.optimizer": "AdamW", "training.attention": "sdpa"}  # fmt: skip
# what a row runs instead of a setting this machine lacks (recorded as "adjusted")
STAND_INS = {"fp16": "no", "bf16": "no", "AdamW8bit": "AdamW", "xformers": "sdpa"}


@dataclass(frozen=True)
class Row:
    """One measured setting: a preset and what is changed in it."""

    name: str
    preset: str
    family: str
    changes: dict[str, str] = field(default_factory=dict)


def _setting(data: dict[str, Any], path: str) -> str:
    section, key = path.split(".")
    return str(data.get(section, {}).get(key, DEFAULTS[path]))


def plan_rows(presets: dict[str, dict[str, Any]]) -> list[Row]:
    """The presets as shipped first, then one row per flipped setting of each preset."""
    rows = [Row(name, name, _family(data)) for name, data in presets.items()]
    for name, data in presets.items():
        for path, flip in FLIPS.items():
            value = flip[_setting(data, path)]
            rows.append(Row(f"{name}+{value}", name, _family(data), {path: value}))
    return rows


def _family(data: dict[str, Any]) -> str:
    return str(data["model"]["family"])


def row_settings(row: Row, data: dict[str, Any]) -> dict[str, str]:
    """Precision, optimizer and attention of ``row`` (its preset with its changes)."""
    return {path: row.changes.get(path, _setting(data, path)) for path in FLIPS}


def missing_for(path: str, value: str, env: dict[str, Any]) -> str | None:
    """Why this machine cannot run ``value`` of setting ``path`` (``None`` when it can)."""
    cuda = env.get("cuda_device") is not None
    packages = env.get("packages", {})
    if value == "fp16" and not cuda:
        return "fp16 needs a CUDA GPU"
    if value == "bf16" and cuda and not env.get("bf16_supported"):
        return "this GPU has no bf16"
    if value == "AdamW8bit":
        if not packages.get("bitsandbytes"):
            return 'bitsandbytes is not installed (pip install -e ".[gpu]")'
        if not cuda:
            return "AdamW8bit needs a CUDA GPU"
    if value == "xformers":
        if not packages.get("xformers"):
            return "xformers is not installed (pip install xformers)"
        if not cuda:
            return "xformers needs a CUDA GPU"
    return None


def unmet_needs(settings: dict[str, str], env: dict[str, Any]) -> str | None:
    """Why this machine cannot run ``settings`` (the first reason; ``None`` when it can)."""
    reasons = (missing_for(path, value, env) for path, value in settings.items())
    return next((r for r in reasons if r), None)


def stand_ins(settings: dict[str, str], env: dict[str, Any]) -> dict[str, str]:
    """What replaces the settings this machine cannot run: ``{path: stand-in}``
    (fp16/bf16 -> no, AdamW8bit -> AdamW, xformers -> sdpa)."""
    return {
        path: STAND_INS[value]
        for path, value in settings.items()
        if value in STAND_INS and missing_for(path, value, env)
    }


def row_plan(
    row: Row, preset: dict[str, Any], env: dict[str, Any], planned: dict[str, str]
) -> tuple[dict[str, str], dict[str, str], str | None]:
    """``(settings, adjusted, reason)`` of a row on this machine.

    What the row changes must run here, else it is skipped with the reason. Its other settings
    that cannot run here get stand-ins (``adjusted``), so a machine without bitsandbytes still
    measures the presets (with AdamW); a row that then repeats an earlier row's settings is
    skipped. ``planned``: settings (as text) -> row name, of the rows planned so far (updated).
    """
    settings = row_settings(row, preset)
    reason = next((m for p, v in row.changes.items() if (m := missing_for(p, v, env))), None)
    adjusted = {} if reason else stand_ins(settings, env)
    settings.update(adjusted)
    key = json.dumps([row.preset, settings], sort_keys=True)
    if reason is None and key in planned:
        reason = f"the same settings as {planned[key]} here"
    planned.setdefault(key, row.name)
    return settings, adjusted, reason


def ratios(estimate: dict[str, Any], measured: dict[str, Any]) -> dict[str, float]:
    """Estimate/measured and speed ratios from what a row has (missing inputs give no ratio)."""
    out: dict[str, float] = {}

    def put(name: str, a: Any, b: Any) -> None:
        if isinstance(a, int | float) and isinstance(b, int | float) and b:
            out[name] = a / b

    live = measured.get("live_tensor_peak")
    steady = measured.get("cuda", {}).get("steady") or {}
    context = measured.get("cuda", {}).get("context")
    used = None
    if "max_memory_reserved" in steady and context is not None:
        used = steady["max_memory_reserved"] + context
    for method in ("analytic", "traced"):
        est = estimate.get(method) or {}
        put(f"{method}_over_live_tensors", est.get("tensor_bytes"), live)
        put(f"{method}_over_allocated", est.get("tensor_bytes"), steady.get("max_memory_allocated"))
        put(f"{method}_total_over_reserved_plus_context", est.get("total_bytes"), used)
    step, minimal = measured.get("s_per_step"), (measured.get("minimal") or {}).get("s_per_step")
    put("overhead_ratio", step, minimal)
    flops = measured.get("unet_flops")
    if isinstance(flops, int | float):
        put("achieved_tflops", flops / 1e12, step)
        put("minimal_achieved_tflops", flops / 1e12, minimal)
    return out
