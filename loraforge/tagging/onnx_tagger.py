"""WD14-family taggers (SmilingWolf's ``model.onnx`` + ``selected_tags.csv``) through onnxruntime.

onnxruntime is an optional dependency (``pip install 'loraforge[tag]'``, or ``onnxruntime-gpu``
for CUDA); it is imported only when a tagger is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from loraforge.errors import DependencyError, ModelError
from loraforge.tagging.compose import order_tags, select_tags
from loraforge.tagging.labels import TagLabels, read_selected_tags
from loraforge.tagging.model_source import TaggerFiles
from loraforge.tagging.preprocess import wd14_array

if TYPE_CHECKING:
    from loraforge.recipe.types import TaggingConfig

_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


def import_onnxruntime() -> Any:
    """The ``onnxruntime`` module.

    Raises:
        DependencyError: it is not installed.
    """
    try:
        import onnxruntime
    except ImportError as e:
        raise DependencyError(
            "the WD14 tagger needs onnxruntime, which is not installed",
            hint="pip install 'loraforge[tag]' (or onnxruntime-gpu for CUDA), "
            "or use tagging.mode: captioner",
        ) from e
    return onnxruntime


def execution_providers(available: Sequence[str], device: str) -> list[str]:
    """The onnxruntime providers for ``device`` (``auto``, ``cpu`` or ``cuda``).

    ``auto`` takes CUDA when this onnxruntime build has it, with the CPU as fallback.

    Raises:
        DependencyError: ``cuda`` was asked for and this onnxruntime has no CUDA provider.
    """
    if device == "cpu":
        return [_CPU]
    if _CUDA in available:
        return [_CUDA, _CPU]
    if device == "cuda":
        raise DependencyError(
            "tagging.device is cuda but the installed onnxruntime has no CUDA provider "
            f"(it has {', '.join(available) or 'none'})",
            hint="pip uninstall onnxruntime && pip install onnxruntime-gpu, "
            "or set tagging.device: cpu",
        )
    return [_CPU]


class Wd14Tagger:
    """A loaded WD14-family tagger.

    Args:
        files: the model and label files (see
            :func:`~loraforge.tagging.model_source.resolve_tagger`).
        device: ``auto``, ``cpu`` or ``cuda`` (default ``auto``).

    Attributes:
        labels: the vocabulary, in output order.
        input_size: the square input side read from the model (448 for the v2/v3 taggers).
        providers: the onnxruntime providers in use.

    Raises:
        DependencyError: onnxruntime is missing or lacks the requested device.
        ModelError: the model cannot be loaded or its input/output do not have the WD14 layout
            (NHWC ``[N, S, S, 3]`` in, ``[N, num_tags]`` out, ``num_tags`` = rows of the CSV).
    """

    def __init__(self, files: TaggerFiles, device: str = "auto") -> None:
        ort = import_onnxruntime()
        self.labels: TagLabels = read_selected_tags(files.labels)
        providers = execution_providers(ort.get_available_providers(), device)
        try:
            self._session = ort.InferenceSession(str(files.model), providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ModelError(
                f"{files.model}: onnxruntime cannot load the tagger ({_first_line(e)})",
                hint="download model.onnx again; the file may be incomplete",
            ) from e
        self.providers: tuple[str, ...] = tuple(self._session.get_providers())
        first_input = self._session.get_inputs()[0]
        self._input_name: str = first_input.name
        self.input_size, self._fixed_batch = _input_layout(files, first_input.shape)
        _check_output(files, self._session.get_outputs()[0].shape, len(self.labels))

    def prepare(self, image: Image.Image) -> np.ndarray:
        """One image as a model input row, ``(S, S, 3)`` float32 BGR (see :mod:`.preprocess`)."""
        return wd14_array(image, self.input_size)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Run the model.

        Args:
            batch: ``(N, S, S, 3)`` float32 from :meth:`prepare`.

        Returns:
            ``(N, num_tags)`` float32 probabilities. A model exported with a fixed batch size
            is run in chunks of that size (the last one padded).
        """
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        chunk = self._fixed_batch or max(len(batch), 1)
        outputs = []
        for start in range(0, len(batch), chunk):
            part = batch[start : start + chunk]
            real = len(part)
            if self._fixed_batch and real < chunk:
                pad = np.repeat(part[-1:], chunk - real, axis=0)
                part = np.concatenate([part, pad], axis=0)
            probs = self._session.run(None, {self._input_name: part})[0]
            outputs.append(np.asarray(probs, dtype=np.float32)[:real])
        if not outputs:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return np.concatenate(outputs, axis=0)


class TaggerAnnotator:
    """Turns images into ordered tag lists with a :class:`Wd14Tagger` and the recipe's settings."""

    def __init__(self, tagger: Wd14Tagger, config: TaggingConfig, name: str) -> None:
        self.tagger = tagger
        self.config = config
        self.description = f"{name} (WD14 tagger, {self.tagger.providers[0]})"

    def prepare(self, image: Image.Image) -> np.ndarray:
        return self.tagger.prepare(image)

    def annotate(self, prepared: Sequence[np.ndarray]) -> list[list[str]]:
        """Tags per image, thresholded and ordered (before the recipe clean-up)."""
        if not prepared:
            return []
        probs = self.tagger.predict(np.stack(list(prepared), axis=0))
        cfg = self.config
        return [
            order_tags(
                select_tags(
                    row, self.tagger.labels, cfg.general_threshold, cfg.character_threshold
                ),
                cfg,
            )
            for row in probs
        ]


def _input_layout(files: TaggerFiles, shape: Sequence[Any]) -> tuple[int, int | None]:
    """``(side, fixed batch or None)`` from an NHWC input shape; ModelError otherwise."""
    dims = list(shape)
    if len(dims) != 4 or dims[3] != 3 or not isinstance(dims[1], int) or dims[1] != dims[2]:
        raise ModelError(
            f"{files.model}: input shape {dims} is not a WD14 tagger's [batch, size, size, 3]",
            hint="loraforge runs SmilingWolf-format taggers (NHWC, BGR, 0..255 input)",
        )
    batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
    return int(dims[1]), batch


def _check_output(files: TaggerFiles, shape: Sequence[Any], num_labels: int) -> None:
    last = list(shape)[-1] if len(shape) else None
    if isinstance(last, int) and last != num_labels:
        raise ModelError(
            f"{files.model}: the model scores {last} tags but {files.labels} lists {num_labels}",
            hint="use the selected_tags.csv that ships with this model",
        )


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__
