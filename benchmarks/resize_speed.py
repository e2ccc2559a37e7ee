"""How fast `loraforge resize` is on an SDXL-sized LoRA: batched vs one module at a time.

The LoRA has the real SDXL module list and shapes (kohya's default targets on the SDXL base
architecture, built on the meta device from loraforge's shipped configs: 722 UNet + 264
text-encoder modules), random fp16 weights at dim 128, resized to 32.

Printed, all measured in this one run:
- batched: same-shaped modules go through one QR/SVD call (loraforge's default);
- one at a time: the same exact factorisation, module by module;
- dense SVD: what sd-scripts' resize_lora.py does (full SVD of every up @ down), timed on a
  sample of modules because it is slow.

Usage:
    python benchmarks/resize_speed.py [--device cpu|cuda] [--rank-in 128] [--rank-out 32]
        [--dense-sample 8] [--repeat 1] [--threads N]

On a CPU shared with other work, --threads 1 avoids OpenMP oversubscription, which otherwise
slows every batched LAPACK call by an order of magnitude and hides the comparison.
"""

from __future__ import annotations

import argparse
import time

import torch


def sdxl_shapes() -> dict[str, tuple[int, ...]]:
    """``{kohya name: layer weight shape}`` for kohya's default SDXL LoRA targets."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from loraforge.models.configs import architecture_config_dir
    from loraforge.models.naming import lora_targets

    folder = architecture_config_dir("sdxl")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    targets = lora_targets("sdxl", unet, [te1, te2], conv=False)
    return {name: tuple(module.weight.shape) for name, module in targets.items()}


def synthetic_lora(shapes: dict[str, tuple[int, ...]], rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        out, inn = shape[0], shape[1]
        extra = (1, 1) if len(shape) == 4 else ()
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, inn, *extra, generator=g).half()
        tensors[f"{name}.lora_up.weight"] = (
            torch.randn(out, rank, *extra, generator=g) * 0.01
        ).half()
        tensors[f"{name}.alpha"] = torch.tensor(float(rank // 2)).half()
    return tensors


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_resize(parsed, rank: int, device: str, batched: bool, repeat: int) -> float:
    from loraforge.ops.resize import ResizeSpec, resize_lora

    spec = ResizeSpec(rank=rank, device=device, batched=batched)
    best = float("inf")
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        resize_lora(parsed, spec)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def time_dense(parsed, names: list[str], rank: int, device: str) -> float:
    """sd-scripts' way: form up @ down, full torch.linalg.svd, truncate (per module)."""
    from loraforge.ops.delta import lora_factors

    _sync(device)
    start = time.perf_counter()
    for name in names:
        up, down = lora_factors(parsed.modules[name])
        u, s, vh = torch.linalg.svd((up @ down).to(device))
        (u[:, :rank] * s[:rank]).cpu(), vh[:rank].cpu()
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rank-in", type=int, default=128)
    parser.add_argument("--rank-out", type=int, default=32)
    parser.add_argument(
        "--dense-sample", type=int, default=8, help="modules timed with dense SVD (0: skip)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--repeat", type=int, default=1, help="take the best of N runs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from loraforge.ops.modules import parse_lora

    shapes = sdxl_shapes()
    parsed = parse_lora(synthetic_lora(shapes, args.rank_in))
    n = len(parsed.modules)
    groups = len({(s[0], s[1]) for s in shapes.values()})
    print(
        f"SDXL LoRA: {n} modules in {groups} shape groups, dim {args.rank_in} -> {args.rank_out}, device {args.device}, {torch.get_num_threads()} threads"
    )
    if args.device == "cuda":
        time_resize(parsed, args.rank_out, args.device, True, 1)  # warm-up: context, kernels
    batched = time_resize(parsed, args.rank_out, args.device, True, args.repeat)
    single = time_resize(parsed, args.rank_out, args.device, False, args.repeat)
    print(f"batched        {n / batched:9.1f} modules/s  ({batched:.2f} s)")
    print(f"one at a time  {n / single:9.1f} modules/s  ({single:.2f} s)")
    print(f"ratio batched / one at a time: {single / batched:.2f}x")
    if args.dense_sample:
        # a sample spread over the file (every k-th module), so all shape kinds are in it
        step = max(1, n // args.dense_sample)
        names = list(parsed.modules)[::step][: args.dense_sample]
        dense = time_dense(parsed, names, args.rank_out, args.device)
        rate = len(names) / dense
        print(f"dense SVD (sd-scripts' method, {len(names)}-module sample) {rate:9.1f} modules/s")
        print(f"ratio batched / dense SVD: {(n / batched) / rate:.1f}x")


if __name__ == "__main__":
    main()
