"""The run report as one self-contained HTML page: inline SVG charts, images as ``data:`` URIs,
inline CSS, no script and no network access.

Sections: a summary; loss (with validation loss), learning rates, gradient norm and max-norm,
step time; the sample images as a grid per prompt over the sampling points; the bucket
histogram; the VRAM estimate against the measured peak; the recipe.
"""

from __future__ import annotations

from html import escape
from typing import Any

from loraforge.training.report_svg import Series, bar_chart, line_chart
from loraforge.training.run_report import RunData, image_data_uri

#: chart colours (the browser test looks for them in the screenshot)
LOSS, AVERAGE, VALIDATION = "#9ecae1", "#1f5f8b", "#d62728"
LR_COLORS = ("#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
GRAD, KEY_NORM, SECONDS = "#6a3d9a", "#b15928", "#33a02c"
BUCKET_SAMPLES, BUCKET_IMAGES = "#7aa6c2", "#08519c"
VRAM_ESTIMATE, VRAM_MEASURED = "#fdae6b", "#e6550d"

_CSS = """
body { font-family: system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #222; }
main { max-width: 1160px; margin: 0 auto; padding: 16px 20px 40px; }
h1 { font-size: 22px; margin: 8px 0 4px; } h2 { font-size: 16px; margin: 24px 0 8px; }
.sub { color: #666; font-size: 13px; margin-bottom: 12px; word-break: break-all; }
.grid { display: grid; grid-template-columns: repeat(2, 560px); gap: 16px; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 0; }
.card svg { display: block; }
table { border-collapse: collapse; font-size: 13px; background: #fff; }
td, th { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.samples td { text-align: center; } .samples td.prompt { text-align: left; max-width: 220px; }
.samples img { width: 128px; min-width: 128px; image-rendering: pixelated; display: block; }
.missing { width: 128px; height: 128px; background: #ccc; color: #555; font-size: 11px;
  display: flex; align-items: center; justify-content: center; }
pre { background: #fff; border: 1px solid #ddd; padding: 10px; font-size: 12px;
  overflow: auto; max-height: 480px; }
.note { color: #666; font-size: 12px; margin: 6px 0; }
"""


def render_page(data: RunData) -> str:
    """The whole report page for ``data``."""
    run = data.run
    body = [
        f"<h1>loraforge run report: {escape(data.name)}</h1>",
        f'<div class="sub">{escape(str(data.metrics_path))}'
        + (f" · recipe {escape(str(run['recipe_file']))}" if run.get("recipe_file") else "")
        + "</div>",
        summary_table(data),
        "<h2>Training curves</h2>",
        '<div class="grid">' + "".join(f'<div class="card">{c}</div>' for c in charts(data)),
        "</div>",
        "<h2>Samples</h2>",
        sample_grid(data),
        "<h2>Buckets and memory</h2>",
        '<div class="grid">',
        f'<div class="card">{bucket_chart(run)}</div>',
        f'<div class="card">{vram_chart(data)}</div>',
        "</div>",
        vram_note(data),
        "<h2>Recipe</h2>",
        recipe_block(run),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(data.name)} · loraforge report</title><style>{_CSS}</style></head>"
        f"<body><main>{''.join(body)}</main></body></html>\n"
    )


