"""Fixtures for the tagging tests: a tiny WD14-signature ONNX tagger and a tiny BLIP captioner.

The ONNX model computes ``sigmoid(flatten(x) @ W + b)`` for an NHWC float32 input ``x`` of
shape ``[N, S, S, 3]`` (dynamic batch), so every output is a known function of the pixels the
model receives. The standard tagger below uses channel-mean weights: tag ``blue_hair`` reacts to
the mean of input channel 0 (blue, since WD14 inputs are BGR), ``red_theme`` to channel 2; the
other tags have fixed probabilities set by their bias.
"""

from __future__ import annotations

import csv
import os
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZE = 8  # the fixture tagger's input side

# (name, category, fixed probability or a channel the tag reacts to)
STANDARD_TAGS: list[tuple[str, int, float | str]] = [
    ("general", 9, 0.70),
    ("sensitive", 9, 0.20),
    ("questionable", 9, 0.05),
    ("explicit", 9, 0.01),
    ("1girl", 0, 0.95),
    ("long_hair", 0, 0.60),
    ("blue_hair", 0, "B"),
    ("red_theme", 0, "R"),
    ("^_^", 0, 0.50),
    ("smile", 0, 0.34),
    ("looking_at_viewer", 0, 0.36),
    ("hatsune_miku", 4, 0.80),
    ("kagamine_rin", 4, 0.40),
    ("vocaloid", 3, 0.99),  # copyright: a category taggers ignore
]
CHANNEL_SLOPE = 10.0  # logit = 10 * (mean_channel / 255 - 0.5)


def logit(p: float) -> float:
    return float(np.log(p / (1.0 - p)))


def write_wd14_model(folder: Path, weights: np.ndarray, bias: np.ndarray, size: int) -> Path:
    """Write ``model.onnx``: ``sigmoid(reshape(x, [-1, S*S*3]) @ weights + bias)``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    features = size * size * 3
    assert weights.shape == (features, bias.shape[0])
    graph = helper.make_graph(
        nodes=[
            helper.make_node("Reshape", ["input_1", "flat_shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "W"], ["logits_nb"]),
            helper.make_node("Add", ["logits_nb", "b"], ["logits"]),
            helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
        ],
        name="tiny_wd14",
        inputs=[helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["N", size, size, 3])],
        outputs=[
            helper.make_tensor_value_info(
                "predictions_sigmoid", TensorProto.FLOAT, ["N", bias.shape[0]]
            )
        ],
        initializer=[
            numpy_helper.from_array(np.array([-1, features], dtype=np.int64), "flat_shape"),
            numpy_helper.from_array(weights.astype(np.float32), "W"),
            numpy_helper.from_array(bias.astype(np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    return path


def write_selected_tags(folder: Path, tags: list[tuple[str, int]]) -> Path:
    path = folder / "selected_tags.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["tag_id", "name", "category", "count"])
        for i, (name, category) in enumerate(tags):
            writer.writerow([1000 + i, name, category, 500 - i])
    return path


def standard_weights(size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Weights/bias of the standard tagger (see the module docstring)."""
    pixels = size * size
    weights = np.zeros((pixels * 3, len(STANDARD_TAGS)), dtype=np.float64)
    bias = np.zeros(len(STANDARD_TAGS), dtype=np.float64)
    channel_index = {"B": 0, "G": 1, "R": 2}
    for t, (_, _, rule) in enumerate(STANDARD_TAGS):
        if isinstance(rule, str):
            # mean over pixels of channel c, scaled: sum(x[..., c]) * slope / (255 * pixels)
            weights[channel_index[rule] :: 3, t] = CHANNEL_SLOPE / (255.0 * pixels)
            bias[t] = -CHANNEL_SLOPE / 2
        else:
            bias[t] = logit(rule)
    return weights, bias


def expected_standard_probs(x: np.ndarray) -> np.ndarray:
    """Independent numpy evaluation of the standard tagger on input ``x`` ``[N, S, S, 3]``."""
    weights, bias = standard_weights(x.shape[1])
    flat = x.reshape(x.shape[0], -1).astype(np.float64)
    return 1.0 / (1.0 + np.exp(-(flat @ weights + bias)))


