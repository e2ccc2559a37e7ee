"""Published architecture configs (diffusers layout) of the supported model families.

``configs/<sd15|sd2|sd2-v|sdxl>/`` hold ``model_index.json`` and the ``config.json`` of every
component (UNet, VAE, text encoders, scheduler, tokenizer settings), copied from the official
releases (SD 1.5, SD 2.1-base, SD 2.1 768-v, SDXL base 1.0). They let a single-file checkpoint
load without network and let the VRAM estimator build full-size models on the meta device.
The tokenizers take their vocabulary from ``clip/`` (see ``loraforge.models.clip_tokenizer``).

The flow-matching families ship one folder per published variant, each with ``transformer/``
(``FluxTransformer2DModel`` / ``SD3Transformer2DModel``), ``vae/`` (16 latent channels),
``scheduler/`` (``FlowMatchEulerDiscreteScheduler``) and the text encoders' configs (FLUX:
``text_encoder`` CLIP-L, ``text_encoder_2`` T5-XXL; SD3: CLIP-L, CLIP-G, T5-XXL), but no
``model_index.json`` and no tokenizers (T5's sentencepiece vocabulary is not shipped):

* ``flux-dev``, ``flux-schnell``   FLUX.1 dev (guidance embedding) and schnell
* ``sd3-medium``                   SD3 Medium (24 MMDiT blocks, 1536 wide)
* ``sd35-medium``                  SD3.5 Medium (24 blocks, dual attention in blocks 0-12, RMS qk-norm)
* ``sd35-large``                   SD3.5 Large and Large Turbo (38 blocks, 2432 wide, RMS qk-norm)
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent

# family -> folder name; SD 1.x all share the SD 1.5 architecture
_FOLDERS = {"sd1": "sd15", "sd2": "sd2", "sd2-v": "sd2-v", "sdxl": "sdxl"}
# flow-matching transformer variants: the name is the folder
_FOLDERS.update(
    {name: name for name in ("flux-dev", "flux-schnell", "sd3-medium", "sd35-medium", "sd35-large")}
)


def architecture_config_dir(family: str) -> Path:
    """Folder of the published diffusers configs of ``family`` (sd1, sd2, sd2-v, sdxl) or of a
    flow-matching variant (flux-dev, flux-schnell, sd3-medium, sd35-medium, sd35-large).

    Raises:
        ValueError: for an unknown family.
    """
    try:
        return _HERE / _FOLDERS[family]
    except KeyError:
        raise ValueError(
            f"unknown model family {family!r}; expected one of {', '.join(_FOLDERS)}"
        ) from None
