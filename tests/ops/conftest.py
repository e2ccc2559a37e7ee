"""Helpers for the LoRA file-operation tests: synthetic kohya LoRAs and an in-process CLI runner."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class Synth:
    """Builders for synthetic LoRA state dicts and an independent delta formula."""

    @staticmethod
    def lora(
        name: str,
        out: int,
        inn: int,
        rank: int,
        *,
        kernel: int | None = None,
        alpha: float | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        up_scale: float = 1.0,
    ) -> dict[str, torch.Tensor]:
        """One kohya LoRA/LoCon module (``kernel`` > 1: conv k x k; 1: conv 1x1; None: linear)."""
        g = torch.Generator().manual_seed(seed)
        if kernel is None:
            down = torch.randn(rank, inn, generator=g)
            up = torch.randn(out, rank, generator=g) * up_scale
        else:
            down = torch.randn(rank, inn, kernel, kernel, generator=g)
            up = torch.randn(out, rank, 1, 1, generator=g) * up_scale
        tensors = {
            f"{name}.lora_down.weight": down.to(dtype),
            f"{name}.lora_up.weight": up.to(dtype),
        }
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha)).to(dtype)
        return tensors

    @staticmethod
    def delta(tensors: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
        """``up @ down · alpha / rank`` in float64, shaped like the layer weight (written here,
        independently of loraforge.ops)."""
        down = tensors[f"{name}.lora_down.weight"].double()
        up = tensors[f"{name}.lora_up.weight"].double()
        rank = down.shape[0]
        alpha = tensors.get(f"{name}.alpha")
        scale = 1.0 if alpha is None else float(alpha) / rank
        product = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
        shape = (up.shape[0], *down.shape[1:])
        return (product * scale).reshape(shape)

    @staticmethod
    def save(
        path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
    ) -> Path:
        from safetensors.torch import save_file

        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(path),
            metadata=dict(metadata or {}),
        )
        return path

    @staticmethod
    def for_weights(
        weights: Mapping[str, torch.Tensor],
        rank: int,
        *,
        alpha: float | None = None,
        seed: int = 0,
        up_scale: float = 0.05,
    ) -> dict[str, torch.Tensor]:
        """A LoRA with one module per ``{kohya name: layer weight}``, shaped for that layer."""
        tensors: dict[str, torch.Tensor] = {}
        for i, (name, w) in enumerate(weights.items()):
            r = min(rank, w.shape[0], w[0].numel())
            kernel = None if w.dim() == 2 else int(w.shape[-1])
            part = Synth.lora(
                name,
                w.shape[0],
                w.shape[1],
                r,
                kernel=kernel,
                alpha=alpha,
                seed=seed + i,
                up_scale=up_scale,
            )
            tensors.update(part)
        return tensors


@pytest.fixture
def synth() -> type[Synth]:
    return Synth


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Callable[..., CliResult]:
    """Run ``loraforge ARGS`` in-process through the real entry point (error -> exit-code mapping)."""
    from loraforge.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        code = 0
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = int(e.code or 0)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
