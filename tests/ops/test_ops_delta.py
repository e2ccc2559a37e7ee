"""What each algorithm does to a weight, against LyCORIS' functional API and hand-written formulas."""

from __future__ import annotations

import pytest
import torch

from loraforge.ops.delta import apply_module, module_delta
from loraforge.ops.modules import parse_lora

NAME = "lora_unet_mid_block_attentions_0_proj_in"
torch.manual_seed(0)


def _module(tensors: dict[str, torch.Tensor]):
    parsed = parse_lora({f"{NAME}.{k}": v for k, v in tensors.items()})
    parsed.require_valid()
    return parsed.modules[NAME]


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5)


def test_lora_linear_conv_and_tucker_mid(synth) -> None:
    for kernel in (None, 1, 3):
        tensors = synth.lora(NAME, 12, 10, 4, kernel=kernel, alpha=2.0)
        m = parse_lora(tensors).modules[NAME]
        _close(module_delta(m), synth.delta(tensors, NAME))
    lycoris = pytest.importorskip("lycoris.functional.locon")
    down, up, mid = torch.randn(4, 10, 1, 1), torch.randn(12, 4, 1, 1), torch.randn(4, 4, 3, 3)
    m = _module(
        {
            "lora_down.weight": down,
            "lora_up.weight": up,
            "lora_mid.weight": mid,
            "alpha": torch.tensor(2.0),
        }
    )
    _close(module_delta(m), lycoris.diff_weight(down, up, mid, gamma=0.5))


def test_loha_matches_lycoris_functional_with_a_single_scale() -> None:
    loha = pytest.importorskip("lycoris.functional.loha")
    w1a, w1b, w2a, w2b = (
        torch.randn(12, 4),
        torch.randn(4, 10),
        torch.randn(12, 4),
        torch.randn(4, 10),
    )
    m = _module(
        {
            "hada_w1_a": w1a,
            "hada_w1_b": w1b,
            "hada_w2_a": w2a,
            "hada_w2_b": w2b,
            "alpha": torch.tensor(1.0),
        }
    )
    _close(module_delta(m), loha.diff_weight(w1b, w1a, w2b, w2a, None, None, gamma=0.25))
    _close(module_delta(m), (w1a @ w1b) * (w2a @ w2b) * 0.25)  # A1111/ComfyUI: alpha / rank once
    t1, t2 = torch.randn(4, 4, 3, 3), torch.randn(4, 4, 3, 3)
    w1a, w2a = torch.randn(4, 12), torch.randn(4, 12)  # Tucker layout: (rank, out)
    m = _module(
        {
            "hada_w1_a": w1a,
            "hada_w1_b": w1b,
            "hada_w2_a": w2a,
            "hada_w2_b": w2b,
            "hada_t1": t1,
            "hada_t2": t2,
            "alpha": torch.tensor(2.0),
        }
    )
    _close(module_delta(m), loha.diff_weight(w1b, w1a, w2b, w2a, t1, t2, gamma=0.5))


