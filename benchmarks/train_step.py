"""Framework overhead of `loraforge train`'s step, against a minimal hand-written loop.

Builds a mid-sized SD1-architecture model from a config (wider than the demo's tiny model, so
the UNet's forward and backward dominate), a drawn dataset and a recipe with cached latents and
text-encoder outputs. Then, in one process and on the same model, LoRA modules and device:

* loraforge: ``train()`` exactly as ``loraforge train`` runs it (data loader, per-batch seeding,
  noise and loss options, gradient clipping, LR scheduler, NaN check, live display, saving
  hooks), timed between its first and last optimizer step;
* by hand: the least code that does the same work: the same batches already on the device,
  ``randn`` noise, ``randint`` timesteps, ``add_noise``, UNet forward, MSE, backward, clip,
  AdamW step, zero_grad.

Trials alternate between the two; the best time of each is kept and the ratio printed. The
target is a ratio within 1.05 (at most 5% framework overhead). Usage:

    python benchmarks/train_step.py                       # CPU or the first GPU
    python benchmarks/train_step.py --steps 30 --trials 3 --resolution 512 --batch-size 4
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import yaml

# A mid-sized SD1 UNet (about 4x the tiny model's widths; the real one is 320/640/1280/1280).
MID_UNET = {
    "block_out_channels": [128, 256, 384, 384],
    "attention_head_dim": 8,
    "cross_attention_dim": 256,
    "norm_num_groups": 32,
    "sample_size": 32,
}
MID_TEXT = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_attention_heads": 4,
    "projection_dim": 256,
}


def write_mid_model(folder: Path) -> Path:
    """The tiny SD1 model's layout with the wider UNet and text encoder above."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from loraforge.models.clip_tokenizer import write_tiny_tokenizer
    from loraforge.models.tiny import _model_kwargs, tiny_component_configs

    configs = tiny_component_configs("sd1")
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(_model_kwargs({**configs["unet"], **MID_UNET}))
    vae = AutoencoderKL.from_config(_model_kwargs(configs["vae"]))
    text = CLIPTextModel(CLIPTextConfig(**_model_kwargs({**configs["text_encoder"], **MID_TEXT})))
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        module.save_pretrained(folder / name, safe_serialization=True)
    write_tiny_tokenizer(folder / "tokenizer")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(configs["scheduler"]))
    (folder / "model_index.json").write_text(json.dumps(configs["model_index"]))
    return folder


def write_recipe(root: Path, args: argparse.Namespace, steps: int) -> Path:
    from loraforge.demo import write_demo_images

    dataset = root / "dataset"
    if not dataset.exists():
        write_demo_images(dataset / "10_lfdemo shape", count=8)
    recipe = {
        "model": {"base": str(root / "model")},
        "dataset": {
            "resolution": args.resolution,
            "enable_bucket": False,
            "num_workers": args.workers,
            "subsets": [{"dir": str(dataset)}],
        },
        "cache": {"latents": "memory", "text_encoder_outputs": "memory"},
        "network": {"dim": 16, "alpha": 8, "train_text_encoder": False},
        "training": {
            "max_train_steps": steps,
            "batch_size": args.batch_size,
            "learning_rate": 1e-4,
            "mixed_precision": args.precision,
            "seed": 0,
        },
        "output": {"dir": str(root / "out"), "name": "bench"},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Wraps the display's ``step``: times from the first optimizer step to the last."""

    def __init__(self, display, device: torch.device) -> None:
        self.display, self.device, self.times = display, device, []
        original = display.step

        def step(report):
            original(report)
            _sync(device)
            self.times.append(time.perf_counter())

        display.step = step

    def per_step(self) -> float:
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)


def time_loraforge(run) -> float:
    """Seconds per step of loraforge's loop (with a live display rendering into memory)."""
    from rich.console import Console

    from loraforge.training.display import TrainingDisplay
    from loraforge.training.loop import StopFlag, train

    console = Console(file=io.StringIO(), force_terminal=True, width=160)
    length = run.settings.length
    display = TrainingDisplay(
        console,
        total_steps=length.max_train_steps,
        num_epochs=length.num_epochs,
        start_step=0,
        device=run.device,
    )
    clock = StepClock(display, run.device)
    with display:
        train(run, display, StopFlag())
    return clock.per_step()


def hand_batches(run, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` (latents, text embeddings) pairs from the caches, already on the device."""
    batches = []
    conditioning = run.loss_setup.conditioning
    while len(batches) < count:
        for batch in run.loader:
            latents = conditioning.latents(batch, run.generator)
            hidden = conditioning.text(batch["captions"], with_grad=False).hidden
            batches.append((latents, hidden.to(run.precision.weight_dtype)))
            if len(batches) == count:
                break
    return batches


def time_by_hand(run, batches, steps: int) -> float:
    """Seconds per step of the minimal loop on the same UNet and LoRA modules."""
    unet, scheduler = run.loss_setup.unet, run.loss_setup.schedule.scheduler
    params = [p for p in run.network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    device, dtype = run.device, run.precision.weight_dtype
    autocast = run.accelerator.autocast
    times = []
    for index in range(steps):
        latents, hidden = batches[index % len(batches)]
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],), device=device)
        noisy = scheduler.add_noise(latents, noise, t)
        with autocast():
            pred = unet(noisy.to(dtype), t, hidden).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        run.accelerator.backward(loss)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter())
    return (times[-1] - times[0]) / (len(times) - 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per trial")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp one)")
    args = parser.parse_args(argv)

    from loraforge.recipe import load_recipe
    from loraforge.training.setup import setup_run

    root = args.dir or Path(tempfile.mkdtemp(prefix="loraforge-bench-"))
    if not (root / "model").exists():
        write_mid_model(root / "model")
    run = setup_run(load_recipe(write_recipe(root, args, args.steps)), force=True)
    unet_params = sum(p.numel() for p in run.loss_setup.unet.parameters())
    print(f"device {run.device}, UNet {unet_params / 1e6:.1f}M parameters, LoRA "
          f"{run.network.trainable_parameter_count() / 1e6:.2f}M, {args.resolution}px, "
          f"batch {args.batch_size}, {args.steps} steps x {args.trials} trials")  # fmt: skip
    batches = hand_batches(run, 8)
    time_by_hand(run, batches, 3)  # warm-up (allocator, kernels)
    ours, hand = math.inf, math.inf
    for trial in range(args.trials):
        ours = min(ours, time_loraforge(run))
        hand = min(hand, time_by_hand(run, batches, args.steps))
        print(
            f"trial {trial + 1}: loraforge {ours * 1000:.1f} ms/step, by hand {hand * 1000:.1f} ms/step"
        )
    ratio = ours / hand
    print(f"loraforge / hand-written = {ratio:.3f} (target <= 1.05)")
    return 0 if ratio <= 1.05 else 1


if __name__ == "__main__":
    sys.exit(main())
