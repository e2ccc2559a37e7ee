"""The training loss: loss types, huber schedules, per-sample weights and SNR-based weightings.

Formulas follow kohya-ss/sd-scripts (``train_util.get_huber_threshold_if_needed``,
``train_util.conditional_loss``, ``custom_train_functions.apply_snr_weight`` and friends) and are
applied in sd-scripts' order: element-wise loss -> loss mask (``apply_masked_loss``, with masked
loss) -> mean per sample -> per-sample weight (prior loss weight of regularisation images) -> min-SNR -> v-pred scaling -> v-pred-like -> debiased ->
batch mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from loraforge.recipe import TrainingConfig
    from loraforge.training.noise import NoiseSchedule

LossType = Literal["l2", "l1", "huber", "smooth_l1"]
HuberSchedule = Literal["constant", "exponential", "snr"]
LOSS_TYPES: tuple[str, ...] = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES: tuple[str, ...] = ("constant", "exponential", "snr")

# SNR(0) is ~1175 for the SD schedule and infinite with some schedules; sd-scripts caps it here
# before the v-pred scaling and debiased weights.
SNR_CAP = 1000.0


@dataclass(frozen=True)
class LossOptions:
    """The recipe's loss fields (``training.*``) with the resolved prediction type."""

    loss_type: LossType = "l2"
    huber_schedule: HuberSchedule = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    min_snr_gamma: float | None = None
    v_prediction: bool = False
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False
    masked_loss: bool = False

    @classmethod
    def from_training(cls, training: TrainingConfig, v_prediction: bool) -> LossOptions:
        """Take the loss fields of the recipe's ``training`` section.

        Args:
            training: the recipe section.
            v_prediction: the resolved prediction type (``training.v_parameterization``, or
                the model family's when that is unset).
        """
        return cls(
            loss_type=training.loss_type,
            huber_schedule=training.huber_schedule,
            huber_c=training.huber_c,
            huber_scale=training.huber_scale,
            min_snr_gamma=training.min_snr_gamma,
            v_prediction=v_prediction,
            scale_v_pred_loss_like_noise_pred=training.scale_v_pred_loss_like_noise_pred,
            v_pred_like_loss=training.v_pred_like_loss,
            debiased_estimation_loss=training.debiased_estimation_loss,
            masked_loss=training.masked_loss,
        )


def huber_threshold(
    options: LossOptions,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    num_train_timesteps: int,
) -> torch.Tensor | None:
    """The per-sample huber parameter ``c`` for huber/smooth_l1 losses; ``None`` for l1/l2.

    - constant: ``huber_c * huber_scale``
    - exponential: ``exp(ln(huber_c) * t / T) * huber_scale`` (``huber_scale`` at t=0, ``huber_c``
      at t=T)
    - snr: ``(1 - huber_c) / (1 + sigma_t)**2 + huber_c`` with ``sigma_t =
      sqrt((1 - alpha_bar_t) / alpha_bar_t)`` (no ``huber_scale``, as in sd-scripts)

    Returns:
        ``(B,)`` float tensor on ``timesteps``' device, or ``None``.
    """
    if options.loss_type not in ("huber", "smooth_l1"):
        return None
    schedule = options.huber_schedule
    if schedule == "exponential":
        alpha = -math.log(options.huber_c) / num_train_timesteps
        return torch.exp(-alpha * timesteps) * options.huber_scale
    if schedule == "snr":
        acp = torch.index_select(alphas_cumprod.cpu(), 0, timesteps.cpu())
        sigmas = ((1.0 - acp) / acp) ** 0.5
        result = (1 - options.huber_c) / (1 + sigmas) ** 2 + options.huber_c
        return result.to(timesteps.device)
    if schedule == "constant":
        return torch.full(
            (timesteps.shape[0],), options.huber_c * options.huber_scale, device=timesteps.device
        )
    raise ValueError(f"unknown huber schedule {schedule!r}; expected one of {HUBER_SCHEDULES}")


