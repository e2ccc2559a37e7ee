"""`loraforge resize`: shrink a LoRA/LoCon to a lower rank by truncated SVD."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from loraforge.commands.options import ForceOpt, FormatOpt, OutputFormat, VerboseOpt

if TYPE_CHECKING:
    import torch

    from loraforge.ops.load_lora import LoadedLora
    from loraforge.ops.resize import ModuleResize


class Method(str, Enum):
    fixed = "fixed"
    sv_ratio = "sv_ratio"
    sv_fro = "sv_fro"
    sv_cumulative = "sv_cumulative"


class Precision(str, Enum):
    fp16 = "fp16"
    bf16 = "bf16"
    fp32 = "fp32"


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"


SavePrecisionOpt = Annotated[
    Precision | None,
    typer.Option(
        "--save-precision", help="Output dtype. Default: the input file's.", show_default=False
    ),
]
DeviceOpt = Annotated[Device, typer.Option("--device", help="Where to compute the SVDs.")]
AllowPickleOpt = Annotated[
    bool,
    typer.Option(
        "--allow-pickle", help="Read .ckpt/.pt inputs (torch.load with weights_only=True)."
    ),
]


def command(
    lora: Annotated[
        Path, typer.Argument(help="The LoRA/LoCon .safetensors file.", show_default=False)
    ],
    rank: Annotated[
        int, typer.Option("--rank", "-r", min=1, help="New rank; the cap for dynamic methods.")
    ],
    conv_rank: Annotated[
        int | None,
        typer.Option(
            "--conv-rank",
            min=1,
            help="Rank cap for conv 3x3 modules. Default: --rank.",
            show_default=False,
        ),
    ] = None,
    method: Annotated[Method, typer.Option("--method", "-m", help="Rank rule.")] = Method.fixed,
    param: Annotated[
        float | None,
        typer.Option("--param", "-p", help="The dynamic method's parameter.", show_default=False),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Output file. Default: <input>-r<rank>.safetensors.",
            show_default=False,
        ),
    ] = None,
    save_precision: SavePrecisionOpt = None,
    device: DeviceOpt = Device.cpu,
    fmt: FormatOpt = OutputFormat.table,
    verbose: VerboseOpt = False,
    force: ForceOpt = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    r"""Shrink a LoRA/LoCon to a lower rank (truncated SVD of every module's delta).

    Each module's up @ down is re-factorised and cut to the new rank: the best approximation
    of that rank (Eckart–Young). Alpha is rescaled so the strength stays the same. The summary
    gives the module count, the new ranks and the share of the deltas' Frobenius norm kept
    (lowest, median, overall); --verbose adds a table with, per module, the old and new rank,
    the share kept and the largest singular value dropped.

    [bold]Rank rules[/] (--method, capped by --rank / --conv-rank):
    fixed: every module gets --rank.
    sv_fro P: smallest rank keeping a fraction P of the Frobenius norm (0.9 keeps 90%).
    sv_cumulative P: smallest rank whose singular values sum to a fraction P of the total.
    sv_ratio P: keep singular values at least 1/P of the largest.
    sd-scripts keeps one singular value more than its own rule says; loraforge keeps exactly
    what the rule defines, so the same P can give a rank one lower.

    Example:

        loraforge resize mychar.safetensors --rank 32 -o mychar-32.safetensors

        loraforge resize mychar.safetensors --rank 64 --method sv_fro --param 0.9 \
            --save-precision bf16 --device cuda
    """
    from loraforge.ops.lora_file import write_lora_file
    from loraforge.ops.resize import ResizeSpec, resize_lora, resized_metadata

    _check_rule(method, param)
    out_path = output or default_output(lora, rank, method, param)
    loaded = load_input(lora, allow_pickle)
    spec = ResizeSpec(
        rank=rank,
        conv_rank=conv_rank,
        method=method.value,
        param=param,
        device=resolve_device(device),
        save_dtype=to_dtype(save_precision),
    )
    result = resize_lora(loaded.parsed, spec, stray=loaded.stray)
    metadata = resized_metadata(loaded.file.metadata, result, spec)
    write_lora_file(out_path, result.tensors, metadata, force=force)
    summary = {
        "input": str(lora),
        "output": str(out_path),
        "method": method.value,
        "param": param,
        "rank": rank,
        "conv_rank": conv_rank,
        "dtype": str(next(iter(result.tensors.values())).dtype).removeprefix("torch."),
    }
    title = f"resize {lora.name} -> {out_path.name}"
    render_rows(result.rows, summary, fmt, title=title, verbose=verbose)


def load_input(path: Path, allow_pickle: bool) -> LoadedLora:
    """Load a LoRA for resize/merge, validated as `check` validates it (structure, values;
    module names outside the family are reported), saying when its text-encoder names had to
    be restored."""
    from loraforge.console import info, warn
    from loraforge.models.name_tables import expected_names
    from loraforge.ops.load_lora import load_lora

    loaded = load_lora(
        path, allow_pickle=allow_pickle, expected=expected_names, unknown_names="warning"
    )
    for problem in loaded.parsed.problems:
        if problem.severity == "warning" and problem.module is None:
            warn(f"{path.name}: {problem.message}")
    if loaded.renamed:
        info(
            f"{path.name}: {len(loaded.renamed)} text-encoder module name(s) lacked 'text_model' "
            f"(e.g. {loaded.renamed[0]}); using the kohya names, which the output keeps"
        )
    return loaded


def _check_rule(method: Method, param: float | None) -> None:
    from loraforge.ops.svd import check_param

    try:
        check_param(method.value, param)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--param") from e


def default_output(lora: Path, rank: int, method: Method, param: float | None) -> Path:
    """``mychar.safetensors`` -> ``mychar-r32.safetensors`` (dynamic: ``mychar-sv_fro0.9-r32``)."""
    rule = "" if method == Method.fixed else f"-{method.value}{param:g}"
    return lora.with_name(f"{lora.stem}{rule}-r{rank}.safetensors")


def resolve_device(device: Device) -> str:
    """``cpu`` or ``cuda``; asking for CUDA without a usable GPU is a user error."""
    import torch

    from loraforge.errors import DependencyError

    if device == Device.cuda and not torch.cuda.is_available():
        raise DependencyError(
            f"--device cuda was asked for, but this torch ({torch.__version__}) sees no CUDA GPU",
            hint="use --device cpu, or install a CUDA build of torch",
        )
    return device.value


def to_dtype(precision: Precision | None) -> torch.dtype | None:
    import torch

    if precision is None:
        return None
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision.value]


def overall(rows: tuple[ModuleResize, ...]) -> dict[str, Any]:
    """Totals over all modules: retention (norm-weighted, mean, median, lowest) and ranks."""
    import math
    import statistics
    from collections import Counter

    total = sum(r.norm**2 for r in rows)
    kept = sum((r.norm * r.retained_fro) ** 2 for r in rows)
    worst = min(rows, key=lambda r: r.retained_fro) if rows else None
    histogram = Counter(r.new_rank for r in rows)
    return {
        "modules": len(rows),
        "retained_fro": math.sqrt(kept / total) if total > 0 else 1.0,
        "mean_retained_fro": sum(r.retained_fro for r in rows) / len(rows) if rows else 1.0,
        "median_retained_fro": statistics.median(r.retained_fro for r in rows) if rows else 1.0,
        "old_rank_max": max((r.old_rank for r in rows), default=0),
        "new_rank_max": max((r.new_rank for r in rows), default=0),
        "new_rank_mean": sum(r.new_rank for r in rows) / len(rows) if rows else 0.0,
        "rank_histogram": {str(rank): histogram[rank] for rank in sorted(histogram)},
        "worst_module": worst.name if worst else None,
        "worst_retained_fro": worst.retained_fro if worst else None,
    }


def summary_lines(totals: dict[str, Any]) -> list[str]:
    """The default output of resize/merge/extract: a few lines instead of a row per module."""
    if not totals["modules"]:
        return ["0 modules"]
    ranks = ", ".join(f"{rank} x{count}" for rank, count in totals["rank_histogram"].items())
    return [
        f"{totals['modules']} modules; new ranks: {ranks} (was up to {totals['old_rank_max']})",
        f"Frobenius norm kept: lowest {100 * totals['worst_retained_fro']:.2f}% "
        f"({totals['worst_module']}), median {100 * totals['median_retained_fro']:.2f}%, "
        f"overall {100 * totals['retained_fro']:.2f}%",
    ]


def render_rows(
    rows: tuple[ModuleResize, ...],
    summary: dict[str, Any],
    fmt: OutputFormat,
    *,
    title: str,
    verbose: bool = False,
) -> None:
    """A summary (and with ``verbose`` the per-module table), or one JSON document with every
    module, for resize/merge/extract results."""
    from dataclasses import asdict

    from rich.markup import escape
    from rich.table import Table

    from loraforge.console import out, print_json

    totals = overall(rows)
    if fmt == OutputFormat.json:
        print_json({**summary, "overall": totals, "modules": [asdict(r) for r in rows]})
        return
    if verbose:
        table = Table(title=title, title_justify="left")
        for column, justify in (
            ("module", "left"), ("kind", "left"), ("rank", "right"), ("new", "right"),
            ("alpha", "right"), ("kept ‖ΔW‖_F", "right"), ("largest dropped σ", "right"),
        ):  # fmt: skip
            table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
        for r in rows:
            table.add_row(
                r.name, r.kind, str(r.old_rank), str(r.new_rank), f"{r.new_alpha:g}",
                f"{100 * r.retained_fro:.2f}%", f"{r.largest_discarded:.3g}",
            )  # fmt: skip
        out.print(table)
    else:
        out.print(escape(title))
    for line in summary_lines(totals):
        out.print(escape(line))
    hint = "" if verbose else "  (--verbose: the per-module table)"
    out.print(f"wrote {escape(summary['output'])}{hint}")
