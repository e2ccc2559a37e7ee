"""Render an estimate: a rich table for people, a plain dict for JSON."""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from loraforge.vram.result import VramEstimate
from loraforge.vram.sizes import format_bytes


def _verdict(estimate: VramEstimate) -> Text:
    total = format_bytes(estimate.total_bytes)
    if estimate.budget_bytes is None:
        return Text.from_markup(f"estimated peak: [bold]{total}[/]")
    budget = format_bytes(estimate.budget_bytes)
    if estimate.fits:
        spare = format_bytes(estimate.budget_bytes - estimate.total_bytes)
        return Text.from_markup(f"[green]fits[/] {budget}: [bold]{total}[/] ({spare} spare)")
    over = format_bytes(estimate.total_bytes - estimate.budget_bytes)
    return Text.from_markup(f"[red]does not fit[/] {budget}: [bold]{total}[/] ({over} over)")


def _breakdown(estimate: VramEstimate) -> Table:
    w, h = estimate.resolution
    title = (
        f"VRAM estimate ({estimate.method}): {estimate.family}, {w}x{h}, "
        f"batch {estimate.batch_size}"
    )
    table = Table(title=title, title_justify="left", show_footer=True)
    table.add_column("component", footer="total")
    table.add_column("memory", justify="right", footer=format_bytes(estimate.total_bytes))
    table.add_column("note", overflow="fold", footer=estimate.architecture)
    for row in estimate.rows:
        memory = "-" if row.kind == "info" else format_bytes(row.bytes)
        style = "dim" if row.kind in ("info", "overhead") else None
        table.add_row(row.component, memory, row.note, style=style)
    return table


def _suggestions(estimate: VramEstimate) -> Table:
    table = Table(title="to fit the budget (cheapest first)", title_justify="left")
    table.add_column("change", overflow="fold")
    table.add_column("saves", justify="right")
    table.add_column("new total", justify="right")
    table.add_column("recipe", overflow="fold")
    table.add_column("cost", overflow="fold")
    for s in estimate.suggestions:
        mark = "[green]fits[/]" if s.fits else "[yellow]not enough[/]"
        settings = ", ".join(f"{k}: {_yaml(v)}" for k, v in s.settings.items())
        table.add_row(
            s.change,
            format_bytes(s.saving_bytes),
            f"{format_bytes(s.total_bytes)} {mark}",
            settings,
            s.cost,
        )
    return table


def _yaml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def render_vram(estimate: VramEstimate) -> RenderableType:
    """The breakdown table, the verdict, notes and (when over budget) the suggestions."""
    parts: list[RenderableType] = [_breakdown(estimate), _verdict(estimate)]
    for note in estimate.notes:
        parts.append(Text(f"note: {note}", style="dim"))
    if estimate.suggestions:
        parts.append(_suggestions(estimate))
    return Group(*parts)


def vram_to_dict(estimate: VramEstimate) -> dict[str, Any]:
    """The estimate as JSON-ready data (bytes as integers)."""
    return {
        "method": estimate.method,
        "family": estimate.family,
        "architecture": estimate.architecture,
        "resolution": list(estimate.resolution),
        "batch_size": estimate.batch_size,
        "total_bytes": estimate.total_bytes,
        "tensor_bytes": estimate.tensor_bytes,
        "budget_bytes": estimate.budget_bytes,
        "fits": estimate.fits,
        "rows": [
            {"component": r.component, "bytes": r.bytes, "note": r.note, "kind": r.kind}
            for r in estimate.rows
        ],
        "suggestions": [
            {
                "change": s.change,
                "settings": dict(s.settings),
                "saving_bytes": s.saving_bytes,
                "total_bytes": s.total_bytes,
                "fits": s.fits,
                "cost": s.cost,
            }
            for s in estimate.suggestions
        ],
        "notes": list(estimate.notes),
    }
