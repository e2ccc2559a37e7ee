"""Published architecture configs (diffusers layout) of the supported model families.

``configs/<sd15|sd2|sd2-v|sdxl>/`` hold ``model_index.json`` and the ``config.json`` of every
component (UNet, VAE, text encoders, scheduler, tokenizer settings), copied from the official
releases (SD 1.5, SD 2.1-base, SD 2.1 768-v, SDXL base 1.0). They let a single-file checkpoint
load without network and let the VRAM estimator build full-size models on the meta device.
The tokenizers take their vocabulary from ``clip/`` (see ``loraforge.models.clip_tokenizer``).
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent

# family -> folder name; SD 1.x all share the SD 1.5 architecture
_FOLDERS = {"sd1": "sd15", "sd2": "sd2", "sd2-v": "sd2-v", "sdxl": "sdxl"}


def architecture_config_dir(family: str) -> Path:
    """Folder of the published diffusers configs of ``family`` (sd1, sd2, sd2-v, sdxl).

    Raises:
        ValueError: for an unknown family.
    """
    try:
        return _HERE / _FOLDERS[family]
    except KeyError:
        raise ValueError(
            f"unknown model family {family!r}; expected one of {', '.join(_FOLDERS)}"
        ) from None
