"""The torch Dataset and DataLoader: pixels, crops, flips, colour, loss weights, workers, resume."""

from __future__ import annotations

import colorsys
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from loraforge.data.buckets import BucketSettings
from loraforge.data.dataset import BucketDataset, build_training_data, collate_samples
from loraforge.data.discovery import discover
from loraforge.data.plan import plan_buckets
from loraforge.data.sampler import SampleRef
from loraforge.data.transforms import color_augment, hue_shift

# Buckets for 64x64, sides 32..128, step 32: (32,96) (32,128) (64,64) (96,32) (128,32).
SMALL = dict(resolution=(64, 64), min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32)


def ramp_image(path: Path, width: int, height: int) -> Path:
    """Red = 3 * column, green = 2 * row, blue = 50: crops and flips are visible in the pixels."""
    x = np.arange(width, dtype=np.uint8)[None, :] * 3
    y = np.arange(height, dtype=np.uint8)[:, None] * 2
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = x
    pixels[..., 1] = y
    pixels[..., 2] = 50
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def make_dataset(tmp_path, subset_config, dataset_config, prior=1.0, reg=False, **subset_options):
    folder = tmp_path / "2_thing"
    ramp_image(folder / "wide.png", 80, 64)  # bucket 64x64, resized 80x64: 16 px to crop
    (folder / "wide.txt").write_text("sks, a, b, c, d")
    subsets = [subset_config(folder, **subset_options)]
    if reg:
        reg_dir = tmp_path / "1_reg"
        ramp_image(reg_dir / "r.png", 64, 64)
        subsets.append(subset_config(reg_dir, is_reg=True))
    config = dataset_config(*subsets, **SMALL)
    found = discover(config)
    plan = plan_buckets(found, BucketSettings.from_dataset(config))
    return BucketDataset(plan, found.subsets, prior_loss_weight=prior), config


def red_row(item) -> np.ndarray:
    """The red channel of the first row, back in 0-255."""
    return np.rint((item["image"][0, 0].numpy() + 1.0) * 127.5).astype(int)


def test_item_pixels_centre_crop_and_sizes(tmp_path, subset_config, dataset_config) -> None:
    dataset, _ = make_dataset(tmp_path, subset_config, dataset_config)
    item = dataset[0]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1.0 and item["image"].max() <= 1.0
    # Independent: 80x64 into 64x64 needs no resize; centre crop drops 8 columns on each side.
    assert list(red_row(item)) == [3 * (8 + c) for c in range(64)]
    blue = item["image"][2]
    assert torch.allclose(blue, torch.full_like(blue, 50 / 127.5 - 1.0))
    assert item["original_size_hw"] == (64, 80)
    assert item["target_size_hw"] == (64, 64)
    assert item["crop_top_left"] == (0, 8)
    assert item["caption"] == "sks, a, b, c, d"
    assert item["loss_weight"] == 1.0 and item["flipped"] is False
    assert item["key"] == str(tmp_path / "2_thing" / "wide.png")


def test_random_crop_matches_reported_offset(tmp_path, subset_config, dataset_config) -> None:
    dataset, _ = make_dataset(tmp_path, subset_config, dataset_config, random_crop=True)
    lefts = set()
    for seed in range(40):
        item = dataset[SampleRef(0, 0, seed)]
        top, left = item["crop_top_left"]
        assert top == 0 and 0 <= left <= 16
        assert list(red_row(item)) == [3 * (left + c) for c in range(64)]
        lefts.add(left)
    assert len(lefts) > 5


def test_flip_mirrors_pixels_and_crop_offset(tmp_path, subset_config, dataset_config) -> None:
    dataset, _ = make_dataset(tmp_path, subset_config, dataset_config, flip_aug=True)
    flips = 0
    for seed in range(40):
        item = dataset[SampleRef(0, 0, seed)]
        if item["flipped"]:
            flips += 1
            # Mirrored resized image: column c shows original column 79 - c; crop starts at 8.
            assert list(red_row(item)) == [3 * (79 - 8 - c) for c in range(64)]
            assert item["crop_top_left"] == (0, 16 - 8)
        else:
            assert red_row(item)[0] == 24
    assert 8 < flips < 32


def test_colour_augmentation_changes_some_samples(tmp_path, subset_config, dataset_config) -> None:
    plain, _ = make_dataset(tmp_path, subset_config, dataset_config)
    reference = plain[0]["image"]
    augmented, _ = make_dataset(tmp_path, subset_config, dataset_config, color_aug=True)
    changed = sum(
        not torch.equal(augmented[SampleRef(0, 0, s)]["image"], reference) for s in range(60)
    )
    assert 8 < changed < 35  # sd-scripts augments with probability 0.33


