"""Max-norm regularisation of LoRA weights (``training.scale_weight_norms``).

As sd-scripts' ``networks/lora.py`` ``LoRANetwork.apply_max_norm_regularization``: for every
module, ``W = up @ down * alpha / rank`` (a convolution for 3x3 LoCon); when ``||W||_F`` exceeds
the limit, both ``up`` and ``down`` are multiplied by ``sqrt(limit / ||W||)`` so ``||W||`` becomes
the limit. Norms below half the limit are clamped to half before the ratio is taken (the ratio is
then 1), exactly like sd-scripts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MaxNormStats:
    """What one max-norm pass did (logged as ``max_norm/keys_scaled``, ``max_norm/*``).

    Attributes:
        keys_scaled: modules whose weights were scaled down.
        mean_norm: mean of the modules' ``||W||`` after scaling.
        max_norm: largest ``||W||`` after scaling.
    """

    keys_scaled: int
    mean_norm: float
    max_norm: float


def lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """``up @ down * scale`` shaped like the base weight (Linear, 1x1 conv or 3x3 conv)."""
    down = down.float()
    up = up.float()
    if up.shape[2:] == (1, 1) and down.shape[2:] == (1, 1):
        delta = (up.flatten(1) @ down.flatten(1))[:, :, None, None]
    elif up.shape[2:] == (3, 3) or down.shape[2:] == (3, 3):
        delta = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    else:
        delta = up @ down
    return delta * scale


@torch.no_grad()
def apply_max_norm_regularization(
    weights: Mapping[str, torch.Tensor], max_norm_value: float
) -> MaxNormStats:
    """Scale down, in place, the LoRA modules whose weight delta norm exceeds ``max_norm_value``.

    Args:
        weights: kohya-named tensors (``<module>.lora_down.weight``, ``<module>.lora_up.weight``,
            ``<module>.alpha``) that share storage with the trained parameters, e.g. the
            network's ``state_dict()``; modified in place.
        max_norm_value: the limit (``training.scale_weight_norms``), > 0.

    Returns:
        :class:`MaxNormStats` (zeros when there is no LoRA module).
    """
    norms: list[float] = []
    keys_scaled = 0
    for down_key in (k for k in weights if "lora_down" in k and k.endswith("weight")):
        down = weights[down_key]
        up = weights[down_key.replace("lora_down", "lora_up")]
        alpha = weights.get(down_key.replace("lora_down.weight", "alpha"))
        rank = down.shape[0]
        scale = (float(alpha) if alpha is not None else rank) / rank
        delta_norm = lora_delta(down, up, scale).norm()
        norm = delta_norm.clamp(min=max_norm_value / 2)
        ratio = (torch.clamp(norm, max=max_norm_value) / norm).item()
        if ratio != 1:
            keys_scaled += 1
            down.mul_(ratio**0.5)
            up.mul_(ratio**0.5)
        norms.append(delta_norm.item() * ratio)
    if not norms:
        return MaxNormStats(0, 0.0, 0.0)
    return MaxNormStats(keys_scaled, sum(norms) / len(norms), max(norms))
