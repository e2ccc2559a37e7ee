"""Loss masks: found by file name, cut exactly like the pixels (resize, crop, flip), averaged
down to latent pixels, and the masked loss against a hand computation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loraforge.data.buckets import BucketSettings
from loraforge.data.dataset import BucketDataset, collate_samples, masks_to_size
from loraforge.data.discovery import discover
from loraforge.data.masks import require_masks
from loraforge.data.plan import plan_buckets
from loraforge.data.sampler import SampleRef
from loraforge.errors import DatasetError

# Buckets for 64x64, sides 32..128, step 32: 100x70 goes to 64x64 resized 91x64 (box filter,
# 27 columns to crop), 50x40 to 64x64 resized 80x64 (Lanczos, 16 columns to crop).
SMALL = dict(resolution=(64, 64), min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32)
SIZES = {"big": (100, 70), "small": (50, 40)}


def _noise(size: tuple[int, int], channels: int, seed: int) -> np.ndarray:
    """Random pixels with a bright block in the top-left corner: no symmetry to hide behind."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 200, (size[1], size[0], channels), dtype=np.uint8)
    pixels[:10, :15] = 255
    return pixels


def _dataset(config, masks: bool = True) -> BucketDataset:
    found = discover(config)
    plan = plan_buckets(found, BucketSettings.from_dataset(config))
    sources = require_masks(found.images, found.subsets) if masks else None
    return BucketDataset(plan, found.subsets, masks=sources)


def _red(item) -> np.ndarray:
    return np.rint((item["image"][0].numpy() + 1.0) * 127.5).astype(np.int64)


def test_a_mask_follows_the_resize_random_crop_and_flip_of_its_pixels(
    tmp_path, subset_config, dataset_config
) -> None:
    """The mask files are the images themselves: the mask must equal the red channel of the
    training sample, whatever crop and flip the sample drew."""
    images, masks = tmp_path / "1_x", tmp_path / "masks"
    masks.mkdir()
    for seed, (name, size) in enumerate(SIZES.items()):
        pixels = _noise(size, 3, seed)
        images.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(images / f"{name}.png")
        Image.fromarray(pixels).save(masks / f"{name}.bmp")  # any image extension
    subset = subset_config(
        images, conditioning_data_dir=str(masks), flip_aug=True, random_crop=True
    )
    dataset = _dataset(dataset_config(subset, **SMALL))
    seen = set()
    for index in range(len(dataset)):
        for seed in range(24):
            item = dataset[SampleRef(index, 0, seed)]
            mask = item["mask"].numpy()
            assert mask.shape == (64, 64) and mask.dtype == np.float32
            assert np.array_equal(np.rint(mask * 255).astype(np.int64), _red(item))
            seen.add((item["flipped"], item["crop_top_left"][1]))
    assert {flipped for flipped, _ in seen} == {False, True}
    assert len({left for _, left in seen}) > 4  # many different crops


def test_alpha_masks_equal_the_alpha_channel_cut_like_the_image(
    tmp_path, subset_config, dataset_config
) -> None:
    images, masks = tmp_path / "1_x", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    rgba = _noise(SIZES["big"], 4, 3)
    Image.fromarray(rgba, "RGBA").save(images / "big.png")
    Image.fromarray(rgba[..., 3], "L").save(masks / "big.png")
    Image.new("RGB", (64, 64), (10, 20, 30)).save(images / "opaque.png")
    Image.new("L", (64, 64), 255).save(masks / "opaque.png")
    alpha = _dataset(dataset_config(subset_config(images, alpha_mask=True), **SMALL))
    # independent: Pillow's box filter to 91x64, then the centre 64 columns (27 // 2 = 13)
    big = alpha.plan.images[0]
    assert big.record.path.name == "big.png" and big.assignment.resized == (91, 64)
    resized = np.array(Image.fromarray(rgba[..., 3]).resize((91, 64), Image.Resampling.BOX))
    expected = resized[:, 13 : 13 + 64].astype(np.float32) / 255
    assert np.array_equal(alpha[0]["mask"].numpy(), expected)
    # an image without transparency is fully opaque
    assert torch.equal(alpha[1]["mask"], torch.ones(64, 64))
    # the same masks from a mask folder, with flips: identical samples
    both = dict(flip_aug=True, random_crop=True)
    alpha = _dataset(dataset_config(subset_config(images, alpha_mask=True, **both), **SMALL))
    folder = subset_config(images, conditioning_data_dir=str(masks), **both)
    files = _dataset(dataset_config(folder, **SMALL))
    for seed in range(8):
        for index in (0, 1):
            ref = SampleRef(index, 0, seed)
            assert torch.equal(alpha[ref]["mask"], files[ref]["mask"])


def test_batches_stack_masks_and_cached_runs_get_none(
    tmp_path, subset_config, dataset_config
) -> None:
    images = tmp_path / "1_x"
    images.mkdir()
    for i in range(2):
        Image.fromarray(_noise((64, 64), 4, i), "RGBA").save(images / f"{i}.png")
    config = dataset_config(subset_config(images, alpha_mask=True), **SMALL)
    dataset = _dataset(config)
    batch = collate_samples([dataset[0], dataset[1]])
    assert batch["masks"].shape == (2, 1, 64, 64)
    assert "masks" not in collate_samples([_dataset(config, masks=False)[0]])
    cached = BucketDataset(dataset.plan, discover(config).subsets, with_images=False)
    assert "mask" not in cached[0]


