"""Block swap for the SD3 / FLUX transformers (sd-scripts' ``--blocks_to_swap``).

The swapped blocks' frozen weights live in CPU memory; a forward pre-hook brings a block to the
GPU just before it runs and a forward hook sends it back after. With gradient checkpointing
(required) backward re-runs each block's forward, so the same hooks bring it back for its
gradients, and only the non-swapped blocks plus the running one occupy the GPU. Which blocks
are swapped follows sd-scripts (:func:`loraforge.vram.flow_structure.swap_indices`): FLUX swaps
``n // 2`` double-stream and ``(n - n // 2) * 2`` single-stream blocks, SD3 ``n`` joint blocks,
each from the end of its stack. Moves are synchronous (the overlap sd-scripts gets from a
background thread is left for later).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from loraforge.vram.flow_structure import swap_indices


def transformer_blocks(transformer: nn.Module) -> tuple[list[nn.Module], int]:
    """``(blocks in forward order, number of double-stream / joint blocks)``."""
    double = list(transformer.transformer_blocks)
    single = list(getattr(transformer, "single_transformer_blocks", []))
    return double + single, len(double)


def _move(module: nn.Module, device: torch.device | str) -> None:
    with torch.no_grad():
        for param in module.parameters(recurse=True):
            if param.device != torch.device(device):
                param.data = param.data.to(device, non_blocking=True)
        for name, buffer in module.named_buffers(recurse=False):
            module.register_buffer(name, buffer.to(device))


def enable_block_swap(
    transformer: nn.Module, family: str, blocks_to_swap: int, device: torch.device
) -> list[int]:
    """Keep ``blocks_to_swap`` blocks on the CPU and move the rest of ``transformer`` to
    ``device`` (the caller has cast it, on the CPU); returns the swapped block indices."""
    blocks, doubles = transformer_blocks(transformer)
    swapped = swap_indices(family, doubles, len(blocks), blocks_to_swap)
    inside = {id(m) for i in swapped for m in blocks[i].modules()}
    with torch.no_grad():
        for module in transformer.modules():
            if id(module) in inside:
                continue
            for param in module.parameters(recurse=False):
                param.data = param.data.to(device)
            for name, buffer in module.named_buffers(recurse=False):
                module.register_buffer(name, buffer.to(device))
    for index in swapped:
        block = blocks[index]

        def bring(module: nn.Module, args: Any, device: torch.device = device) -> None:
            _move(module, device)

        def send_back(module: nn.Module, args: Any, output: Any) -> None:
            _move(module, "cpu")

        block.register_forward_pre_hook(bring)
        block.register_forward_hook(send_back)
    return list(swapped)
