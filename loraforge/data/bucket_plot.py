"""A bar chart of the buckets (``loraforge bucket --plot``); matplotlib is optional."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loraforge.errors import DependencyError
from loraforge.fileio import atomic_path


def plot_buckets(report: dict[str, Any], path: Path, force: bool = False) -> None:
    """Draw samples (images x repeats) and images per bucket, widest buckets right.

    Args:
        report: a :func:`loraforge.data.report.bucket_report` dict.
        path: the image to write (format from the suffix: .png, .svg, .pdf ...).
        force: overwrite an existing file.

    Raises:
        DependencyError: matplotlib is not installed.
        OutputExistsError: ``path`` exists and ``force`` is false.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed, and never a GUI window from a CLI
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise DependencyError(
            "--plot needs matplotlib, which is not installed",
            hint="pip install 'loraforge[plot]' (or pip install matplotlib)",
        ) from e
    buckets = sorted(report["buckets"], key=lambda b: b["width"] / b["height"])
    labels = [f"{b['width']}x{b['height']}" for b in buckets]
    positions = range(len(buckets))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(buckets) + 2), 4.5))
    try:
        samples = [b["samples"] for b in buckets]
        ax.bar(positions, samples, label="images x repeats", color="#7aa6c2")
        ax.bar(positions, [b["images"] for b in buckets], label="images", color="#1f5f8b")
        ax.set_xticks(list(positions), labels, rotation=60, ha="right", fontsize=8)
        ax.set_xlabel("bucket (width x height), portrait to landscape")
        ax.set_ylabel("count")
        totals = report["totals"]
        ax.set_title(
            f"{totals['images']} images, {totals['samples_per_epoch']} samples/epoch, "
            f"{totals['steps_per_epoch']} steps/epoch (batch {totals['batch_size']})"
        )
        ax.legend()
        fig.tight_layout()
        path = Path(path)
        with atomic_path(path, force=force) as tmp:
            fig.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png", dpi=120)
    finally:
        plt.close(fig)
