"""The least code that trains the same LoRA step as a ``loraforge train`` run, and its FLOPs.

After a run, :func:`time_minimal_loop` takes loraforge's hooks off the run's models and puts
plain LoRA forwards on the same layers (:class:`plain_lora.PlainLora`, also used by the
independent reference loop in ``tests/train/test_train_reference_step.py``), starting from
the run's adapter weights. Its step: the batches already on the device, prompt encoding (with
gradients when the text encoder trains), ``randn`` noise, ``randint`` timesteps, ``add_noise``,
the UNet under the run's autocast, MSE, backward (fp16: a ``GradScaler``), clipping, the
optimizer (the recipe's AdamW or bitsandbytes' AdamW8bit) and ``zero_grad``. Same models, dtypes,
gradient checkpointing and attention kernel: the difference in time is loraforge's overhead.

:func:`unet_flops` counts the UNet's forward and backward FLOPs of one such step with
``torch.utils.flop_counter.FlopCounterMode``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
import torch.nn.functional as F
from plain_lora import PlainLora


def attach_plain_loras(network: Any, *, text_encoder: bool) -> list[PlainLora]:
    """Replace the network's hooks by plain LoRA forwards (UNet; text encoders if ``text_encoder``)."""
    network.restore()
    loras = []
    for adapter in network.adapters():
        if adapter.lora_name.startswith("lora_te") and not text_encoder:
            continue
        down, up = adapter.lora_down.weight, adapter.lora_up.weight
        loras.append(PlainLora(adapter.target, down, up, float(adapter.scale)))
    return loras


def make_optimizer(name: str, params: list[torch.Tensor], lr: float = 1e-4) -> Any:
    """The recipe's optimizer in its plainest form."""
    if name == "AdamW8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=0.01)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)


Batch = tuple[torch.Tensor, list[str], Any, Any]


def device_batches(run: Any, count: int, *, train_text_encoder: bool) -> list[Batch]:
    """``count`` (latents, captions, SDXL size ids, prompt embeddings) on the device.

    The embeddings come from the run's text cache or encoders now, unless the text encoder
    trains (then each step encodes the captions with gradients): ``None``.
    """
    from loraforge.training.conditioning import sdxl_size_ids

    out: list[Batch] = []
    conditioning = run.loss_setup.conditioning
    while len(out) < count:
        for batch in run.loader:
            latents = conditioning.latents(batch, run.generator)
            ids = sdxl_size_ids(batch, latents.device) if run.loss_setup.is_sdxl else None
            captions = list(batch["captions"])
            embeds = None if train_text_encoder else conditioning.text(captions, with_grad=False)
            out.append((latents, captions, ids, embeds))
            if len(out) == count:
                break
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Step:
    """One minimal training step on the run's models."""

    def __init__(self, run: Any, optimizer_name: str, train_text_encoder: bool) -> None:
        self.run, self.device = run, run.device
        self.dtype = run.precision.weight_dtype
        self.unet = run.loss_setup.unet
        self.scheduler = run.loss_setup.schedule.scheduler
        self.te = train_text_encoder
        self.loras = attach_plain_loras(run.network, text_encoder=train_text_encoder)
        self.params = [t for lora in self.loras for t in (lora.down, lora.up)]
        self.optimizer = make_optimizer(optimizer_name, self.params)
        mixed = run.precision.mixed_precision
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed)
        fp16 = mixed == "fp16" and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None

    def autocast(self) -> Any:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def unet_loss(self, batch: Batch) -> torch.Tensor:
        from loraforge.training.conditioning import unet_conditioning

        latents, captions, ids, embeds = batch
        if embeds is None:
            with self.autocast():
                embeds = self.run.loss_setup.conditioning.text(captions, with_grad=True)
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],), device=self.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        kwargs = unet_conditioning(embeds, ids, self.dtype)
        with self.autocast():
            pred = self.unet(noisy.to(self.dtype), t, **kwargs).sample
        return F.mse_loss(pred.float(), noise)

    def __call__(self, batch: Batch) -> None:
        loss = self.unet_loss(batch)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        for lora in self.loras:
            lora.remove()


def time_minimal_loop(
    run: Any, optimizer_name: str, train_text_encoder: bool, steps: int, warmup: int = 3
) -> dict[str, Any]:
    """Seconds per step of the minimal loop (steps after ``warmup``), and its CUDA peaks."""
    step = _Step(run, optimizer_name, train_text_encoder)
    batches = device_batches(run, min(steps, 8), train_text_encoder=train_text_encoder)
    cuda = run.device.type == "cuda"
    times = []
    try:
        for index in range(steps):
            if index == warmup and cuda:
                torch.cuda.reset_peak_memory_stats()
            step(batches[index % len(batches)])
            _sync(run.device)
            times.append(time.perf_counter())
        timed = times[warmup - 1 :]
        return {
            "s_per_step": (timed[-1] - timed[0]) / (len(timed) - 1),
            "timed_steps": len(timed) - 1,
            "max_memory_allocated": torch.cuda.max_memory_allocated() if cuda else None,
            "max_memory_reserved": torch.cuda.max_memory_reserved() if cuda else None,
        }
    finally:
        step.close()


@contextlib.contextmanager
def _counted_attention(unet: Any) -> Any:
    """SDPA processors while counting: FlopCounterMode does not see inside xformers' kernels."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    processors = unet.attn_processors
    uses_xformers = any("XFormers" in type(p).__name__ for p in processors.values())
    if uses_xformers:
        unet.set_attn_processor(AttnProcessor2_0())
    try:
        yield
    finally:
        if uses_xformers:
            unet.set_attn_processor(processors)


def unet_flops(run: Any, optimizer_name: str) -> int:
    """FLOPs of one UNet forward + backward (LoRA on the UNet, one batch of the run)."""
    from torch.utils.flop_counter import FlopCounterMode

    from loraforge.training.conditioning import unet_conditioning

    step = _Step(run, optimizer_name, train_text_encoder=False)
    try:
        latents, _, ids, embeds = device_batches(run, 1, train_text_encoder=False)[0]
        kwargs = unet_conditioning(embeds, ids, step.dtype)
        t = torch.randint(0, 1000, (latents.shape[0],), device=run.device)
        with _counted_attention(step.unet), FlopCounterMode(display=False) as counter:
            with step.autocast():
                pred = step.unet(latents.to(step.dtype), t, **kwargs).sample
            pred.float().square().mean().backward()
        step.optimizer.zero_grad(set_to_none=True)
        return int(counter.get_total_flops())
    finally:
        step.close()
