"""The metadata of SD3 / FLUX LoRAs that differs from the UNet families', as sd-scripts writes it.

``ss_base_model_version`` is ``flux1`` for FLUX.1 and the MMDiT model type (``medium``,
``5-medium``, ``5-large``) for SD3; ``modelspec.architecture`` ``flux-1-dev/lora``,
``stable-diffusion-3-5-large/lora`` …; ``modelspec.implementation`` BFL's repository for FLUX;
FLUX files carry no ``modelspec.prediction_type``. The flow-matching options are recorded as
``flux_train_network`` / ``sd3_train_network``'s ``update_metadata`` do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loraforge.recipe import Recipe

IMPL_FLUX = "https://github.com/black-forest-labs/flux"
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"


def is_flow(family: str) -> bool:
    return family in ("sd3", "flux")


def flow_model_keys(recipe: Recipe, family: str, variant: str | None) -> dict[str, Any]:
    """``ss_*`` keys replacing / adding to the UNet families' for ``family``."""
    from loraforge.training.flow import FlowOptions

    t = recipe.training
    options = FlowOptions.from_training(t, family, guided=variant == "dev")
    keys: dict[str, Any] = {
        "ss_clip_skip": None,
        "ss_apply_t5_attn_mask": False,
        "ss_weighting_scheme": t.weighting_scheme,
        "ss_logit_mean": t.logit_mean,
        "ss_logit_std": t.logit_std,
        "ss_mode_scale": t.mode_scale,
    }
    if family == "flux":
        keys.update(
            {
                "ss_model_type": "flux",
                "ss_guidance_scale": t.guidance_scale,
                "ss_timestep_sampling": options.timestep_sampling,
                "ss_sigmoid_scale": t.sigmoid_scale,
                "ss_model_prediction_type": options.model_prediction_type,
                "ss_discrete_flow_shift": options.discrete_flow_shift,
            }
        )
    else:
        keys["ss_apply_lg_attn_mask"] = False
    return keys


def flow_modelspec(family: str, variant: str | None) -> dict[str, str | None]:
    """``modelspec.*`` fields replacing the UNet families' (``None`` removes a field)."""
    return {
        "implementation": IMPL_FLUX if family == "flux" else IMPL_STABILITY_AI,
        "prediction_type": None if family == "flux" else "epsilon",
        "encoder_layer": None,
    }
