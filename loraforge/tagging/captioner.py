"""Image-to-text captioners (BLIP, BLIP-2, GIT, Florence-2, VisionEncoderDecoder…) via transformers.

The model is whatever ``AutoModelForImageTextToText`` (transformers 5; ``AutoModelForVision2Seq``
in 4.x) loads from the folder, with its ``AutoProcessor``. Remote code is never run and weights
are read from safetensors only. torch and transformers are imported when a captioner is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from loraforge.errors import DependencyError, ModelError
from loraforge.tagging.cleanup import replace_words
from loraforge.tagging.preprocess import composite_on_white

if TYPE_CHECKING:
    from loraforge.recipe.types import TaggingConfig

# Florence-2 does one task per prompt; this one writes a paragraph-length description.
_TASK_PROMPTS = {"florence2": "<DETAILED_CAPTION>"}


def torch_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``.

    Raises:
        DependencyError: ``cuda`` was asked for and torch has no usable CUDA device.
    """
    import torch

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise DependencyError(
            "tagging.device is cuda but torch sees no CUDA device",
            hint="install a CUDA build of torch, or set tagging.device: cpu",
        )
    return "cuda"


def generation_kwargs(config: TaggingConfig) -> dict[str, Any]:
    """``generate()`` arguments from the recipe: beam search, or nucleus sampling with ``top_p``.

    ``max_length`` caps the generated tokens (``max_new_tokens``), so a prompt or a start token
    does not eat into it.
    """
    kwargs: dict[str, Any] = {"max_new_tokens": config.max_length, "num_beams": config.num_beams}
    if config.top_p is not None:
        kwargs.update(do_sample=True, top_p=config.top_p, top_k=0)
    else:
        kwargs["do_sample"] = False
    return kwargs


class ImageCaptioner:
    """A loaded image-to-text model that writes one caption per image.

    Args:
        folder: a transformers model folder (see
            :func:`~loraforge.tagging.model_source.resolve_captioner`).
        config: the recipe's tagging section (device, max_length, num_beams, top_p, seed).

    Raises:
        ModelError: the folder does not hold a model transformers can load as image-to-text.
        DependencyError: CUDA was asked for but is not available.
    """

    def __init__(self, folder: Path, config: TaggingConfig) -> None:
        import torch

        self.device = torch_device(config.device)
        self._processor, self._model = _load(folder)
        self._model.to(self.device).eval()
        self._tokenizer = getattr(self._processor, "tokenizer", None) or self._processor
        self._prompt = _TASK_PROMPTS.get(getattr(self._model.config, "model_type", ""))
        self._generate = generation_kwargs(config)
        # One seed for the run: sampled captions are reproducible for the same images and batching.
        torch.manual_seed(config.seed)

    def prepare(self, image: Image.Image) -> Image.Image:
        return composite_on_white(image)

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        """One caption per image (batched ``generate``), stripped."""
        import torch

        if not images:
            return []
        inputs = self._inputs(list(images))
        with torch.inference_mode():
            ids = self._model.generate(**inputs, **self._generate)
        prompt_ids = inputs.get("input_ids")
        if prompt_ids is not None and not self._model.config.is_encoder_decoder:
            ids = ids[:, prompt_ids.shape[1] :]  # decoder-only models echo the prompt
        texts = self._tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]

    def _inputs(self, images: list[Image.Image]) -> dict[str, Any]:
        import torch

        if self._prompt is not None:
            batch = self._processor(
                text=[self._prompt] * len(images), images=images, return_tensors="pt"
            )
        else:
            batch = self._processor(images=images, return_tensors="pt")
        dtype = next(self._model.parameters()).dtype
        return {
            k: (v.to(self.device, dtype) if torch.is_floating_point(v) else v.to(self.device))
            for k, v in batch.items()
            if isinstance(v, torch.Tensor)
        }


class CaptionerAnnotator:
    """Adapts :class:`ImageCaptioner` to the runner: one item (the sentence) per image."""

    def __init__(self, captioner: ImageCaptioner, config: TaggingConfig, name: str) -> None:
        self.captioner = captioner
        self.config = config
        self.description = f"{name} (captioner, {captioner.device})"

    def prepare(self, image: Image.Image) -> Image.Image:
        return self.captioner.prepare(image)

    def annotate(self, prepared: Sequence[Image.Image]) -> list[list[str]]:
        texts = self.captioner.caption(prepared)
        if self.config.replace_tags:
            texts = [replace_words(t, self.config.replace_tags) for t in texts]
        return [[t] if t else [] for t in texts]


def _load(folder: Path) -> tuple[Any, Any]:
    import transformers

    auto_model = (
        getattr(transformers, "AutoModelForImageTextToText", None)
        or transformers.AutoModelForVision2Seq
    )
    from loraforge.models.quiet import no_hf_progress_bars

    try:
        with no_hf_progress_bars():
            processor = transformers.AutoProcessor.from_pretrained(str(folder))
            model = auto_model.from_pretrained(str(folder), use_safetensors=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(
            f"{folder}: transformers cannot load an image-to-text model and processor "
            f"({_first_line(e)})",
            hint="use a BLIP, BLIP-2, GIT, Florence-2 or VisionEncoderDecoder model folder with "
            "safetensors weights and its processor files",
        ) from e
    if not hasattr(processor, "batch_decode") and not hasattr(processor, "tokenizer"):
        processor = _with_tokenizer(folder, processor)
    return processor, model


def _with_tokenizer(folder: Path, image_processor: Any) -> Any:
    """VisionEncoderDecoder folders may yield a bare image processor; pair it with the tokenizer."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))

    class _Pair:
        def __call__(self, images: Any, return_tensors: str = "pt", **_: Any) -> Any:
            return image_processor(images=images, return_tensors=return_tensors)

        def batch_decode(self, ids: Any, **kwargs: Any) -> list[str]:
            return tokenizer.batch_decode(ids, **kwargs)

    return _Pair()


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__
