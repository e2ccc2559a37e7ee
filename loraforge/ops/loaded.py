"""Read a LoRA file and group it in one step: what every command starts with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from loraforge.ops.family import FamilyGuess, detect_family
from loraforge.ops.lora_file import LoraFile, read_lora_file
from loraforge.ops.modules import ParsedLora, parse_lora


@dataclass(frozen=True)
class LoadedLora:
    """A LoRA file with its modules and detected family."""

    file: LoraFile
    parsed: ParsedLora
    family: FamilyGuess

    @property
    def stray(self) -> dict[str, torch.Tensor]:
        """Tensors that belong to no module (copied through by resize)."""
        return {k: self.file.tensors[k] for k in self.parsed.stray_keys if k in self.file.tensors}

    @property
    def kohya_oft(self) -> bool:
        """sd-scripts' own OFT (its constraint is scaled by the layer width)."""
        return self.file.metadata.get("ss_network_module") == "networks.oft"


def load_lora(
    path: Path | str, *, allow_pickle: bool = False, require_valid: bool = True
) -> LoadedLora:
    """Read, group and classify a LoRA file.

    Args:
        path: the file.
        allow_pickle: default False; see :func:`~loraforge.ops.lora_file.read_lora_file`.
        require_valid: default True; raise when the file is not a usable LoRA.

    Raises:
        LoraFileError: unreadable, not a LoRA, or (``require_valid``) structurally broken.
    """
    file = read_lora_file(path, allow_pickle=allow_pickle)
    parsed = parse_lora(file.tensors, file.label)
    if require_valid:
        parsed.require_valid()
    return LoadedLora(file, parsed, detect_family(parsed.modules, file.metadata))
