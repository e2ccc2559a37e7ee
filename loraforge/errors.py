"""The one exception family user errors travel in.

Domain code raises a :class:`LoraforgeError` subclass; only the CLI entry point catches it,
prints its message and exits with code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations


class LoraforgeError(Exception):
    """A user error: what went wrong, where, and how to fix it.

    Args:
        message: what went wrong and where (a file, a field, a module name).
        hint: how to fix it, shown on its own line; ``None`` when the message already says it.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message}\n  hint: {self.hint}"


class RecipeError(LoraforgeError):
    """The recipe cannot be read or does not validate."""


class DatasetError(LoraforgeError):
    """The dataset is empty, unreadable or inconsistent with the recipe."""


class ModelError(LoraforgeError):
    """A base model, VAE or tokenizer cannot be found, read or recognised."""


class LoraFileError(LoraforgeError):
    """A LoRA file is missing, malformed, or not what the operation needs."""


class DependencyError(LoraforgeError):
    """An optional package (bitsandbytes, lycoris-lora, onnxruntime…) is missing or unusable."""


class TrainingError(LoraforgeError):
    """Training cannot continue (NaN loss, incompatible resume state…)."""


class OutputExistsError(LoraforgeError):
    """An output exists and ``--force`` was not given."""


class OutputWriteError(LoraforgeError):
    """An output could not be written (a full disk, a read-only folder)."""


class ReportError(LoraforgeError):
    """A run report cannot be made (no metrics file, an unreadable output folder)."""
