"""Held-out validation images: which images, that they are never trained on, the bucket listing
and the dataset check."""

from __future__ import annotations

import json
import random
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from loraforge.cli import app
from loraforge.data.buckets import BucketSettings
from loraforge.data.checks import check_dataset
from loraforge.data.discovery import discover
from loraforge.data.holdout import held_out_count
from loraforge.data.plan import plan_buckets


def _folder(root: Path, write_image, count: int, size=(64, 64)) -> Path:
    for i in range(count):
        write_image(root / f"img{i:02d}.png", size)
    return root


def _expected_held_out(names: list[str], split: float, seed: int, subset_index: int) -> set[str]:
    """Written from the rule: shuffle the file-ordered names with Random("seed:index") and
    hold out the last round(n * split)."""
    order = list(range(len(names)))
    random.Random(f"{seed}:{subset_index}").shuffle(order)
    count = round(len(names) * split)
    return {names[i] for i in order[len(names) - count :]}


def test_split_holds_out_a_seeded_share_of_each_subset_and_never_trains_on_it(
    tmp_path, write_image, subset_config, dataset_config
) -> None:
    a = _folder(tmp_path / "a", write_image, 10)
    b = _folder(tmp_path / "b", write_image, 5)
    reg = _folder(tmp_path / "reg", write_image, 4)
    dataset = dataset_config(
        subset_config(a),
        subset_config(b),
        subset_config(reg, is_reg=True),
        validation_split=0.25,
        validation_seed=3,
    )
    found = discover(dataset)
    held = {(r.subset, r.path.name) for r in found.validation}
    names = [f"img{i:02d}.png" for i in range(10)]
    expected = {(0, n) for n in _expected_held_out(names, 0.25, 3, 0)}
    expected |= {(1, n) for n in _expected_held_out(names[:5], 0.25, 3, 1)}
    assert held == expected and len(held) == 2 + 1  # round(2.5) = 2 (to even), round(1.25) = 1
    trained = {(r.subset, r.path.name) for r in found.images}
    assert not held & trained
    assert found.num_train_images == 15 - 3
    assert not any(r.is_reg for r in found.validation)  # reg images are never held out
    # the same seed gives the same images; another seed others
    assert {(r.subset, r.path.name) for r in discover(dataset).validation} == held
    other = dataset_config(*dataset.subsets, validation_split=0.25, validation_seed=4)
    assert {(r.subset, r.path.name) for r in discover(other).validation} != held


@given(st.integers(min_value=1, max_value=60), st.floats(min_value=0.0, max_value=0.99))
def test_held_out_count_is_sd_scripts_rounding(n: int, split: float) -> None:
    assert held_out_count(n, split) == round(n * split)


def test_is_validation_subset_is_held_out_whole_and_bucketed(
    tmp_path, write_image, subset_config, dataset_config
) -> None:
    train = _folder(tmp_path / "train", write_image, 3)
    val = _folder(tmp_path / "val", write_image, 2, size=(96, 64))
    dataset = dataset_config(
        subset_config(train),
        subset_config(val, is_validation=True),
        resolution=(64, 64),
        min_bucket_reso=64,
        max_bucket_reso=128,
    )
    found = discover(dataset)
    assert [r.path.parent.name for r in found.validation] == ["val", "val"]
    assert {r.path.parent.name for r in found.images} == {"train"}
    plan = plan_buckets(found, BucketSettings.from_dataset(dataset))
    assert len(plan.validation) == 2 and plan.num_samples == 3
    assert all(p.assignment.bucket == (64, 64) for p in plan.validation)
    assert sorted(i for b in plan.buckets for i in b.images) == [0, 1, 2]  # training only
    # the validation folder is used, so the check does not call it empty
    assert not [p for p in check_dataset(dataset) if "no usable images" in p.message]


def test_check_reports_validation_without_a_held_out_image(
    tmp_path, write_image, subset_config, dataset_config
) -> None:
    folder = _folder(tmp_path / "a", write_image, 4)
    dataset = dataset_config(subset_config(folder), validation_split=0.1)  # round(0.4) = 0
    [problem] = [p for p in check_dataset(dataset) if p.severity == "error"]
    assert problem.severity == "error" and problem.path == "dataset.validation_split"
    assert "no image is held out" in problem.message


def test_bucket_lists_the_held_out_images(tmp_path, write_image) -> None:
    folder = _folder(tmp_path / "data" / "1_thing", write_image, 4)
    (tmp_path / "recipe.yaml").write_text(
        "model: {base: some/model}\n"
        "dataset: {resolution: 64, min_bucket_reso: 64, max_bucket_reso: 128, "
        "validation_split: 0.5, subsets: [{dir: data}]}\n",
        encoding="utf-8",
    )
    runner = CliRunner()
    result = runner.invoke(app, ["bucket", str(tmp_path / "recipe.yaml"), "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    held = {Path(item["path"]).name for item in report["validation"]}
    trained = {Path(item["path"]).name for item in report["images"]}
    assert len(held) == 2 and report["totals"]["validation_images"] == 2
    assert not held & trained and len(trained) == 2
    table = runner.invoke(app, ["bucket", str(tmp_path / "recipe.yaml")])
    assert "held out for validation (2 images" in table.stdout
    for name in held:
        assert name in table.stdout
    assert folder.is_dir()
