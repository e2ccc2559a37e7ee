"""Latent-cache throughput: loraforge's batched, prefetching cache vs a naive per-image loop.

Generates a synthetic dataset, builds a mid-sized VAE from a config (random weights), and times
both in one run; prints images/second for each and the ratio. Usage:

    python benchmarks/cache_speed.py [--images 48] [--size 256] [--batch 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import save_file

from loraforge.data.buckets import BucketSettings
from loraforge.data.cache import encode_pixels, prepare_latent_cache
from loraforge.data.dataset import to_tensor
from loraforge.data.discovery import discover
from loraforge.data.images import load_image_rgb
from loraforge.data.plan import plan_buckets
from loraforge.data.transforms import resize_and_crop
from loraforge.recipe import parse_recipe_text


def make_dataset(root: Path, count: int, size: int) -> Path:
    folder = root / "1_bench thing"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shapes = [(size, size), (size + size // 2, size), (size, size + size // 2)]
    for i in range(count):
        w, h = shapes[i % len(shapes)]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            folder / f"{i:04d}.jpg", quality=90
        )
    return root


def naive(plan, vae, out: Path) -> float:
    started = time.perf_counter()
    for planned in plan.images:
        a = planned.assignment
        image = resize_and_crop(load_image_rgb(planned.record.path), a, a.center_crop())
        latents = encode_pixels(vae, to_tensor(np.array(image))[None])[0]
        save_file(
            {"latents": latents.contiguous()}, str(out / f"{planned.record.path.stem}.safetensors")
        )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(64, 128, 128, 128),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
    ).eval()
    with tempfile.TemporaryDirectory() as tmp:
        root = make_dataset(Path(tmp) / "data", args.images, args.size)
        recipe = parse_recipe_text(
            f"model: {{base: x/y}}\ndataset: {{resolution: {args.size}, min_bucket_reso: 64, "
            f"max_bucket_reso: {args.size * 2}, subsets: [{{dir: {root}}}]}}\n"
        )
        plan = plan_buckets(discover(recipe.dataset), BucketSettings.from_dataset(recipe.dataset))
        (Path(tmp) / "naive").mkdir()
        naive_s = naive(plan, vae, Path(tmp) / "naive")
        started = time.perf_counter()
        prepare_latent_cache(
            plan,
            vae,
            mode="disk",
            cache_dir=Path(tmp) / "cache",
            vae_identity="bench",
            flip_subsets=set(),
            batch_size=args.batch,
            decode_workers=2,
        )
        ours_s = time.perf_counter() - started
    n = len(plan.images)
    print(f"images: {n} at ~{args.size}px, threads: {torch.get_num_threads()}")
    print(f"naive per-image loop : {n / naive_s:7.2f} img/s")
    print(
        f"loraforge cache      : {n / ours_s:7.2f} img/s (batch {args.batch}, prefetching decode)"
    )
    print(f"ratio                : {naive_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