def expected_input(pixels: np.ndarray, size: int) -> np.ndarray:
    """Independent reference of WD14 preprocessing: alpha over white, centred white square,
    bicubic resize when the side differs, BGR, float32. ``pixels``: ``HxWx3|4`` uint8 RGB(A).
    """
    from PIL import Image

    rgb = pixels[..., :3].astype(np.float64)
    if pixels.shape[2] == 4:
        alpha = pixels[..., 3:4].astype(np.float64) / 255.0
        rgb = rgb * alpha + 255.0 * (1.0 - alpha)
    h, w = rgb.shape[:2]
    side = max(h, w)
    canvas = np.full((side, side, 3), 255.0)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top : top + h, left : left + w] = rgb
    if side != size:
        # The reference resizes the padded square with PIL's bicubic filter.
        square = Image.fromarray(np.round(canvas).astype(np.uint8), "RGB")
        canvas = np.asarray(square.resize((size, size), Image.Resampling.BICUBIC), np.float64)
    return canvas[:, :, ::-1].astype(np.float32)


@pytest.fixture(scope="session")
def kit() -> SimpleNamespace:
    """The helpers above for test modules (tests are not importable packages here)."""
    return SimpleNamespace(
        SIZE=SIZE,
        STANDARD_TAGS=STANDARD_TAGS,
        expected_input=expected_input,
        expected_standard_probs=expected_standard_probs,
        write_wd14_model=write_wd14_model,
        write_selected_tags=write_selected_tags,
        standard_weights=standard_weights,
    )


@pytest.fixture
def wd14_dir(tmp_path: Path) -> Path:
    """A WD14-format tagger folder (model.onnx + selected_tags.csv) with the standard tags."""
    folder = tmp_path / "tiny-tagger"
    weights, bias = standard_weights()
    write_wd14_model(folder, weights, bias, SIZE)
    write_selected_tags(folder, [(n, c) for n, c, _ in STANDARD_TAGS])
    return folder


@pytest.fixture(scope="session")
def base_tagging():
    """The schema defaults of the tagging section, from a parsed minimal recipe."""
    from loraforge.recipe import parse_recipe_text

    recipe = parse_recipe_text(
        "model:\n  base: some/model\ndataset:\n  subsets:\n    - dir: images\n",
        base_dir=Path("/nonexistent-base"),
    )
    return recipe.tagging


@pytest.fixture
def tagging_config(base_tagging, wd14_dir):
    """``make(**overrides)`` -> TaggingConfig using the fixture tagger on the CPU."""

    def make(**overrides):
        fields = {"model": str(wd14_dir), "device": "cpu", **overrides}
        return replace(base_tagging, **fields)

    return make


BLIP_WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "[DEC]",
    "a",
    "photo",
    "of",
    "cat",
    "dog",
    "red",
    "blue",
    "girl",
    "with",
    "hair",
    "the",
    "on",
    "table",
    "sitting",
]


@pytest.fixture(scope="session")
def blip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BLIP captioner saved with save_pretrained (safetensors, processor, tokenizer).

    Random weights, but the LM-head bias strongly prefers word tokens over special ones so the
    captions are non-empty words.
    """
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_blip import BlipImageProcessor

    folder = tmp_path_factory.mktemp("tiny-blip")
    vocab = folder / "vocab_src.txt"
    vocab.write_text("\n".join(BLIP_WORDS) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer(str(vocab), bos_token="[DEC]")
    config = BlipConfig(
        text_config={
            "vocab_size": len(BLIP_WORDS),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
            "bos_token_id": 5,
            "pad_token_id": 0,
            "sep_token_id": 3,
            "eos_token_id": 3,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 16,
            "patch_size": 8,
        },
        projection_dim=32,
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    with torch.no_grad():
        head_bias = model.text_decoder.cls.predictions.bias
        head_bias[:6] = -20.0
        head_bias[6:] = torch.linspace(0.0, 1.0, len(BLIP_WORDS) - 6)
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 16, "width": 16}), tokenizer=tokenizer
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    vocab.unlink()
    return folder


GIT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "red"]


@pytest.fixture(scope="session")
def git_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GIT captioner (decoder-only text model) saved with save_pretrained."""
    import torch
    from transformers import (
        BertTokenizer,
        CLIPImageProcessor,
        GitConfig,
        GitForCausalLM,
        GitProcessor,
    )

    folder = tmp_path_factory.mktemp("tiny-git")
    vocab = folder / "vocab_src.txt"
    vocab.write_text("\n".join(GIT_WORDS) + "\n", encoding="utf-8")
    config = GitConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 16,
            "patch_size": 8,
        },
        vocab_size=len(GIT_WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    torch.manual_seed(1)
    model = GitForCausalLM(config)
    processor = GitProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
        ),
        tokenizer=BertTokenizer(str(vocab)),
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    vocab.unlink()
    return folder
