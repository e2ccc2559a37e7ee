"""The ONNX tagger: model layout, inference against numpy, providers, load errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loraforge.errors import DependencyError, ModelError
from loraforge.tagging import read_selected_tags
from loraforge.tagging.model_source import TaggerFiles, resolve_tagger
from loraforge.tagging.onnx_tagger import Wd14Tagger, execution_providers


def load(folder: Path) -> Wd14Tagger:
    return Wd14Tagger(resolve_tagger(str(folder)), device="cpu")


def test_reads_input_size_and_labels(wd14_dir: Path, kit) -> None:
    tagger = load(wd14_dir)
    assert tagger.input_size == kit.SIZE
    assert tagger.labels.names == tuple(n for n, _, _ in kit.STANDARD_TAGS)
    assert tagger.providers[0] == "CPUExecutionProvider"


def test_predict_matches_numpy_on_independent_input(wd14_dir: Path, kit) -> None:
    rng = np.random.default_rng(7)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        for h, w in [(8, 8), (5, 8), (20, 11)]
    ]
    tagger = load(wd14_dir)
    got = tagger.predict(np.stack([tagger.prepare(im) for im in images]))
    x = np.stack([kit.expected_input(np.asarray(im), kit.SIZE) for im in images])
    np.testing.assert_allclose(got, kit.expected_standard_probs(x), rtol=1e-5, atol=1e-6)


def test_random_weights_see_every_pixel_in_bgr(tmp_path: Path, kit) -> None:
    """Position-dependent weights: any padding offset or channel swap would change the output."""
    size = kit.SIZE
    rng = np.random.default_rng(0)
    weights = rng.normal(0, 0.0005, (size * size * 3, 5))
    bias = rng.normal(0, 0.5, 5)
    kit.write_wd14_model(tmp_path, weights, bias, size)
    kit.write_selected_tags(tmp_path, [(f"t{i}", 0) for i in range(5)])
    pixels = rng.integers(0, 256, (3, 7, 4), dtype=np.uint8)
    pixels[..., 3] = rng.choice([0, 255], (3, 7))
    tagger = load(tmp_path)
    got = tagger.predict(tagger.prepare(Image.fromarray(pixels, "RGBA"))[None])
    x = kit.expected_input(pixels, size).reshape(1, -1).astype(np.float64)
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-(x @ weights + bias))), atol=1e-6)


def test_fixed_batch_model_runs_in_chunks(tmp_path: Path, kit) -> None:
    import onnx

    size = kit.SIZE
    kit.write_wd14_model(tmp_path, np.zeros((size * size * 3, 2)), np.array([0.0, 1.0]), size)
    model = onnx.load(str(tmp_path / "model.onnx"))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2  # fixed batch of 2
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 2
    onnx.save(model, str(tmp_path / "model.onnx"))
    kit.write_selected_tags(tmp_path, [("a", 0), ("b", 0)])
    tagger = load(tmp_path)
    probs = tagger.predict(np.zeros((5, size, size, 3), np.float32))
    assert probs.shape == (5, 2)
    np.testing.assert_allclose(probs[:, 1], 1 / (1 + np.exp(-1.0)), rtol=1e-6)


def test_label_count_must_match_outputs(wd14_dir: Path, kit) -> None:
    kit.write_selected_tags(wd14_dir, [("a", 0)])
    with pytest.raises(ModelError, match="scores 14 tags"):
        load(wd14_dir)


def test_bad_label_header(tmp_path: Path) -> None:
    path = tmp_path / "selected_tags.csv"
    path.write_text("id,tag\n1,a\n", encoding="utf-8")
    with pytest.raises(ModelError, match="expected the header"):
        read_selected_tags(path)


def test_non_wd14_input_shape(tmp_path: Path, kit) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Sigmoid", ["x"], ["y"])],
        "nchw",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 8, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "model.onnx"))
    kit.write_selected_tags(tmp_path, [("a", 0)])
    with pytest.raises(ModelError, match=r"not a WD14 tagger's \[batch, size, size, 3\]"):
        load(tmp_path)


def test_corrupt_model_file(wd14_dir: Path) -> None:
    (wd14_dir / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="onnxruntime cannot load"):
        load(wd14_dir)


def test_missing_onnxruntime_is_a_dependency_error(wd14_dir: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(DependencyError, match="needs onnxruntime") as info:
        Wd14Tagger(TaggerFiles(wd14_dir / "model.onnx", wd14_dir / "selected_tags.csv"))
    assert "loraforge[tag]" in (info.value.hint or "")


def test_execution_providers() -> None:
    cpu, cuda = "CPUExecutionProvider", "CUDAExecutionProvider"
    assert execution_providers([cpu], "auto") == [cpu]
    assert execution_providers([cuda, cpu], "auto") == [cuda, cpu]
    assert execution_providers([cuda, cpu], "cpu") == [cpu]
    with pytest.raises(DependencyError, match="no CUDA provider"):
        execution_providers([cpu], "cuda")
