"""Buckets: kohya's algorithm against sd-scripts' own outputs and an independent brute force."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from loraforge.data.buckets import (
    Bucketer,
    BucketSettings,
    crop_origin,
    make_bucket_resolutions,
)
from loraforge.errors import DatasetError

# Outputs of sd-scripts (library/model_util.py make_bucket_resolutions and
# library/train_util.py BucketManager.select_bucket, commit 48d368fa) run once on these inputs.
SD_SCRIPTS_RESOS_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640),
    (448, 576), (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256),
    (896, 256), (960, 256), (1024, 256),
]  # fmt: skip
SD_SCRIPTS_RESOS_768x512_STEP32 = [
    (256, 1024), (288, 1024), (320, 1024), (352, 1024), (384, 960), (384, 992), (384, 1024),
    (416, 896), (416, 928), (448, 832), (448, 864), (480, 800), (512, 736), (512, 768),
    (544, 704), (576, 672), (608, 608), (608, 640), (640, 608), (672, 576), (704, 544),
    (736, 512), (768, 512), (800, 480), (832, 448), (864, 448), (896, 416), (928, 416),
    (960, 384), (992, 384), (1024, 256), (1024, 288), (1024, 320), (1024, 352), (1024, 384),
]  # fmt: skip

# (settings, image size, bucket, resized size, aspect error) from sd-scripts.
SD_SCRIPTS_ASSIGNMENTS = [
    (((512, 512), True, 256, 1024, 64, False), (1000, 750), (576, 448), (597, 448), -0.04761904761904745),
    (((512, 512), True, 256, 1024, 64, False), (750, 1000), (448, 576), (448, 597), 0.02777777777777779),
    (((512, 512), True, 256, 1024, 64, False), (1920, 1080), (640, 384), (683, 384), -0.11111111111111094),
    (((512, 512), True, 256, 1024, 64, False), (100, 1000), (256, 1024), (256, 2560), 0.15),
    (((512, 512), True, 256, 1024, 64, False), (512, 512), (512, 512), (512, 512), 0.0),
    (((512, 512), True, 256, 1024, 64, False), (513, 300), (640, 384), (657, 384), -0.043333333333333224),
    (((512, 512), True, 256, 1024, 64, False), (333, 777), (320, 768), (329, 768), -0.011904761904761862),
    (((512, 512), True, 256, 1024, 64, True), (1000, 750), (512, 384), (512, 384), 0.0),
    (((512, 512), True, 256, 1024, 64, True), (1920, 1080), (640, 384), (683, 384), -0.11111111111111094),
    (((512, 512), True, 256, 1024, 64, True), (100, 1000), (64, 960), (100, 1000), -0.03333333333333334),
    (((512, 512), True, 256, 1024, 64, True), (513, 300), (512, 256), (513, 300), 0.29000000000000004),
    (((512, 512), True, 256, 1024, 64, True), (333, 777), (320, 768), (333, 777), -0.011904761904761862),
    (((1024, 1024), True, 256, 2048, 64, False), (4032, 3024), (1152, 896), (1195, 896), -0.04761904761904745),
    (((1024, 1024), True, 256, 2048, 64, False), (1000, 1000), (1024, 1024), (1024, 1024), 0.0),
    (((1024, 1024), True, 256, 2048, 64, False), (6000, 1000), (2048, 320), (2048, 341), 0.40000000000000036),
    (((1024, 1024), True, 256, 2048, 64, False), (777, 555), (1216, 832), (1216, 869), 0.06153846153846154),
    (((1024, 1024), True, 256, 2048, 64, True), (4032, 3024), (1088, 832), (1109, 832), -0.02564102564102555),
    (((1024, 1024), True, 256, 2048, 64, True), (1000, 1000), (960, 960), (1000, 1000), 0.0),
    (((1024, 1024), True, 256, 2048, 64, True), (500, 2000), (448, 1984), (500, 2000), -0.02419354838709678),
    (((1024, 1024), True, 256, 2048, 64, True), (6000, 1000), (2304, 384), (2304, 384), 0.0),
    (((1024, 1024), True, 256, 2048, 64, True), (2000, 3000), (832, 1216), (832, 1248), 0.01754385964912286),
    (((768, 512), True, 256, 1024, 32, False), (1920, 1080), (832, 448), (832, 468), 0.07936507936507953),
    (((768, 512), True, 256, 1024, 32, False), (1024, 1024), (608, 608), (608, 608), 0.0),
    (((768, 512), True, 256, 1024, 32, False), (6000, 1000), (1024, 256), (1536, 256), -2.0),
    (((512, 768), False, 256, 1024, 64, False), (1920, 1080), (512, 768), (1365, 768), -1.1111111111111112),
    (((512, 768), False, 256, 1024, 64, False), (1080, 1920), (512, 768), (512, 910), 0.10416666666666663),
    (((512, 768), False, 256, 1024, 64, False), (500, 2000), (512, 768), (512, 2048), 0.41666666666666663),
]  # fmt: skip


def test_resolutions_match_sd_scripts() -> None:
    assert list(make_bucket_resolutions((512, 512))) == SD_SCRIPTS_RESOS_512
    assert (
        list(make_bucket_resolutions((768, 512), 256, 1024, 32)) == SD_SCRIPTS_RESOS_768x512_STEP32
    )
    assert len(make_bucket_resolutions((1024, 1024), 256, 2048, 64)) == 41


@pytest.mark.parametrize(("config", "size", "bucket", "resized", "error"), SD_SCRIPTS_ASSIGNMENTS)
def test_assignment_matches_sd_scripts(config, size, bucket, resized, error) -> None:
    assignment = Bucketer(BucketSettings(*config)).assign(*size)
    assert assignment.bucket == bucket
    assert assignment.resized == resized
    assert assignment.aspect_error == error


steps = st.sampled_from([8, 16, 32, 64, 128])


@st.composite
def bucket_settings(draw, no_upscale=None):
    step = draw(steps)
    min_k = draw(st.integers(1, 8))
    res_w = draw(st.integers(min_k, 24)) * step
    res_h = draw(st.integers(min_k, 24)) * step
    max_k = draw(st.integers(max(res_w, res_h) // step, 40))
    flag = draw(st.booleans()) if no_upscale is None else no_upscale
    return BucketSettings((res_w, res_h), True, min_k * step, max_k * step, step, flag)


sizes = st.integers(1, 8000)


@settings(max_examples=150, deadline=None)
@given(config=bucket_settings(no_upscale=False), width=sizes, height=sizes)
def test_predefined_assignment_matches_brute_force(kohya, config, width, height) -> None:
    bucketer = Bucketer(config)
    resolutions = kohya.resolutions(
        config.resolution, config.min_bucket_reso, config.max_bucket_reso, config.bucket_reso_steps
    )
    assert list(bucketer.resolutions) == resolutions
    assignment = bucketer.assign(width, height)
    assert (assignment.bucket, assignment.resized) == kohya.cover(resolutions, width, height)


@settings(max_examples=200, deadline=None)
@given(config=bucket_settings(no_upscale=False), width=sizes, height=sizes)
def test_predefined_bucket_properties(config, width, height) -> None:
    a = Bucketer(config).assign(width, height)
    step = config.bucket_reso_steps
    max_area = config.resolution[0] * config.resolution[1]
    assert a.bucket[0] % step == 0 and a.bucket[1] % step == 0
    assert a.bucket[0] * a.bucket[1] <= max_area
    # Resized covers the bucket, and exactly matches it along one side.
    dx, dy = a.excess
    assert dx >= 0 and dy >= 0 and min(dx, dy) == 0
    # The crop is what the aspect-ratio error implies (within rounding).
    aspect = width / height
    if dx > 0:
        assert abs(dx - a.bucket[1] * abs(a.aspect_error)) <= 1
    if dy > 0:
        assert abs(dy - a.bucket[1] * abs(a.aspect_error) / aspect) <= 1
    assert a.aspect_error == a.bucket[0] / a.bucket[1] - aspect


@settings(max_examples=200, deadline=None)
@given(config=bucket_settings(no_upscale=True), width=sizes, height=sizes)
def test_no_upscale_properties(config, width, height) -> None:
    a = Bucketer(config).assign(width, height)
    step = config.bucket_reso_steps
    max_area = config.resolution[0] * config.resolution[1]
    assert a.bucket[0] % step == 0 and a.bucket[1] % step == 0
    # Never upscaled; the crop is less than one step per side.
    assert a.resized[0] <= width and a.resized[1] <= height
    dx, dy = a.excess
    assert 0 <= dx < step and 0 <= dy < step
    if width * height <= max_area:
        assert a.resized == (width, height)
        assert a.bucket == (width - width % step, height - height % step)
    else:
        assume(min(a.bucket) > 0)
        # One side is rounded half-up and the other derived from it, so the area may exceed the
        # maximum by about half a pixel per side (sd-scripts: 11x275 at 32x48, step 8 -> 8x200).
        aspect = width / height
        side_w, side_h = math.sqrt(max_area * aspect), math.sqrt(max_area / aspect)
        bound = max(
            (side_w + 0.5) * ((side_w + 0.5) / aspect + 0.5),
            ((side_h + 0.5) * aspect + 0.5) * (side_h + 0.5),
        )
        assert a.bucket[0] * a.bucket[1] <= bound
        assert abs(a.resized[0] / a.resized[1] - width / height) < 0.05 * width / height + 0.02


@given(width=sizes, height=sizes, res=st.sampled_from([(512, 512), (512, 768), (1024, 640)]))
def test_without_bucketing_there_is_one_bucket(width, height, res) -> None:
    a = Bucketer(BucketSettings(res, enable_bucket=False)).assign(width, height)
    assert a.bucket == res
    assert a.resized[0] >= res[0] and a.resized[1] >= res[1]
    assert min(a.excess) == 0


def test_exact_bucket_size_keeps_its_bucket() -> None:
    bucketer = Bucketer(BucketSettings((512, 512)))
    for reso in bucketer.resolutions:
        assignment = bucketer.assign(*reso)
        assert assignment.bucket == reso and assignment.resized == reso
        assert assignment.excess == (0, 0)


def test_settings_are_snapped_and_checked() -> None:
    adjusted = BucketSettings((512, 512), True, 250, 1000, 64).adjusted()
    assert (adjusted.min_bucket_reso, adjusted.max_bucket_reso) == (192, 1024)
    with pytest.raises(DatasetError, match="outside the bucket range"):
        BucketSettings((1024, 1024), True, 256, 768, 64).adjusted()
    with pytest.raises(DatasetError, match="outside the bucket range"):
        BucketSettings((512, 128), True, 256, 1024, 64).adjusted()
    with pytest.raises(DatasetError, match="below one step"):
        BucketSettings((512, 512), True, 32, 1024, 64).adjusted()
    # Without bucketing the range does not matter.
    assert BucketSettings((1024, 1024), False, 256, 768, 64).adjusted().max_bucket_reso == 768


@given(width=sizes, height=sizes, seed=st.integers(0, 2**32))
def test_crop_origin_inside_the_excess(width, height, seed) -> None:
    a = Bucketer(BucketSettings((512, 512))).assign(width, height)
    dx, dy = a.excess
    assert crop_origin(a, False, random.Random(seed)) == (dx // 2, dy // 2)
    left, top = crop_origin(a, True, random.Random(seed))
    assert 0 <= left <= dx and 0 <= top <= dy


def test_random_crop_reaches_both_ends() -> None:
    a = Bucketer(BucketSettings((512, 512))).assign(1000, 500)  # wide: horizontal excess only
    rng = random.Random(0)
    lefts = {crop_origin(a, True, rng)[0] for _ in range(3000)}
    assert min(lefts) == 0 and max(lefts) == a.excess[0]