def test_lokr_matches_lycoris_functional() -> None:
    lokr = pytest.importorskip("lycoris.functional.lokr")
    w1, w2a, w2b = torch.randn(2, 5), torch.randn(6, 3), torch.randn(3, 4)
    m = _module({"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(1.5)})
    assert m.rank == 3
    # lycoris.functional.lokr takes alpha as gamma and divides by the rank itself
    _close(module_delta(m), lokr.diff_weight(w1, None, None, None, w2a, w2b, None, gamma=1.5))
    _close(module_delta(m), torch.kron(w1, w2a @ w2b) * 0.5)
    w2 = torch.randn(6, 4, 3, 3)  # conv, both halves full: no scaling
    m = _module({"lokr_w1": w1, "lokr_w2": w2, "alpha": torch.tensor(7.0)})
    _close(module_delta(m), torch.kron(w1[:, :, None, None], w2))


def test_full_ia3_and_glora() -> None:
    w = torch.randn(6, 4)
    diff = torch.randn(6, 4)
    _close(apply_module(_module({"diff": diff}), w, 0.5), w + 0.5 * diff)
    scale = torch.randn(6)
    _close(
        apply_module(_module({"weight": scale, "on_input": torch.tensor(False)}), w),
        w + w * scale[:, None],
    )
    scale_in = torch.randn(4)
    _close(
        apply_module(_module({"weight": scale_in, "on_input": torch.tensor(True)}), w, -1.0),
        w - w * scale_in[None, :],
    )
    a1, a2, b1, b2 = torch.randn(4, 2), torch.randn(2, 4), torch.randn(6, 2), torch.randn(2, 4)
    m = _module(
        {
            "a1.weight": a1,
            "a2.weight": a2,
            "b1.weight": b1,
            "b2.weight": b2,
            "alpha": torch.tensor(1.0),
        }
    )
    _close(apply_module(m, w), w + (w @ a1 @ a2 + b1 @ b2) * 0.5)


@pytest.mark.parametrize("rescale", [False, True])
def test_oft_and_boft_match_lycoris_functional(rescale: bool) -> None:
    diag_oft = pytest.importorskip("lycoris.functional.diag_oft")
    boft = pytest.importorskip("lycoris.functional.boft")
    w = torch.randn(8, 5)
    blocks = torch.randn(2, 4, 4) * 0.1
    extra = {"rescale": torch.rand(8, 1) + 0.5} if rescale else {}
    m = _module({"oft_blocks": blocks, "alpha": torch.tensor(0.05), **extra})
    # lycoris-lora's modules pass the file's alpha times the output width as the constraint
    expected = diag_oft.diff_weight(w, blocks, extra.get("rescale"), constraint=0.05 * 8)
    _close(apply_module(m, w) - w, expected)
    _close(apply_module(m, w, 0.3) - w, 0.3 * expected)
    bblocks = torch.randn(2, 2, 4, 4) * 0.1
    m = _module({"oft_blocks": bblocks, "alpha": torch.tensor(0.0), **extra})
    _close(
        apply_module(m, w) - w, boft.diff_weight(w, bblocks, extra.get("rescale"), constraint=0.0)
    )


def test_oft_rotation_is_orthogonal_and_the_constraint_scales_with_width() -> None:
    w = torch.randn(8, 5)
    blocks = torch.randn(2, 4, 4)
    loose = apply_module(_module({"oft_blocks": blocks, "alpha": torch.tensor(0.0)}), w)
    # R is orthogonal blockwise, so each block of rows keeps its Gram matrix
    _close(loose[:4].T @ loose[:4], w[:4].T @ w[:4])
    # sd-scripts and lycoris-lora bound ||Q|| by alpha * out_dim (8 rows here)
    q = blocks - blocks.transpose(-1, -2)
    alpha = float(torch.linalg.vector_norm(q)) / 8 / 2  # bound at half the norm: Q is halved
    eye = torch.eye(4)
    half = q / 2
    r = (eye + half) @ torch.linalg.inv(eye - half)
    expected = torch.einsum("knm,kn...->km...", r, w.reshape(2, 4, 5)).reshape(8, 5)
    m = _module({"oft_blocks": blocks, "alpha": torch.tensor(alpha)})
    _close(apply_module(m, w), expected)


@pytest.mark.parametrize("on_out", [True, False])
def test_dora_weight_decomposition(on_out: bool) -> None:
    w = torch.randn(6, 4)
    down, up = torch.randn(2, 4), torch.randn(6, 2)
    magnitude = torch.rand(6, 1) + 0.5 if on_out else torch.rand(1, 4) + 0.5
    m = _module(
        {
            "lora_down.weight": down,
            "lora_up.weight": up,
            "alpha": torch.tensor(1.0),
            "dora_scale": magnitude,
        }
    )
    merged = w + up @ down * 0.5
    norm = merged.norm(dim=1, keepdim=True) if on_out else merged.norm(dim=0, keepdim=True)
    target = merged * magnitude / norm
    _close(apply_module(m, w), target)
    _close(apply_module(m, w, 0.5), w + 0.5 * (target - w))
