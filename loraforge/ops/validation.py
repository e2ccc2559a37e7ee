"""The checks every LoRA reader applies to tensor values: ``check``, ``resize``, ``merge`` and
``network.weights`` all refuse the same files for the same reasons, naming the module.

A LoRA tensor must be floating point (fp8 files are read and upcast for checking) and finite;
``alpha`` must be a finite scalar above zero. Module names are checked against the model family's
layers where those are known (see :func:`name_problems`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Mapping

import torch

from loraforge.models.naming import TE_WITHOUT_TEXT_MODEL
from loraforge.ops.modules import Problem

#: ``(family, has_conv) -> (every layer name of the base model, kohya's default targets)``;
#: ``None`` when the family's names are not available.
ExpectedNames = Callable[[str, bool], "tuple[Collection[str], Collection[str]] | None"]


#: module tensors that are not weights: alpha (checked by :func:`read_alpha`), IA3's flag
_NOT_WEIGHTS = frozenset({"alpha", "on_input"})


def is_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite; float8 (which torch cannot test directly) is upcast."""
    if tensor.dtype.itemsize == 1 and tensor.is_floating_point():
        tensor = tensor.float()
    return bool(torch.isfinite(tensor).all())


def tensor_problems(name: str, parts: Mapping[str, torch.Tensor]) -> list[Problem]:
    """Errors for one module's tensors (``parts`` by their name after the module name)."""
    problems = []
    for part, tensor in parts.items():
        if part in _NOT_WEIGHTS:
            continue
        if not tensor.is_floating_point():
            problems.append(
                Problem(
                    "error",
                    name,
                    f"{part} has dtype {str(tensor.dtype).removeprefix('torch.')}; LoRA tensors "
                    "are floating point",
                )
            )
        elif not is_finite(tensor):
            problems.append(Problem("error", name, "has NaN or infinite values"))
    return problems


def read_alpha(
    name: str, alpha: torch.Tensor | None, problems: list[Problem], *, scales: bool = True
) -> float | None:
    """The module's alpha as a float, or ``None`` (absent or unusable, with an error added).

    Args:
        scales: alpha scales the delta (``alpha / rank``) and so must be above 0; OFT stores
            its constraint there (0: none), IA3 and full diffs nothing.
    """
    if alpha is None:
        return None
    if alpha.numel() != 1:
        problems.append(
            Problem("error", name, f"alpha has shape {tuple(alpha.shape)}, expected a scalar")
        )
        return None
    if alpha.dtype == torch.bool or alpha.is_complex():
        problems.append(Problem("error", name, f"alpha has dtype {alpha.dtype}, expected a number"))
        return None
    value = float(alpha.detach().float().reshape(()).item())
    if not math.isfinite(value) or (scales and value <= 0):
        problems.append(Problem("error", name, f"alpha is {value:g}; it must be above 0"))
        return None
    return value


def name_problems(names: Iterable[str], known: Collection[str] | None) -> list[Problem]:
    """Errors for module names no reader loads: text-encoder names without ``text_model``, and
    (when ``known``, the family's layer names, is given) names that match no layer."""
    names = list(names)
    problems = []
    bad_te = [n for n in names if TE_WITHOUT_TEXT_MODEL.match(n)]
    if bad_te:
        problems.append(
            Problem(
                "error",
                None,
                f"{len(bad_te)} text-encoder module(s) are named without 'text_model' "
                f"(e.g. {bad_te[0]}); A1111/ComfyUI/diffusers will not load them "
                "(`loraforge resize` at the file's rank writes a copy with the kohya names)",
            )
        )
    if known is not None:
        known_set = set(known)
        unexpected = [n for n in names if n not in known_set and n not in bad_te]
        if unexpected:
            problems.append(
                Problem(
                    "error",
                    None,
                    f"{len(unexpected)} module(s) match no layer of this model family "
                    f"(e.g. {', '.join(unexpected[:3])})",
                )
            )
    return problems
