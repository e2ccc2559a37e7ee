"""The one interface the tagging run talks to, and the factory that loads the right model.

An annotator turns images into lists of caption items: ordered tags for a tagger, a single
sentence for a captioner. ``prepare`` runs on a loader thread (decode-side work such as padding
and resizing), ``annotate`` on a whole batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from PIL import Image

if TYPE_CHECKING:
    from loraforge.recipe.types import TaggingConfig


class Annotator(Protocol):
    """What :func:`~loraforge.tagging.runner.tag_images` needs from a model."""

    description: str

    def prepare(self, image: Image.Image) -> Any:
        """Per-image preprocessing (thread-safe, no model call)."""
        ...

    def annotate(self, prepared: Sequence[Any]) -> list[list[str]]:
        """Caption items for each prepared image, in order."""
        ...


def load_annotator(config: TaggingConfig, suggest_dir: Path | None = None) -> Annotator:
    """Load the tagger or captioner the recipe's tagging section names.

    Args:
        config: the recipe's tagging section (``mode``, ``model``, ``device`` …).
        suggest_dir: where a "cannot download" error suggests putting the model files
            (default ``./models``; the command passes ``<recipe folder>/models``).

    Raises:
        ModelError: the model cannot be found, downloaded or loaded.
        DependencyError: onnxruntime is missing (tagger), or the device is not available.
    """
    from loraforge.tagging import model_source

    if config.mode == "captioner":
        from loraforge.tagging.captioner import CaptionerAnnotator, ImageCaptioner

        folder = model_source.resolve_captioner(config.model, suggest_dir)
        return CaptionerAnnotator(ImageCaptioner(folder, config), config, config.model)
    from loraforge.tagging.onnx_tagger import TaggerAnnotator, Wd14Tagger, import_onnxruntime

    import_onnxruntime()  # a missing optional dependency is reported before any download
    files = model_source.resolve_tagger(config.model, suggest_dir)
    return TaggerAnnotator(Wd14Tagger(files, config.device), config, config.model)
