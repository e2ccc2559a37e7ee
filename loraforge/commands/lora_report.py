"""`loraforge check LORA.safetensors`: inspect LoRA files and render the findings.

``check`` calls :func:`check_lora_files`; the layer names a LoRA is compared with come from
:mod:`loraforge.models.name_tables`.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loraforge.commands.options import OutputFormat
    from loraforge.ops.inspect import LoraReport


def check_lora_files(paths: list[Path], fmt: OutputFormat | str, strict: bool) -> int:
    """Inspect each LoRA file, render a report per file, return the exit code.

    Args:
        paths: the files.
        fmt: ``table`` or ``json`` (an :class:`OutputFormat` or its value).
        strict: warnings count as failures too.

    Returns:
        1 when any file is broken (or, with ``strict``, has warnings), else 0.
    """
    from loraforge.errors import LoraforgeError
    from loraforge.models.name_tables import expected_names
    from loraforge.ops.inspect import inspect_lora
    from loraforge.ops.lora_file import read_lora_file

    fmt_value = fmt.value if isinstance(fmt, Enum) else str(fmt)
    documents: list[dict[str, Any]] = []
    failed = False
    for path in paths:
        try:
            report = inspect_lora(read_lora_file(path), expected_names)
        except LoraforgeError as e:
            failed = True
            documents.append({"file": str(path), "ok": False, "error": str(e)})
            if fmt_value != "json":
                _render_unreadable(path, e)
            continue
        failed = failed or report.broken or (strict and bool(report.warnings))
        documents.append(report_document(report))
        if fmt_value != "json":
            render_report(report)
    if fmt_value == "json":
        from loraforge.console import print_json

        print_json(documents)
    return 1 if failed else 0


def _render_unreadable(path: Path, error: Exception) -> None:
    from rich.markup import escape

    from loraforge.console import out

    out.print(f"[red]broken[/]  {escape(str(path))}")
    out.print(f"  [red]error:[/] {escape(str(error))}")


def report_document(report: LoraReport) -> dict[str, Any]:
    """The JSON form of a report."""
    from dataclasses import asdict

    return {
        "file": report.label,
        "ok": not report.broken,
        "family": report.family.family,
        "family_evidence": report.family.evidence,
        "v_prediction": report.family.v_prediction,
        "algorithm": report.algorithm,
        "module_count": len(report.modules),
        "coverage": [{"component": c, "modules": n, "expected": e} for c, n, e in report.coverage],
        "ranks": {str(k): v for k, v in sorted(report.ranks.items())},
        "alphas": {f"{k:g}": v for k, v in sorted(report.alphas.items())},
        "problems": [asdict(p) for p in report.problems],
        "notes": list(report.notes),
        "ui_support": [
            {
                "ui": s.ui,
                "status": s.status,
                "modules": s.total,
                "applied": s.total - s.unapplied,
                "gaps": [
                    {"effect": g.effect, "modules": len(g.modules), "reason": g.reason}
                    for g in s.gaps
                ],
            }
            for s in report.ui_support
        ],
        "metadata": asdict(report.metadata),
        "modules": [asdict(m) for m in report.modules],
    }


def render_report(report: LoraReport) -> None:
    """A summary table, the problems, and the largest modules of one file."""
    from rich.markup import escape
    from rich.table import Table

    from loraforge.console import out

    status = "[red]broken[/]" if report.broken else "[green]ok[/]"
    out.print(f"{status}  {escape(report.label)}")
    table = Table(show_header=False, box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for label, value in _summary_rows(report):
        table.add_row(label, escape(value))
    out.print(table)
    for p in report.problems:
        mark = "[red]error[/]" if p.severity == "error" else "[yellow]warning[/]"
        out.print(f"  {mark} {escape(str(p))}")
    for note in report.notes:
        out.print(f"  [cyan]note[/] {escape(note)}")
    _render_top_modules(report)


def _summary_rows(report: LoraReport) -> list[tuple[str, str]]:
    m = report.metadata
    rows = [
        ("family", f"{report.family.display}  [{report.family.evidence}]"),
        ("algorithm", report.algorithm),
        ("modules", _coverage_text(report)),
        ("ranks", _counter_text(report.ranks)),
        ("alphas", _counter_text(report.alphas)),
        *((f"in {s.ui}", s.headline) for s in report.ui_support),
    ]
    optional = [
        ("network", " ".join(x for x in (m.network_module, _dim_alpha(m)) if x)),
        ("base model", m.base_model),
        ("resolution", m.resolution),
        ("clip skip", m.clip_skip),
        ("training", _training_text(m)),
        ("trigger", f"{m.trigger_phrase}  [{m.trigger_source}]" if m.trigger_phrase else None),
        ("top tags", ", ".join(f"{t} ({n})" for t, n in m.top_tags) or None),
        ("comment", m.comment),
        ("recipe", "embedded" if m.recipe_embedded else None),
        (
            "hash",
            {True: "sshs_model_hash matches", False: "sshs_model_hash mismatch"}.get(m.hash_ok),
        ),
    ]
    return rows + [(k, v) for k, v in optional if v]


def _coverage_text(report: LoraReport) -> str:
    """``216 (unet 192, te 24)``, then kohya's default targets on the family's full-size model
    when the file differs from them (a recipe chose other targets, or trained a smaller model)."""
    found = ", ".join(f"{c} {n}" for c, n, _ in report.coverage if n)
    text = f"{len(report.modules)} ({found})" if found else str(len(report.modules))
    defaults = [(c, e) for c, _, e in report.coverage if e]
    if any(n != e for _, n, e in report.coverage if e is not None) and defaults:
        full = ", ".join(f"{c} {e}" for c, e in defaults)
        text += f"; kohya's default targets on the full-size model: {full}"
    return text


def _counter_text(counter) -> str:
    if not counter:
        return "-"
    return ", ".join(f"{k:g} x{v}" for k, v in sorted(counter.items()))


def _dim_alpha(m) -> str | None:
    if m.network_dim is None:
        return None
    return f"dim {m.network_dim}, alpha {m.network_alpha}"


def _training_text(m) -> str | None:
    parts = [
        f"{v} {k}" for k, v in (("steps", m.steps), ("epochs", m.epochs), ("images", m.images)) if v
    ]
    return ", ".join(parts) or None


def _render_top_modules(report: LoraReport, count: int = 5) -> None:
    from rich.table import Table

    from loraforge.console import out

    normed = [s for s in report.modules if s.norm is not None]
    if not normed:
        return
    table = Table(title=f"largest modules (of {len(normed)}) by ‖ΔW‖_F", title_justify="left")
    for column in ("module", "algorithm", "kind", "rank", "alpha", "‖ΔW‖_F"):
        table.add_column(column, overflow="fold")
    for s in sorted(normed, key=lambda s: -(s.norm or 0.0))[:count]:
        alpha = "-" if s.alpha is None else f"{s.alpha:g}"
        rank = "-" if s.rank is None else str(s.rank)
        table.add_row(s.name, s.algorithm, s.kind, rank, alpha, f"{s.norm:.4g}")
    out.print(table)
