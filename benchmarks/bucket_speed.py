"""How fast `loraforge bucket` reads a large dataset, compared with decoding every image.

Generates a synthetic kohya-style dataset (PNG and JPEG files of varied sizes and aspect
ratios, some with an EXIF rotation, a caption for every other image), then measures

* discovery + bucketing (what `loraforge bucket` does: headers only), in images/second, and
* fully decoding images (what a naive size scan would do), on a sample, in images/second,

and prints the ratio measured in this one run. Usage:

    python benchmarks/bucket_speed.py                      # 20,000 images in a temp folder
    python benchmarks/bucket_speed.py --count 5000 --dir /tmp/bucket-bench --keep
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from loraforge.data.buckets import BucketSettings
from loraforge.data.discovery import discover
from loraforge.data.folders import list_image_files
from loraforge.data.images import load_image_rgb
from loraforge.data.plan import plan_buckets
from loraforge.recipe import parse_recipe_text


def _encoded_variants(rng: random.Random, variants: int = 96) -> list[tuple[str, bytes]]:
    """Encoded images of varied sizes and aspect ratios; every file reuses one of them."""
    import io

    tiles = [Image.radial_gradient("L").convert("RGB"), Image.linear_gradient("L").convert("RGB")]
    encoded = []
    for i in range(variants):
        width = rng.randrange(96, 640, 8)
        height = max(64, int(width / rng.choice([0.5, 0.66, 0.75, 1.0, 1.33, 1.5, 2.0])))
        image = tiles[i % 2].resize((width, height))
        buffer = io.BytesIO()
        if i % 3 == 0:
            exif = Image.Exif()
            if i % 2 == 0:
                exif[0x0112] = 6  # stored landscape, displayed portrait
            image.save(buffer, "JPEG", quality=85, exif=exif.tobytes())
            encoded.append((".jpg", buffer.getvalue()))
        else:
            image.save(buffer, "PNG", compress_level=1)
            encoded.append((".png", buffer.getvalue()))
    return encoded


def generate(root: Path, count: int, seed: int = 0) -> None:
    """Write ``count`` images into two kohya folders under ``root`` (skipped if already there).

    Files are copies of ~100 encoded variants, so generation takes seconds, while each file is
    still opened, parsed and (for the comparison) decoded on its own.
    """
    folders = [root / "10_sks thing", root / "3_sks thing closeup"]
    if sum(len(list_image_files(f)) for f in folders if f.is_dir()) == count:
        return
    shutil.rmtree(root, ignore_errors=True)
    for folder in folders:
        folder.mkdir(parents=True)
    rng = random.Random(seed)
    started = time.perf_counter()
    variants = _encoded_variants(rng)
    for i in range(count):
        suffix, data = variants[rng.randrange(len(variants))]
        name = folders[i % 2] / f"{i:06d}"
        name.with_suffix(suffix).write_bytes(data)
        if i % 2 == 0:
            name.with_suffix(".txt").write_text(f"sks thing, tag{i % 50}, other tag")
    print(f"generated {count} images in {time.perf_counter() - started:.1f} s under {root}")


def measure_bucketing(root: Path) -> tuple[float, int]:
    recipe = parse_recipe_text(
        f"model:\n  base: x\ndataset:\n  resolution: 512\n  subsets:\n    - dir: '{root}'\n",
        base_dir=root,
    )
    started = time.perf_counter()
    found = discover(recipe.dataset)
    plan = plan_buckets(found, BucketSettings.from_dataset(recipe.dataset))
    elapsed = time.perf_counter() - started
    assert not found.skipped, found.skipped[:3]
    return elapsed, len(plan.images)


def measure_decoding(root: Path, sample: int, seed: int = 1) -> tuple[float, int]:
    paths = [p for folder in sorted(root.iterdir()) for p in list_image_files(folder)]
    chosen = random.Random(seed).sample(paths, min(sample, len(paths)))
    started = time.perf_counter()
    for path in chosen:
        load_image_rgb(path)
    return time.perf_counter() - started, len(chosen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000, help="images to generate")
    parser.add_argument("--dir", type=Path, default=None, help="dataset folder (reused if full)")
    parser.add_argument("--keep", action="store_true", help="keep a temporary dataset folder")
    parser.add_argument("--decode-sample", type=int, default=2_000, help="images to decode")
    args = parser.parse_args(argv)

    root = args.dir or Path(tempfile.mkdtemp(prefix="loraforge-bucket-bench-"))
    try:
        generate(root, args.count)
        bucket_s, images = measure_bucketing(root)
        decode_s, decoded = measure_decoding(root, args.decode_sample)
        bucket_rate = images / bucket_s
        decode_rate = decoded / decode_s
        print(f"discovery + bucketing: {images} images in {bucket_s:.2f} s = {bucket_rate:,.0f}/s")
        print(f"full decode (sample):  {decoded} images in {decode_s:.2f} s = {decode_rate:,.0f}/s")
        print(f"ratio: bucketing is {bucket_rate / decode_rate:.1f}x faster than decoding")
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        elif args.dir is None:
            print(f"dataset kept in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