def test_masks_average_down_to_latent_pixels() -> None:
    masks = torch.rand(2, 1, 16, 24, generator=torch.Generator().manual_seed(0))
    # independent: the mean of each 8x8 block
    blocks = masks.numpy().reshape(2, 1, 2, 8, 3, 8).mean(axis=(3, 5))
    assert np.allclose(masks_to_size(masks, (2, 3)).numpy(), blocks, atol=1e-6)
    assert masks_to_size(masks, (16, 24)) is masks


def test_masked_loss_equals_a_hand_computed_weighted_mse() -> None:
    from loraforge.training.loss import LossOptions, training_loss
    from loraforge.training.noise import build_noise_schedule

    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 4, 3, 5, generator=g), torch.randn(2, 4, 3, 5, generator=g)
    mask = torch.rand(2, 1, 3, 5, generator=g)
    weights = torch.tensor([1.0, 0.5])
    timesteps = torch.tensor([10, 500])
    schedule = build_noise_schedule()
    options = LossOptions(masked_loss=True)
    loss = training_loss(pred, target, timesteps, weights, schedule, options, mask)
    # by hand, in float64: sum over each sample of (p - t)^2 * m over C*H*W, weighted, mean
    p, t, m = (x.double().numpy() for x in (pred, target, mask))
    per_sample = [((p[b] - t[b]) ** 2 * m[b]).sum() / p[b].size for b in range(2)]
    expected = (per_sample[0] * 1.0 + per_sample[1] * 0.5) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    ones = training_loss(pred, target, timesteps, weights, schedule, options, torch.ones_like(mask))
    assert torch.equal(
        ones, training_loss(pred, target, timesteps, weights, schedule, LossOptions())
    )
    with pytest.raises(ValueError, match="does not fit"):
        training_loss(pred, target, timesteps, weights, schedule, options, mask[:, :, :2])


def test_missing_wrong_size_and_absent_masks_name_the_subset(
    tmp_path, subset_config, dataset_config
) -> None:
    images, masks = tmp_path / "1_x", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (64, 64)).save(images / f"{name}.png")
    Image.new("RGB", (64, 64)).save(masks / "a.png")

    def found(**options):
        config = dataset_config(subset_config(images, **options), **SMALL)
        found = discover(config)
        return found.images, found.subsets

    with pytest.raises(DatasetError, match=r"has no mask for 1 image\(s\) of .*1_x: b\.png"):
        require_masks(*found(conditioning_data_dir=str(masks)))
    with pytest.raises(DatasetError, match=r"subsets\[0\]\.conditioning_data_dir.*does not exist"):
        require_masks(*found(conditioning_data_dir=str(tmp_path / "nowhere")))
    with pytest.raises(DatasetError, match=r"subsets\[0\]\.dir: .*1_x has no masks"):
        require_masks(*found())
    Image.new("RGB", (32, 64)).save(masks / "b.png")
    with pytest.raises(DatasetError, match=r"mask .*b\.png is 32x64 but its image b\.png is 64x64"):
        require_masks(*found(conditioning_data_dir=str(masks)))


def test_kohya_folders_may_keep_their_masks_in_sub_folders_of_the_same_name(
    tmp_path, subset_config, dataset_config
) -> None:
    root, masks = tmp_path / "train", tmp_path / "masks"
    for folder in ("2_cat", "3_dog"):
        (root / folder).mkdir(parents=True)
        (masks / folder).mkdir(parents=True)
        Image.new("RGB", (64, 64)).save(root / folder / "same.png")
        Image.new("RGB", (64, 64), (100, 0, 0)).save(masks / folder / "same.png")
    config = dataset_config(subset_config(root, conditioning_data_dir=str(masks)), **SMALL)
    found = discover(config)
    sources = require_masks(found.images, found.subsets)
    assert {s.path.parent.name for s in sources.values()} == {"2_cat", "3_dog"}
    assert all(s.path.parent.parent == masks for s in sources.values())


def test_mask_identity_changes_with_the_mask_file(tmp_path: Path) -> None:
    from loraforge.data.masks import MaskSource

    path = tmp_path / "m.png"
    Image.new("L", (8, 8), 0).save(path)
    before = MaskSource("file", path).identity()
    Image.new("L", (8, 8), 255).save(path)
    import os

    os.utime(path, ns=(1, 10**18))
    assert MaskSource("file", path).identity() != before
    assert MaskSource("alpha", path).identity() == "alpha"


def test_check_warns_when_no_image_of_an_alpha_subset_has_transparency(
    tmp_path, subset_config, dataset_config
) -> None:
    from loraforge.data.checks import check_dataset

    opaque, clear = tmp_path / "1_opaque", tmp_path / "1_clear"
    for folder, mode in ((opaque, "RGB"), (clear, "RGBA")):
        folder.mkdir()
        Image.new(mode, (64, 64)).save(folder / "x.png")
        (folder / "x.txt").write_text("x")
    subsets = [subset_config(f, alpha_mask=True) for f in (opaque, clear)]
    found = check_dataset(dataset_config(*subsets, **SMALL), masked_loss=True)
    assert [(p.severity, p.path) for p in found] == [("warning", "dataset.subsets[0].alpha_mask")]
    assert check_dataset(dataset_config(*subsets, **SMALL)) == []
