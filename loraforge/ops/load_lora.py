"""Read a LoRA file and group it in one step: what every command starts with."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from loraforge.models.naming import restore_text_model_names
from loraforge.ops.family import FamilyGuess, detect_family
from loraforge.ops.lora_file import LoraFile, read_lora_file
from loraforge.ops.modules import ParsedLora, parse_lora
from loraforge.ops.validation import ExpectedNames, name_problems


@dataclass(frozen=True)
class LoadedLora:
    """A LoRA file with its modules and detected family.

    Attributes:
        file: the file as read.
        tensors: its tensors, text-encoder names restored to the kohya form.
        parsed: the modules of ``tensors``.
        family: the detected model family.
        renamed: modules whose names lacked ``text_model`` in the file (see
            :func:`~loraforge.models.naming.restore_text_model_names`).
    """

    file: LoraFile
    tensors: dict[str, torch.Tensor]
    parsed: ParsedLora
    family: FamilyGuess
    renamed: tuple[str, ...]

    @property
    def stray(self) -> dict[str, torch.Tensor]:
        """Tensors that belong to no module (copied through by resize)."""
        return {k: self.tensors[k] for k in self.parsed.stray_keys if k in self.tensors}


def load_lora(
    path: Path | str,
    *,
    allow_pickle: bool = False,
    require_valid: bool = True,
    expected: ExpectedNames | None = None,
    unknown_names: str = "error",
) -> LoadedLora:
    """Read, group and classify a LoRA file.

    Text-encoder modules named without ``text_model`` get their kohya names back, so merge and
    resize apply them and write files every UI loads.

    Args:
        path: the file.
        allow_pickle: default False; see :func:`~loraforge.ops.lora_file.read_lora_file`.
        require_valid: default True; raise when the file is not a usable LoRA: broken
            structure, tensors that are not floating point or not finite, alpha <= 0 (see
            :mod:`loraforge.ops.validation`), or module names that match no layer.
        expected: the family's layer names (e.g.
            :func:`loraforge.models.name_tables.expected_names`); ``None`` checks no names.
        unknown_names: severity of module names outside ``expected``: ``"error"`` (default),
            or ``"warning"`` where a later step matches names itself (merging into a model).

    Raises:
        LoraFileError: unreadable, not a LoRA, or (``require_valid``) not usable, naming the
            modules.
    """
    file = read_lora_file(path, allow_pickle=allow_pickle)
    tensors, renamed = restore_text_model_names(file.tensors)
    parsed = parse_lora(tensors, file.label)
    family = detect_family(parsed.modules, file.metadata)
    if expected is not None and family.family is not None and parsed.modules:
        conv = any(m.is_conv3x3 for m in parsed.modules.values())
        names = expected(family.family, conv)
        found = [
            replace(p, severity=unknown_names)
            for p in name_problems(parsed.modules, names[0] if names is not None else None)
        ]
        parsed = replace(parsed, problems=(*parsed.problems, *found))
    if require_valid:
        parsed.require_valid()
    return LoadedLora(file, tensors, parsed, family, renamed)
