"""`loraforge merge`: bake LoRAs into a checkpoint, combine LoRAs into one, or extract a LoRA."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from loraforge.commands.options import ForceOpt, FormatOpt, OutputFormat, VerboseOpt
from loraforge.commands.resize import (
    AllowPickleOpt,
    Device,
    DeviceOpt,
    Method,
    Precision,
    SavePrecisionOpt,
    load_input,
    render_rows,
    resolve_device,
    to_dtype,
)

if TYPE_CHECKING:
    from loraforge.ops.load_lora import LoadedLora
    from loraforge.ops.merge import WeightedLora


class Mode(str, Enum):
    exact = "exact"
    concat = "concat"


def command(
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="The merged checkpoint, folder or LoRA.", show_default=False
        ),
    ],
    lora: Annotated[
        list[str] | None,
        typer.Option(
            "--lora",
            "-l",
            help="A LoRA as PATH[:RATIO] (ratio 1 by default, may be negative). Repeat.",
            show_default=False,
        ),
    ] = None,
    base: Annotated[
        Path | None,
        typer.Option(
            "--base",
            "-b",
            help="Base model (diffusers folder or .safetensors) to merge into; "
            "with --extract, the original model.",
            show_default=False,
        ),
    ] = None,
    extract: Annotated[
        bool, typer.Option("--extract", help="Extract a LoRA from --tuned minus --base.")
    ] = False,
    tuned: Annotated[
        Path | None,
        typer.Option("--tuned", help="With --extract: the fine-tuned model.", show_default=False),
    ] = None,
    mode: Annotated[
        Mode | None,
        typer.Option(
            "--mode",
            help="LoRAs into one: exact (sum, then SVD to --rank) or concat (stack ranks, "
            "lossless). Default: exact with --rank, else concat.",
            show_default=False,
        ),
    ] = None,
    rank: Annotated[
        int | None,
        typer.Option(
            "--rank", "-r", min=1, help="Rank for exact merges and --extract.", show_default=False
        ),
    ] = None,
    conv_rank: Annotated[
        int | None,
        typer.Option(
            "--conv-rank",
            min=1,
            help="Rank for conv 3x3 modules (exact: default --rank; "
            "--extract: conv layers only when given).",
            show_default=False,
        ),
    ] = None,
    method: Annotated[
        Method,
        typer.Option(
            "--method", "-m", help="Rank rule for exact/extract (see `loraforge resize --help`)."
        ),
    ] = Method.fixed,
    param: Annotated[
        float | None,
        typer.Option("--param", "-p", help="The rank rule's parameter.", show_default=False),
    ] = None,
    save_precision: SavePrecisionOpt = None,
    device: DeviceOpt = Device.cpu,
    fmt: FormatOpt = OutputFormat.table,
    verbose: VerboseOpt = False,
    force: ForceOpt = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    r"""Merge LoRAs into a checkpoint, several LoRAs into one, or extract a LoRA from two models.

    [bold]Into a checkpoint[/] (--base with --lora): W += ratio · ΔW for every module, for every
    algorithm (LoRA/LoCon, LoHa, LoKr, IA3, OFT/BOFT, GLoRA, full, DoRA, and the norm layers of
    LyCORIS train_norm files); bias deltas (full diff_b, norm b_norm) go into the biases. The
    table counts the modules and bias deltas applied. A .safetensors base
    gives a .safetensors file; a diffusers folder base gives a folder. A LoRA made for another
    family (SDXL LoRA, SD 1.5 model) is refused.

    [bold]LoRAs into one[/] (--lora only): concat stacks the ranks (rank = sum of ranks, exact);
    exact sums the deltas and cuts the sum to --rank by SVD (best approximation of that rank;
    the summary says how much of the modules' norm is kept, --verbose per module). Ratios may
    be negative.

    [bold]Extract[/] (--extract --base ORIGINAL --tuned FINETUNED --rank R): a kohya LoRA of
    the difference; --conv-rank adds the ResNet 3x3 convs (LoCon). Text encoders that did not
    change are left out, as sd-scripts does.

    Example:

        loraforge merge --base sd15.safetensors --lora style.safetensors:0.8 \
            --lora detail.safetensors:0.5 -o sd15-style.safetensors

        loraforge merge --lora a.safetensors:1 --lora b.safetensors:-0.5 --rank 32 -o ab.safetensors

        loraforge merge --lora a.safetensors --lora b.safetensors --mode concat -o ab.safetensors

        loraforge merge --extract --base sd15.safetensors --tuned finetune.safetensors \
            --rank 64 --conv-rank 32 -o extracted.safetensors
    """
    from loraforge.ops.svd import check_param

    try:
        check_param(method.value, param)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--param") from e
    opts = _Options(
        output,
        rank,
        conv_rank,
        method,
        param,
        save_precision,
        resolve_device(device),
        fmt,
        force,
        allow_pickle,
        verbose,
    )
    if extract:
        _usage(bool(lora), "--extract takes --base and --tuned, not --lora")
        _usage(
            base is None or tuned is None, "--extract needs --base ORIGINAL and --tuned FINETUNED"
        )
        _usage(rank is None, "--extract needs --rank")
        _extract(base, tuned, opts)  # type: ignore[arg-type]
        return
    _usage(tuned is not None, "--tuned is only used with --extract")
    _usage(not lora, "give at least one --lora PATH[:RATIO]")
    specs = [parse_lora_spec(s) for s in lora or []]
    if base is not None:
        _usage(
            mode is not None or rank is not None,
            "--mode/--rank are for merging LoRAs into one, not into --base",
        )
        _into_base(base, specs, opts)
        return
    chosen = mode or (Mode.exact if rank is not None else Mode.concat)
    _usage(chosen == Mode.exact and rank is None, "--mode exact needs --rank")
    _usage(
        chosen == Mode.concat and rank is not None,
        "--mode concat keeps every rank; drop --rank or use --mode exact",
    )
    _loras(specs, chosen, opts)


@dataclass(frozen=True)
class _Options:
    """The options every mode shares, parsed once."""

    output: Path
    rank: int | None
    conv_rank: int | None
    method: Method
    param: float | None
    precision: Precision | None
    device: str
    fmt: OutputFormat
    force: bool
    allow_pickle: bool
    verbose: bool = False


def _usage(failed: bool, message: str) -> None:
    if failed:
        raise typer.BadParameter(message)


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """``PATH[:RATIO]`` -> ``(path, ratio)``; a drive letter (``C:\\…``) is not a ratio."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(spec), 1.0


def _load(
    specs: list[tuple[Path, float]], allow_pickle: bool
) -> list[tuple[LoadedLora, WeightedLora]]:
    from loraforge.ops.merge import WeightedLora

    items = []
    for path, ratio in specs:
        loaded = load_input(path, allow_pickle)
        items.append((loaded, WeightedLora(loaded.parsed, ratio, loaded.family)))
    return items


def _into_base(base_path: Path, specs: list[tuple[Path, float]], opts: _Options) -> None:
    from loraforge.console import warn
    from loraforge.ops.base_model import load_base, resolver, write_base
    from loraforge.ops.merge_into import check_base_family, merge_into_state_dict

    items = _load(specs, opts.allow_pickle)
    base = load_base(base_path, allow_pickle=opts.allow_pickle)
    for _, item in items:
        check_base_family(item, base.family, base.label)
    weighted = [w for _, w in items]
    report = merge_into_state_dict(
        base.state, weighted, resolver(base), device=opts.device, base_label=base.label
    )
    for (label, _), names in zip(report.merged, report.skipped, strict=True):
        if names:
            warn(
                f"{label}: {len(names)} module(s) have no matching layer in {base.label} and "
                f"were skipped (e.g. {', '.join(names[:3])})"
            )
    for loaded, _ in items:
        unused = loaded.parsed.unused_keys
        if unused:
            warn(
                f"{loaded.parsed.label}: {len(unused)} tensor(s) were not merged: they belong to "
                f"no module or their module's algorithm does not use them (e.g. "
                f"{', '.join(unused[:3])})"
            )
    merged = [
        {"file": str(p), "ratio": r, "sshs_model_hash": loaded.file.metadata.get("sshs_model_hash")}
        for (p, r), (loaded, _) in zip(specs, items, strict=True)
    ]
    extra = {"loraforge_merged_loras": json.dumps(merged)}
    write_base(
        base, opts.output, extra_metadata=extra, dtype=to_dtype(opts.precision), force=opts.force
    )
    rows = [
        {
            "lora": str(p),
            "ratio": r,
            "family": loaded.family.display,
            "algorithm": loaded.parsed.algorithm,
            "modules": n,
            "bias_deltas": biases,
            "skipped_modules": list(skipped),
            "unused_tensors": list(loaded.parsed.unused_keys),
        }
        for (p, r), (loaded, _), (_, n), skipped, biases in zip(
            specs, items, report.merged, report.skipped, report.biases, strict=True
        )
    ]
    summary = {
        "base": str(base_path),
        "family": base.family,
        "output": str(opts.output),
        "changed_weights": len(report.keys),
        "loras": rows,
    }
    _render_merge(summary, opts.fmt)


def _render_merge(summary: dict[str, Any], fmt: OutputFormat) -> None:
    from rich.table import Table

    from loraforge.console import out, print_json

    if fmt == OutputFormat.json:
        print_json(summary)
        return
    table = Table(title=f"merge into {summary['base']} ({summary['family']})", title_justify="left")
    for column in ("LoRA", "ratio", "family", "algorithm", "modules", "bias deltas"):
        table.add_column(column, overflow="fold")
    for row in summary["loras"]:
        table.add_row(
            row["lora"],
            f"{row['ratio']:g}",
            row["family"],
            row["algorithm"],
            str(row["modules"]),
            str(row["bias_deltas"]),
        )
    out.print(table)
    out.print(f"{summary['changed_weights']} weights changed; wrote {summary['output']}")


def _loras(specs: list[tuple[Path, float]], mode: Mode, opts: _Options) -> None:
    import torch

    from loraforge.ops.derived_metadata import derived_lora_metadata, inherited_metadata
    from loraforge.ops.lora_file import write_lora_file
    from loraforge.ops.merge import (
        ExactSpec,
        check_lora_families,
        merge_loras_concat,
        merge_loras_exact,
    )

    items = _load(specs, opts.allow_pickle)
    weighted = [w for _, w in items]
    check_lora_families(weighted)
    dtype = to_dtype(opts.precision) or _input_dtype(items) or torch.float16
    if mode == Mode.concat:
        result = merge_loras_concat(weighted, dtype)
    else:
        spec = ExactSpec(opts.rank, opts.conv_rank, opts.method.value, opts.param, opts.device)  # type: ignore[arg-type]
        result = merge_loras_exact(weighted, spec, dtype)
    what = ", ".join(f"{p.name} x {r:g}" for p, r in specs)
    rank_note = f", rank {opts.rank}" if opts.rank else ""
    comment = f"merged by loraforge ({mode.value}{rank_note}) from {what}"
    family = next(
        (loaded.family for loaded, _ in items if loaded.family.family), items[0][0].family
    )
    modules = [(r.new_rank, r.new_alpha, r.kind == "conv3x3") for r in result.rows]
    meta = derived_lora_metadata(
        family.family, family.v_prediction, opts.output.stem, modules, comment
    )
    meta.update(inherited_metadata([loaded.file.metadata for loaded, _ in items]))
    meta["modelspec.merged_from"] = ", ".join(loaded.file.label for loaded, _ in items)
    write_lora_file(opts.output, result.tensors, meta, force=opts.force)
    summary = {
        "mode": mode.value,
        "rank": opts.rank,
        "inputs": [{"file": str(p), "ratio": r} for p, r in specs],
        "output": str(opts.output),
    }
    title = f"merge ({mode.value}) -> {opts.output.name}"
    render_rows(result.rows, summary, opts.fmt, title=title, verbose=opts.verbose)


def _input_dtype(items: list[tuple[LoadedLora, WeightedLora]]) -> Any:
    for loaded, _ in items:
        for module in loaded.parsed.modules.values():
            for tensor in module.tensors.values():
                if tensor.is_floating_point():
                    return tensor.dtype
    return None


def _extract(base_path: Path, tuned_path: Path, opts: _Options) -> None:
    import torch

    from loraforge.console import info
    from loraforge.ops.base_model import extraction_pairs, load_base
    from loraforge.ops.derived_metadata import derived_lora_metadata
    from loraforge.ops.extract import ExtractSpec, extract_lora
    from loraforge.ops.lora_file import write_lora_file

    base = load_base(base_path, allow_pickle=opts.allow_pickle)
    tuned = load_base(tuned_path, allow_pickle=opts.allow_pickle)
    pairs = extraction_pairs(base, tuned, conv=opts.conv_rank is not None)
    dtype = to_dtype(opts.precision) or torch.float16
    spec = ExtractSpec(
        opts.rank,
        opts.conv_rank,
        opts.method.value,
        opts.param,
        device=opts.device,
        save_dtype=dtype,
    )  # type: ignore[arg-type]
    result = extract_lora(pairs, spec)
    comment = f"extracted by loraforge from {tuned_path.name} - {base_path.name}"
    modules = [(r.new_rank, r.new_alpha, r.kind == "conv3x3") for r in result.rows]
    meta = derived_lora_metadata(base.family, base.v_prediction, opts.output.stem, modules, comment)
    write_lora_file(opts.output, result.tensors, meta, force=opts.force)
    skipped = [list(s) for s in result.skipped]
    summary = {
        "base": str(base_path),
        "tuned": str(tuned_path),
        "output": str(opts.output),
        "rank": opts.rank,
        "conv_rank": opts.conv_rank,
        "skipped": skipped,
    }
    title = f"extract {tuned_path.name} - {base_path.name} -> {opts.output.name}"
    render_rows(result.rows, summary, opts.fmt, title=title, verbose=opts.verbose)
    if opts.fmt == OutputFormat.table:
        for what, why in result.skipped:
            info(f"left out {what}: {why}")