def conditional_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    loss_type: str,
    reduction: Literal["none", "mean", "sum"] = "none",
    huber_c: torch.Tensor | None = None,
) -> torch.Tensor:
    """Element-wise loss between prediction and target.

    - l2: ``(p - t)**2``; l1: ``|p - t|``
    - huber: ``2 c (sqrt((p - t)**2 + c**2) - c)``
    - smooth_l1: ``2 (sqrt((p - t)**2 + c**2) - c)``

    Args:
        pred, target: same shape, batch first.
        loss_type: one of :data:`LOSS_TYPES`.
        reduction: ``"none"`` keeps the element-wise loss.
        huber_c: ``(B,)`` per-sample ``c`` (required for huber / smooth_l1).

    Raises:
        ValueError: unknown loss type, or a huber loss without ``huber_c``.
    """
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction=reduction)
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction=reduction)
    if loss_type not in ("huber", "smooth_l1"):
        raise ValueError(f"unknown loss type {loss_type!r}; expected one of {LOSS_TYPES}")
    if huber_c is None:
        raise ValueError(f"loss type {loss_type!r} needs huber_c (see huber_threshold)")
    c = huber_c.view(-1, *([1] * (pred.ndim - 1)))
    loss = 2 * (torch.sqrt((pred - target) ** 2 + c**2) - c)
    if loss_type == "huber":
        loss = c * loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def per_sample_mean(loss: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: ``(B, ...) -> (B,)``."""
    return loss.mean(dim=list(range(1, loss.ndim)))


def sample_loss_weights(
    is_reg: Sequence[bool], prior_loss_weight: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Per-sample weights: ``prior_loss_weight`` for regularisation images, 1 otherwise."""
    values = [prior_loss_weight if reg else 1.0 for reg in is_reg]
    return torch.tensor(values, dtype=torch.float32, device=device)


def _snr_at(all_snr: torch.Tensor, timesteps: torch.Tensor, device: torch.device) -> torch.Tensor:
    return all_snr.to(device)[timesteps.to(device)]


def apply_snr_weight(
    loss: torch.Tensor,
    timesteps: torch.Tensor,
    all_snr: torch.Tensor,
    gamma: float,
    v_prediction: bool = False,
) -> torch.Tensor:
    """Min-SNR-gamma weighting: ``loss * min(SNR, gamma) / SNR`` (epsilon) or
    ``loss * min(SNR, gamma) / (SNR + 1)`` (v-prediction).

    Args:
        loss: ``(B,)`` per-sample loss.
        timesteps: ``(B,)`` int64.
        all_snr: ``(T,)`` SNR table (:attr:`NoiseSchedule.all_snr`).
    """
    snr = _snr_at(all_snr, timesteps, loss.device)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    weight = clipped / (snr + 1) if v_prediction else clipped / snr
    return loss * weight.float()


def snr_scale(timesteps: torch.Tensor, all_snr: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``SNR / (SNR + 1)`` with SNR capped at :data:`SNR_CAP`."""
    snr = torch.clamp(_snr_at(all_snr, timesteps, device), max=SNR_CAP)
    return snr / (snr + 1)


def scale_v_prediction_loss_like_noise_prediction(
    loss: torch.Tensor, timesteps: torch.Tensor, all_snr: torch.Tensor
) -> torch.Tensor:
    """``loss * SNR / (SNR + 1)``: brings a v-prediction loss to the scale of an epsilon loss."""
    return loss * snr_scale(timesteps, all_snr, loss.device)


def add_v_prediction_like_loss(
    loss: torch.Tensor, timesteps: torch.Tensor, all_snr: torch.Tensor, weight: float
) -> torch.Tensor:
    """``loss + weight * loss * (SNR + 1) / SNR``: mixes in a v-prediction-like loss term."""
    return loss + loss / snr_scale(timesteps, all_snr, loss.device) * weight


def apply_debiased_estimation(
    loss: torch.Tensor, timesteps: torch.Tensor, all_snr: torch.Tensor, v_prediction: bool = False
) -> torch.Tensor:
    """Debiased estimation: ``loss / sqrt(SNR)`` (epsilon) or ``loss / (SNR + 1)`` (v-prediction),
    with SNR capped at :data:`SNR_CAP`."""
    snr = torch.clamp(_snr_at(all_snr, timesteps, loss.device), max=SNR_CAP)
    weight = 1 / (snr + 1) if v_prediction else 1 / torch.sqrt(snr)
    return weight * loss


def weight_per_sample_loss(
    loss: torch.Tensor, timesteps: torch.Tensor, all_snr: torch.Tensor, options: LossOptions
) -> torch.Tensor:
    """Apply the enabled SNR-based weightings to a ``(B,)`` loss, in sd-scripts' order."""
    if options.min_snr_gamma:
        loss = apply_snr_weight(
            loss, timesteps, all_snr, options.min_snr_gamma, options.v_prediction
        )
    if options.scale_v_pred_loss_like_noise_pred:
        loss = scale_v_prediction_loss_like_noise_prediction(loss, timesteps, all_snr)
    if options.v_pred_like_loss:
        loss = add_v_prediction_like_loss(loss, timesteps, all_snr, options.v_pred_like_loss)
    if options.debiased_estimation_loss:
        loss = apply_debiased_estimation(loss, timesteps, all_snr, options.v_prediction)
    return loss


def training_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    loss_weights: torch.Tensor,
    schedule: NoiseSchedule,
    options: LossOptions,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The scalar loss of one batch, exactly as sd-scripts' ``process_batch`` computes it.

    Args:
        pred: ``(B, C, H, W)`` UNet output.
        target: ``(B, C, H, W)`` from :func:`loraforge.training.noise.prediction_target`.
        timesteps: ``(B,)`` int64.
        loss_weights: ``(B,)`` from :func:`sample_loss_weights`.
        schedule: the noise schedule (alphas for the huber schedule, the SNR table).
        options: the loss fields.
        mask: ``(B, 1, H, W)`` weight of each latent pixel (masked loss), or ``None``. As in
            sd-scripts the masked loss is still averaged over every pixel, so a half-masked
            image weighs half.

    Returns:
        0-dim float32 tensor.
    """
    huber_c = huber_threshold(
        options, timesteps, schedule.alphas_cumprod, schedule.num_train_timesteps
    )
    loss = conditional_loss(pred.float(), target.float(), options.loss_type, "none", huber_c)
    if mask is not None:
        if mask.shape[0] != loss.shape[0] or mask.shape[-2:] != loss.shape[-2:]:
            raise ValueError(f"mask {tuple(mask.shape)} does not fit the loss {tuple(loss.shape)}")
        loss = loss * mask.to(loss.device, loss.dtype)
    loss = per_sample_mean(loss) * loss_weights.to(loss.device)
    loss = weight_per_sample_loss(loss, timesteps, schedule.all_snr, options)
    return loss.mean()
