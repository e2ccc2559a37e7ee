"""Cross-field rules of the flow-matching families (``sd3``, ``flux``): DDPM options that do
nothing there, options of one family used with the other, and block swap's requirements."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from loraforge.recipe.types import Recipe

Finding = tuple[str, tuple[Any, ...], str, str | None]
FLOW = ("sd3", "flux")
#: sd-scripts' limits: FLUX keeps at least 2 double and 2 single blocks; SD3.5 Large 38 blocks
MAX_BLOCKS_TO_SWAP = {"flux": 35, "sd3": 36}
# DDPM-only training options (they read the SNR of a DDPM schedule)
_DDPM_ONLY = (
    ("min_snr_gamma", "min-SNR weighting"),
    ("debiased_estimation_loss", "debiased estimation"),
    ("zero_terminal_snr", "zero terminal SNR"),
    ("scale_v_pred_loss_like_noise_pred", "v-prediction loss scaling"),
    ("v_pred_like_loss", "the v-prediction-like loss"),
    ("noise_offset", "offset noise"),
    ("multires_noise_iterations", "multires noise"),
)
_FLOW_ONLY_TRAINING = ("timestep_sampling", "discrete_flow_shift", "model_prediction_type")


def flow_problems(r: Recipe) -> Iterator[Finding]:
    """The flow-family findings of ``r`` (for ``model.family: auto`` only the memory options'
    need of gradient checkpointing)."""
    family, t, m = r.model.family, r.training, r.model
    needs_checkpointing = (
        ("blocks_to_swap", "block swap (backward re-runs each swapped block)"),
        ("cpu_offload_checkpointing", "CPU offload of checkpointed inputs"),
    )
    for field, what in needs_checkpointing:
        if getattr(t, field) and not t.gradient_checkpointing:
            yield (
                "error",
                ("training", field),
                f"{what} needs gradient_checkpointing",
                "set training.gradient_checkpointing: true",
            )
    if family not in FLOW:
        if family != "auto":
            yield from _flow_options_elsewhere(r)
        return
    if t.blocks_to_swap > MAX_BLOCKS_TO_SWAP[family]:
        yield (
            "error",
            ("training", "blocks_to_swap"),
            f"{family} can swap at most {MAX_BLOCKS_TO_SWAP[family]} blocks",
            f"use blocks_to_swap <= {MAX_BLOCKS_TO_SWAP[family]}",
        )
    if t.mixed_precision == "fp16" or t.full_fp16:
        yield (
            "warning",
            ("training", "mixed_precision"),
            f"{family}'s transformer overflows in fp16 (the loss turns NaN); it is trained in bf16",
            "use mixed_precision: bf16 (RTX 30xx and newer)",
        )
    if t.v_parameterization is not None:
        yield (
            "error",
            ("training", "v_parameterization"),
            f"{family} is a rectified-flow model; v_parameterization does not apply",
            "remove it (model_prediction_type chooses how the output is read)",
        )
    for field, what in _DDPM_ONLY:
        if getattr(t, field):
            yield (
                "warning",
                ("training", field),
                f"{what} has no effect on {family} (flow-matching) training",
                f"remove {field}",
            )
    if family == "flux" and m.clip_g:
        yield ("error", ("model", "clip_g"), "FLUX has no CLIP-G text encoder", "remove clip_g")
    if m.clip_skip != 1:
        yield ("warning", ("model", "clip_skip"), f"{family} ignores clip_skip", "remove it")
    if m.max_token_length != 75:
        yield (
            "warning",
            ("model", "max_token_length"),
            f"{family}'s CLIP encoders always read 77 tokens",
            "set model.t5xxl_max_token_length for longer captions",
        )
    if family == "sd3" and t.guidance_scale != 1.0:
        yield (
            "warning",
            ("training", "guidance_scale"),
            "SD3 has no guidance input; guidance_scale is for FLUX.1 dev",
            "remove it",
        )
    if r.dataset.bucket_reso_steps % 16:
        yield (
            "error",
            ("dataset", "bucket_reso_steps"),
            f"{family} needs image sides in multiples of 16 (2x2 latent patches)",
            "use bucket_reso_steps: 64",
        )


def _flow_options_elsewhere(r: Recipe) -> Iterator[Finding]:
    family, t, m = r.model.family, r.training, r.model
    for field in _FLOW_ONLY_TRAINING:
        if getattr(t, field) is not None:
            yield (
                "warning",
                ("training", field),
                f"{field} applies to sd3/flux only; {family} ignores it",
                "remove it",
            )
    if t.cpu_offload_checkpointing:
        yield (
            "warning",
            ("training", "cpu_offload_checkpointing"),
            f"CPU offload of checkpointed inputs applies to the sd3/flux transformers; {family} "
            "ignores it",
            "remove it",
        )
    if t.blocks_to_swap:
        yield (
            "warning",
            ("training", "blocks_to_swap"),
            f"block swap applies to the sd3/flux transformers; {family} ignores it",
            "remove it",
        )
    for field in ("clip_l", "clip_g", "t5xxl", "t5xxl_max_token_length"):
        if getattr(m, field) is not None:
            yield (
                "warning",
                ("model", field),
                f"model.{field} applies to sd3/flux only; {family} ignores it",
                "remove it",
            )