def _fmt_bytes(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


def summary_table(data: RunData) -> str:
    """Steps done, losses, validation, speed, memory and the sessions of the run."""
    steps, run = data.steps, data.run
    planned = (run.get("length") or {}).get("max_train_steps")
    last = steps[-1] if steps else {}
    seconds = [s["seconds"] for s in steps if isinstance(s.get("seconds"), int | float)]
    peaks = [s["peak_memory"] for s in steps if isinstance(s.get("peak_memory"), int)]
    rows = [
        ("steps", f"{last.get('step', 0)}" + (f" of {planned}" if planned else "")),
        ("device", str(run.get("device", "n/a"))),
        ("last loss (average)", _pair(last.get("loss"), last.get("average"))),
    ]
    if data.validation:
        step, best = min(data.validation, key=lambda v: v[1])
        rows.append(("best validation loss", f"{best:.5f} at step {step}"))
        rows.append(("last validation loss", f"{data.validation[-1][1]:.5f}"))
    if seconds:
        rows.append(("time per step (mean)", f"{sum(seconds) / len(seconds):.3f} s"))
    rows.append(("peak memory", _fmt_bytes(max(peaks)) if peaks else "n/a"))
    for session in data.sessions:
        what = "resumed at step" if session.get("resumed") else "started at step"
        rows.append(("session", f"{session.get('time', '?')}: {what} {session['step']}"))
    cells = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _pair(loss: Any, average: Any) -> str:
    if not isinstance(loss, int | float):
        return "n/a"
    return f"{loss:.5f}" + (f" ({average:.5f})" if isinstance(average, int | float) else "")


def _points(steps: list[dict[str, Any]], key: str) -> list[tuple[float, float | None]]:
    return [(s["step"], s.get(key)) for s in steps]


def charts(data: RunData) -> list[str]:
    """Loss with validation loss, learning rates, gradient norm (and max-norm), step time."""
    steps = data.steps
    loss = [
        Series("loss", _points(steps, "loss"), LOSS, width=1),
        Series("average", _points(steps, "average"), AVERAGE, width=2.5),
    ]
    if data.validation:
        loss.append(Series("validation loss", data.validation, VALIDATION, 2, markers=True))
    groups = list(dict.fromkeys(g for s in steps for g in (s.get("lr") or {})))
    lrs = [
        Series(
            group,
            [(s["step"], (s.get("lr") or {}).get(group)) for s in steps],
            LR_COLORS[i % len(LR_COLORS)],
            width=2,
        )
        for i, group in enumerate(groups)
    ]
    norms = [Series("gradient norm (before clipping)", _points(steps, "grad_norm"), GRAD)]
    if any(s.get("max_norm") for s in steps):
        key_norms = [(s["step"], (s.get("max_norm") or {}).get("max_norm")) for s in steps]
        norms.append(Series("largest key norm (max-norm)", key_norms, KEY_NORM, width=2))
    return [
        line_chart("Loss", loss, y_label="loss"),
        line_chart("Learning rate per group", lrs, y_label="lr", from_zero=True),
        line_chart("Gradient norm", norms, y_label="norm", from_zero=True),
        line_chart(
            "Time per step (saving and sampling not counted)",
            [Series("seconds", _points(steps, "seconds"), SECONDS)],
            y_label="s",
            from_zero=True,
        ),
    ]


def sample_grid(data: RunData) -> str:
    """The sample images: one row per prompt, one column per sampling point."""
    if not data.points:
        return '<p class="note">no sample images were written (set sample.prompts and ' \
            "sample.every_n_steps or every_n_epochs)</p>"  # fmt: skip
    head = "".join(
        f"<th>{escape(p.label)}"
        + ("" if p.label == f"step {p.step}" else f"<br>(step {p.step})")
        + "</th>"
        for p in data.points
    )
    rows = []
    for index in sorted(data.prompts):
        cells = []
        for point in data.points:
            path = point.files.get(index)
            uri = image_data_uri(path) if path is not None else None
            alt = escape(f"{data.prompts[index]} at {point.label}")
            cells.append(
                f'<td><img src="{uri}" alt="{alt}"></td>'
                if uri
                else '<td><div class="missing">missing</div></td>'
            )
        prompt = f'<td class="prompt">{escape(data.prompts[index])}</td>'
        rows.append(f"<tr>{prompt}{''.join(cells)}</tr>")
    return (
        f'<div style="overflow-x:auto"><table class="samples"><tr><th>prompt</th>{head}</tr>'
        f"{''.join(rows)}</table></div>"
    )


def bucket_chart(run: dict[str, Any]) -> str:
    """Images and images x repeats per bucket, portrait to landscape (as ``bucket --plot``)."""
    buckets = sorted(run.get("buckets") or [], key=lambda b: b["width"] / b["height"])
    totals = run.get("totals") or {}
    title = "Buckets (width x height)"
    if totals:
        title += f": {totals.get('images')} images, {totals.get('steps_per_epoch')} steps/epoch"
    return bar_chart(
        title,
        [f"{b['width']}x{b['height']}" for b in buckets],
        [
            ("images x repeats", BUCKET_SAMPLES, [b["samples"] for b in buckets]),
            ("images", BUCKET_IMAGES, [b["images"] for b in buckets]),
        ],
    )


def _measured_peak(data: RunData) -> int | None:
    peaks = [s["peak_memory"] for s in data.steps if isinstance(s.get("peak_memory"), int)]
    return max(peaks) if peaks else None


def vram_chart(data: RunData) -> str:
    """The estimate (total and tensors alone) next to the measured peak, in GiB."""
    estimate = data.run.get("vram_estimate") or {}
    labels, values, colors = [], [], []
    if "total_bytes" in estimate:
        labels += ["estimate: total", "estimate: tensors"]
        values += [estimate["total_bytes"] / 2**30, estimate["tensor_bytes"] / 2**30]
        colors += [VRAM_ESTIMATE, VRAM_ESTIMATE]
    measured = _measured_peak(data)
    if measured is not None:
        cuda = data.run.get("peak_memory_kind") == "cuda_max_allocated"
        labels.append("measured peak" if cuda else "measured (CPU RSS)")
        values.append(measured / 2**30)
        colors.append(VRAM_MEASURED)
    # one group per bar keeps each bar's colour; zeros elsewhere draw nothing
    groups = [
        (label, color, [v if j == i else 0.0 for j in range(len(values))])
        for i, (label, color, v) in enumerate(zip(labels, colors, values, strict=True))
    ]
    return bar_chart("Memory (GiB): estimate and measured peak", labels, groups)


def vram_note(data: RunData) -> str:
    """What the memory figures mean, and the ratio of measured to estimated tensors on a GPU."""
    estimate = data.run.get("vram_estimate") or {}
    measured = _measured_peak(data)
    if "error" in estimate:
        text = f"no VRAM estimate: {estimate['error']}"
    elif "total_bytes" not in estimate:
        text = "no VRAM estimate in the metrics file"
    else:
        text = (
            f"{estimate.get('method', 'analytic')} estimate {_fmt_bytes(estimate['total_bytes'])}"
            f" ({_fmt_bytes(estimate['tensor_bytes'])} of tensors, comparable with "
            "torch.cuda.max_memory_allocated)"
        )
        if measured is not None and data.run.get("peak_memory_kind") == "cuda_max_allocated":
            ratio = measured / estimate["tensor_bytes"] if estimate["tensor_bytes"] else 0
            text += f"; measured {_fmt_bytes(measured)} = {ratio:.2f} x the tensor estimate"
        elif measured is not None:
            text += (
                f"; this run trained on the CPU: its {_fmt_bytes(measured)} is the process's peak "
                "resident memory (Python, models, data), not comparable with a GPU estimate"
            )
    return f'<p class="note">{escape(text)}</p>'


def recipe_block(run: dict[str, Any]) -> str:
    """The resolved recipe the run trained with, as YAML."""
    recipe = run.get("recipe")
    if not recipe:
        return '<p class="note">the metrics file holds no recipe</p>'
    import yaml

    text = yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True, width=100)
    return f"<pre>{escape(text)}</pre>"
