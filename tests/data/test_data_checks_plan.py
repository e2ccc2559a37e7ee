"""check_dataset findings, the bucket plan, metadata helpers, and recipe defaults."""

from __future__ import annotations

from pathlib import Path

from loraforge.data.buckets import BucketSettings
from loraforge.data.checks import check_dataset
from loraforge.data.dataset_facts import bucket_info, tag_frequency
from loraforge.data.discovery import discover
from loraforge.data.plan import plan_buckets
from loraforge.recipe import parse_recipe_text


def test_recipe_defaults_match_the_test_configs(tmp_path, subset_config, dataset_config) -> None:
    text = f"model:\n  base: x\ndataset:\n  subsets:\n    - dir: {tmp_path}\n"
    recipe = parse_recipe_text(text, base_dir=tmp_path)
    built = dataset_config(subset_config(tmp_path), num_workers=recipe.dataset.num_workers)
    assert recipe.dataset == built


def test_check_reports_everything_at_once(tmp_path, write_image, subset_config, dataset_config):
    good = tmp_path / "5_good"
    write_image(good / "a.png", (64, 64))
    (good / "broken.png").write_bytes(b"")
    (good / "latin.txt").write_bytes(b"caf\xe9")
    write_image(good / "latin.png", (64, 64))
    empty = tmp_path / "empty"
    empty.mkdir()
    config = dataset_config(
        subset_config(good), subset_config(tmp_path / "missing"), subset_config(empty)
    )
    problems = check_dataset(config)
    errors = [p for p in problems if p.severity == "error"]
    warnings = [p for p in problems if p.severity == "warning"]
    # a missing folder stops training; an empty subset beside a usable one is ignored by it
    assert [p.path for p in errors] == ["dataset.subsets[1].dir"]
    assert "does not exist" in errors[0].message
    empty_subset = [p for p in warnings if p.path == "dataset.subsets[2].dir"]
    assert len(empty_subset) == 1 and "no usable images" in empty_subset[0].message
    assert problems[: len(errors)] == errors  # errors first
    text = "\n".join(p.message for p in warnings)
    assert "broken.png: empty file" in text
    assert "latin.txt" in text and "not UTF-8" in text
    # the empty folder is reported once, not again by discovery's own note about it
    assert sum(str(empty) in p.message for p in problems) == 1


def test_check_without_reading_files_keeps_the_bucket_settings(
    tmp_path, subset_config, dataset_config
):
    missing = dataset_config(subset_config(tmp_path / "todo"))
    assert [p.severity for p in check_dataset(missing)] == ["error"]
    assert check_dataset(missing, read_files=False) == []
    bad = dataset_config(subset_config(tmp_path / "todo"), max_bucket_reso=256)
    assert [p.path for p in check_dataset(bad, read_files=False)] == ["dataset"]


def test_check_clean_dataset_and_bad_bucket_settings(
    tmp_path, write_image, subset_config, dataset_config
):
    write_image(tmp_path / "1_x" / "a.png", (64, 64))
    (tmp_path / "1_x" / "a.txt").write_text("caption")
    assert check_dataset(dataset_config(subset_config(tmp_path / "1_x"))) == []
    bad = check_dataset(dataset_config(subset_config(tmp_path / "1_x"), max_bucket_reso=256))
    # said once (it used to come again from bucketing the images)
    assert [p.severity for p in bad] == ["error"] and "bucket range" in bad[0].message


def test_check_empty_dataset_is_one_error(tmp_path, subset_config, dataset_config):
    (tmp_path / "a").mkdir()
    problems = check_dataset(dataset_config(subset_config(tmp_path / "a")))
    assert [p.severity for p in problems] == ["error"]
    assert "no usable training images" in problems[0].message


def test_plan_groups_counts_and_steps(tmp_path, write_image, subset_config, dataset_config):
    for i, size in enumerate([(1000, 750), (990, 740), (750, 1000), (512, 512)]):
        write_image(tmp_path / "3_a" / f"{i}.png", size)
    write_image(tmp_path / "2_b" / "x.png", (1000, 750))
    config = dataset_config(subset_config(tmp_path / "3_a"), subset_config(tmp_path / "2_b"))
    found = discover(config)
    plan = plan_buckets(found, BucketSettings.from_dataset(config))
    counts = {b.resolution: (len(b.images), b.samples) for b in plan.buckets}
    assert counts == {(448, 576): (1, 3), (512, 512): (1, 3), (576, 448): (3, 8)}
    assert plan.num_samples == 14
    # batch 2: ceil(3/2) + ceil(3/2) + ceil(8/2) = 8 batches; accumulation 3 -> 3 steps.
    assert plan.batches_per_epoch(2) == 8 and plan.steps_per_epoch(2, 3) == 3
    samples = plan.bucket_samples()
    assert [len(s) for s in samples] == [3, 3, 8]
    assert all(s.count(i) == plan.images[i].record.repeats for s in samples for i in set(s))


def test_plan_skips_images_too_small_for_no_upscale(
    tmp_path, write_image, subset_config, dataset_config
):
    write_image(tmp_path / "1_x" / "ok.png", (300, 200))
    write_image(tmp_path / "1_x" / "thin.png", (40, 300))
    config = dataset_config(subset_config(tmp_path / "1_x"), bucket_no_upscale=True)
    plan = plan_buckets(discover(config), BucketSettings.from_dataset(config))
    assert [p.record.path.name for p in plan.images] == ["ok.png"]
    assert plan.images[0].assignment.bucket == (256, 192)
    assert [Path(s.path).name for s in plan.skipped] == ["thin.png"]
    assert "bucket_reso_steps" in plan.skipped[0].reason


def test_metadata_like_sd_scripts(tmp_path, write_image, subset_config, dataset_config):
    folder = tmp_path / "4_sks cat"
    for name, caption in [("a", "sks, Cat, sitting"), ("b", "sks, cat"), ("c", None)]:
        write_image(folder / f"{name}.png", (64, 64))
        if caption:
            (folder / f"{name}.txt").write_text(caption)
    config = dataset_config(subset_config(folder))
    found = discover(config)
    assert tag_frequency(found) == {"4_sks cat": {"sks": 2, "cat": 2, "sitting": 1, "sks cat": 1}}
    info = bucket_info(plan_buckets(found, BucketSettings.from_dataset(config)))
    assert info["buckets"] == {"0": {"resolution": [512, 512], "count": 12}}
    assert info["mean_img_ar_error"] == 0.0
