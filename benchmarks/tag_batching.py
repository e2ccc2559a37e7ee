"""Tagging throughput: batched inference vs one image at a time, as a ratio measured in one run.

A synthetic WD14-signature ONNX model of moderate size is written to a temporary folder
(NHWC ``[N, S, S, 3]`` input with a dynamic batch, three strided convolutions, global pooling,
a 1024-wide hidden layer and ``--tags`` sigmoid outputs, like a real tagger's head), together
with a matching ``selected_tags.csv`` and synthetic images. Two measurements:

- model: :meth:`Wd14Tagger.predict` on preprocessed inputs (what batching changes);
- end to end: :func:`loraforge.tagging.run_tagging` (decode, preprocess, infer, write captions).

Run:  python benchmarks/tag_batching.py [--images 64] [--batch-size 16] [--size 448]
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def build_model(folder: Path, size: int, tags: int, seed: int = 0) -> None:
    """Write ``model.onnx`` and ``selected_tags.csv`` for a moderately sized synthetic tagger."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def init(name: str, *shape: int, scale: float) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.normal(0, scale, shape).astype(np.float32), name)

    channels = [3, 32, 64, 128]
    nodes = [helper.make_node("Transpose", ["input_1"], ["x0"], perm=[0, 3, 1, 2])]
    inits = []
    for i in range(3):
        nodes.append(
            helper.make_node(
                "Conv",
                [f"x{i}", f"w{i}"],
                [f"c{i}"],
                kernel_shape=[3, 3],
                strides=[2, 2],
                pads=[1, 1, 1, 1],
            )
        )
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"x{i + 1}"]))
        inits.append(init(f"w{i}", channels[i + 1], channels[i], 3, 3, scale=0.01))
    nodes += [
        helper.make_node("GlobalAveragePool", ["x3"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["feat"]),
        helper.make_node("MatMul", ["feat", "h_w"], ["h"]),
        helper.make_node("Relu", ["h"], ["h_relu"]),
        helper.make_node("MatMul", ["h_relu", "out_w"], ["logits_nb"]),
        helper.make_node("Add", ["logits_nb", "out_b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
    ]
    # Most tags far below any threshold, a few dozen above, as with a real tagger's output.
    out_b = np.full(tags, -8.0, dtype=np.float32)
    out_b[rng.choice(tags, 40, replace=False)] = 4.0
    inits += [
        init("h_w", 128, 1024, scale=0.05),
        init("out_w", 1024, tags, scale=0.05),
        numpy_helper.from_array(out_b, "out_b"),
    ]
    graph = helper.make_graph(
        nodes,
        "synthetic_wd14",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["N", size, size, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["N", tags])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(folder / "model.onnx"))
    with (folder / "selected_tags.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["tag_id", "name", "category", "count"])
        for i in range(tags):
            category = 9 if i < 4 else (4 if i >= tags - tags // 10 else 0)
            writer.writerow([i, f"tag_{i}", category, tags - i])


def write_images(folder: Path, count: int, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        h, w = int(rng.integers(384, 768)), int(rng.integers(384, 768))
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(folder / f"img_{i:04d}.jpg", quality=90)


def time_model(tagger, inputs: np.ndarray, batch_size: int, repeats: int) -> float:
    """Best images/s over ``repeats`` passes through ``inputs`` in batches of ``batch_size``."""
    tagger.predict(inputs[:batch_size])  # warm-up (allocations, kernel selection)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(inputs), batch_size):
            tagger.predict(inputs[i : i + batch_size])
        best = max(best, len(inputs) / (time.perf_counter() - start))
    return best


def time_end_to_end(folder: Path, config, batch_size: int) -> float:
    from rich.console import Console

    from loraforge.tagging import folder_from_path, load_annotator, run_tagging

    annotator = load_annotator(config)
    selection = folder_from_path(folder)
    result = run_tagging(
        selection.folders,
        annotator,
        config,
        console=Console(stderr=True, quiet=True),
        existing="overwrite",
        batch_size=batch_size,
        show_progress=False,
    )
    return result.images_per_second


def tagging_config(model_dir: Path, device: str):
    from loraforge.recipe import parse_recipe_text

    recipe = parse_recipe_text(
        "model:\n  base: a/b\ndataset:\n  subsets:\n    - dir: d\n", base_dir=model_dir
    )
    return replace(recipe.tagging, model=str(model_dir), device=device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=448, help="model input side")
    parser.add_argument("--tags", type=int, default=9000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    args = parser.parse_args(argv)

    from PIL import Image

    from loraforge.tagging.model_source import resolve_tagger
    from loraforge.tagging.onnx_tagger import Wd14Tagger

    with tempfile.TemporaryDirectory(prefix="lf-tagbench-") as tmp:
        root = Path(tmp)
        build_model(root, args.size, args.tags)
        write_images(root / "images", args.images)
        tagger = Wd14Tagger(resolve_tagger(str(root)), device=args.device)
        images = sorted((root / "images").glob("*.jpg"))
        inputs = np.stack([tagger.prepare(Image.open(p)) for p in images])
        one = time_model(tagger, inputs, 1, args.repeats)
        batched = time_model(tagger, inputs, args.batch_size, args.repeats)
        print(f"device: {tagger.providers[0]}, input {args.size}px, {args.tags} tags")
        print(f"model only: 1 image/batch {one:.1f} img/s, ")
        print(f"            {args.batch_size} images/batch {batched:.1f} img/s")
        print(f"model only ratio (batched / one at a time): {batched / one:.2f}x")
        config = tagging_config(root, args.device)
        e2e_one = time_end_to_end(root / "images", config, 1)
        e2e_batched = time_end_to_end(root / "images", config, args.batch_size)
        print(f"end to end: 1 image/batch {e2e_one:.1f} img/s, ")
        print(f"            {args.batch_size} images/batch {e2e_batched:.1f} img/s")
        print(f"end to end ratio (batched / one at a time): {e2e_batched / e2e_one:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
