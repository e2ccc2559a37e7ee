"""The precision rules of a run, by dtype name: the one table ``train`` and the VRAM estimate use.

The rules mirror sd-scripts' ``train_network.py``:

* ``mixed_precision`` is the compute (autocast) dtype, and the dtype the frozen UNet and text
  encoders hold their weights in (fp32 for ``no``);
* ``fp8_base`` stores their Linear and Conv2d weights in float8 e4m3 (norms and embeddings keep
  the compute dtype; torch cannot normalise in float8) and computes through autocast;
* the network's parameters (and so their gradients) are fp32 unless ``full_fp16`` /
  ``full_bf16``;
* the VAE encodes in fp32 on the CPU and for SDXL under fp16 (its VAE overflows in fp16),
  otherwise in the compute dtype (``loraforge cache`` uses the same rule, so cached latents stay
  valid).

Pure Python: torch is imported only by :func:`torch_dtype`, so ``check`` stays instant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from loraforge.recipe.types import TrainingConfig

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}
_COMPUTE = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}


@dataclass(frozen=True)
class DtypePlan:
    """Every dtype of a run, by name (``fp32`` | ``fp16`` | ``bf16`` | ``fp8``).

    Attributes:
        compute: the autocast dtype (``fp32``: no autocast) and the frozen models' weight dtype.
        frozen: stored dtype of the frozen UNet / text-encoder Linear and Conv2d weights
            (``fp8`` with ``fp8_base``, else ``compute``).
        network: the trainable parameters' dtype.
        save: the saved LoRA tensors' dtype.
    """

    compute: str
    frozen: str
    network: str
    save: str

    @property
    def fp8_base(self) -> bool:
        return self.frozen == "fp8"


def dtype_plan(training: TrainingConfig, save_precision: str = "fp16") -> DtypePlan:
    """Resolve the precision fields of ``training``.

    Args:
        training: the recipe's training section.
        save_precision: ``output.save_precision``.
    """
    compute = _COMPUTE[training.mixed_precision]
    return DtypePlan(
        compute=compute,
        frozen="fp8" if training.fp8_base and compute != "fp32" else compute,
        network="fp16" if training.full_fp16 else "bf16" if training.full_bf16 else "fp32",
        save=save_precision,
    )


def vae_dtype_name(mixed_precision: str, family: str, *, on_cpu: bool = False) -> str:
    """The VAE's dtype while encoding: fp32 on the CPU and for SDXL, SD3 and FLUX (their VAEs
    overflow in fp16) under fp16, else the
    compute dtype."""
    compute = _COMPUTE[mixed_precision]
    if on_cpu or compute == "fp32" or (family in ("sdxl", "sd3", "flux") and compute == "fp16"):
        return "fp32"
    return compute


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a dtype name."""
    import torch

    table: dict[str, Any] = {
        "fp32": torch.float32,
        "fp16": torch.float16,
        "bf16": torch.bfloat16,
        "fp8": torch.float8_e4m3fn,
    }
    return table[name]