def test_hue_shift_matches_colorsys() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    for shift in (0.0, 0.03, -0.04, 0.5):
        got = hue_shift(pixels, shift).astype(int)
        for y, x in [(0, 0), (3, 7), (15, 15), (8, 2)]:
            h, s, v = colorsys.rgb_to_hsv(*(pixels[y, x] / 255.0))
            expected = np.array(colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)) * 255.0
            assert np.all(np.abs(got[y, x] - expected) <= 1.0)
    grey = np.full((2, 2, 3), 77, dtype=np.uint8)
    assert np.array_equal(hue_shift(grey, 0.2), grey)


def test_color_augment_is_seeded_and_bounded() -> None:
    pixels = np.random.default_rng(1).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    for seed in range(30):
        a = color_augment(pixels, random.Random(seed))
        assert np.array_equal(a, color_augment(pixels, random.Random(seed)))
        assert a.dtype == np.uint8 and a.shape == pixels.shape


def test_reg_images_get_the_prior_loss_weight(tmp_path, subset_config, dataset_config) -> None:
    dataset, _ = make_dataset(tmp_path, subset_config, dataset_config, prior=0.25, reg=True)
    weights = {dataset[i]["key"].split("/")[-1]: dataset[i]["loss_weight"] for i in range(2)}
    assert weights == {"wide.png": 1.0, "r.png": 0.25}
    batch = collate_samples([dataset[0], dataset[1]])
    assert batch["images"].shape == (2, 3, 64, 64)
    assert batch["loss_weights"].tolist() == [1.0, 0.25]
    assert batch["is_reg"] == [False, True]
    assert batch["original_sizes_hw"].tolist() == [[64, 80], [64, 64]]


def test_captions_are_processed_per_sample(tmp_path, subset_config, dataset_config) -> None:
    dataset, _ = make_dataset(
        tmp_path, subset_config, dataset_config, shuffle_caption=True, keep_tokens=1
    )
    captions = {dataset[SampleRef(0, 0, s)]["caption"] for s in range(30)}
    assert len(captions) > 5 and all(c.startswith("sks, ") for c in captions)


def _write_mixed(folder: Path, count: int) -> None:
    sizes = [(80, 64), (64, 64), (40, 120), (130, 40), (64, 80)]
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        ramp_image(folder / f"{i:02d}.png", w, h)
        (folder / f"{i:02d}.txt").write_text(f"sks, tag{i}, other, more")


def _fingerprint(loader):
    return [
        (
            tuple(b["keys"]),
            tuple(b["captions"]),
            b["crop_top_lefts"].tolist(),
            b["images"].sum().item(),
        )
        for b in loader
    ]


def test_loader_with_workers_matches_in_process(tmp_path, subset_config, dataset_config) -> None:
    _write_mixed(tmp_path / "3_mix", 10)
    options = dict(shuffle_caption=True, flip_aug=True, random_crop=True, color_aug=True)
    config = dataset_config(subset_config(tmp_path / "3_mix", **options), **SMALL)
    inline = build_training_data(config, batch_size=4, seed=11, num_workers=0)
    workers = build_training_data(config, batch_size=4, seed=11, num_workers=2)
    for epoch in (0, 1):
        inline.sampler.set_epoch(epoch)
        workers.sampler.set_epoch(epoch)
        a, b = _fingerprint(inline.loader), _fingerprint(workers.loader)
        assert a == b
    assert sum(len(batch[0]) for batch in a) == 30


def test_loader_batches_and_resume(tmp_path, subset_config, dataset_config) -> None:
    _write_mixed(tmp_path / "3_mix", 10)
    config = dataset_config(subset_config(tmp_path / "3_mix", flip_aug=True), **SMALL)
    data = build_training_data(config, batch_size=4, seed=3, num_workers=0)
    data.sampler.set_epoch(1)
    full = _fingerprint(data.loader)
    assert len(full) == len(data.loader) == data.plan.batches_per_epoch(4)
    for batch in data.loader:
        assert len({tuple(t) for t in batch["target_sizes_hw"].tolist()}) == 1
        assert batch["images"].shape[2:] == tuple(batch["target_sizes_hw"][0].tolist())
    data.sampler.skip_batches(2)
    assert _fingerprint(data.loader) == full[2:]


def test_without_images_gives_the_same_captions(tmp_path, subset_config, dataset_config) -> None:
    _write_mixed(tmp_path / "3_mix", 5)
    config = dataset_config(
        subset_config(tmp_path / "3_mix", shuffle_caption=True, flip_aug=True), **SMALL
    )
    with_images = build_training_data(config, batch_size=2, seed=1, num_workers=0)
    without = build_training_data(config, batch_size=2, seed=1, num_workers=0, with_images=False)
    for a, b in zip(with_images.loader, without.loader, strict=True):
        assert "images" not in b
        assert (a["captions"], a["flipped"], a["keys"]) == (b["captions"], b["flipped"], b["keys"])
        assert torch.equal(a["crop_top_lefts"], b["crop_top_lefts"])
