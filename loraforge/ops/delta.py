"""What a LoRA module does to its layer's weight: ``W -> W + ratio · ΔW`` or a weight-dependent map.

The formulas are the ones the consumers of these files apply (A1111/Forge's ``extensions-builtin
/Lora`` and ComfyUI's ``comfy/weight_adapter``), which define what a file means:

- LoRA/LoCon: ``ΔW = up @ down · alpha/rank`` (conv 3x3: down ``(r, in, k, k)``, up
  ``(out, r, 1, 1)``; a Tucker ``lora_mid`` is folded into down). Missing alpha: scale 1.
- LoHa: ``ΔW = (w1a @ w1b) ⊙ (w2a @ w2b) · alpha/rank`` (rank = ``w1b.shape[0]``; Tucker
  ``t1``/``t2``).
- LoKr: ``ΔW = kron(w1, w2) · alpha/rank``, each factor full or ``a @ b``; the rank is ``w2_b``'s
  (else ``w1_b``'s); with neither factor decomposed there is no scaling.
- full: ``ΔW = diff``, and ``diff_b`` is added to the bias. norm (LyCORIS ``train_norm``, a
  LayerNorm/GroupNorm layer): ``ΔW = w_norm``, and ``b_norm`` is added to the bias. The bias
  deltas are scaled by the ratio like ``ΔW`` (ComfyUI's ``diff`` patches, A1111's ``ex_bias``).
- IA3: ``ΔW = W ⊙ w`` (per output row, or per input column with ``on_input``).
- GLoRA: ``ΔW = (W @ a1 @ a2 + b1 @ b2) · alpha/rank`` (and the older layout).
- OFT/BOFT: ``W' = R W`` with Cayley blocks ``R = (I + Q)(I − Q)⁻¹``, ``Q = B − Bᵀ`` (norm-clamped
  by alpha; sd-scripts' own OFT clamps by ``alpha · out_dim``).
- DoRA (``dora_scale``): ``W' = (W + ΔW) · m / ‖W + ΔW‖``, the norm per input column for a
  ``(1, in, …)`` magnitude (loraforge's layout: the one A1111, ComfyUI and Forge all apply this
  way), per output row for an ``(out, 1, …)`` one (lycoris-lora's ``wd_on_output``, as trained;
  the UIs read that layout differently, see :mod:`loraforge.ops.ui_support`).

A weight-dependent module at ratio ``r`` gives ``W + r · (W' − W)``, as ComfyUI does.

Note: LyCORIS' own ``LohaModule.get_diff_weight`` (lycoris-lora 3.x-4.1) multiplies by
``alpha/rank`` twice; we follow the readers (and ``lycoris.functional.loha.diff_weight``),
which apply it once.
"""

from __future__ import annotations

import torch

from loraforge.ops.modules import LoraModule, glora_old_layout

ADDITIVE_ALGORITHMS = ("lora", "loha", "lokr", "full", "norm")


def is_additive(m: LoraModule) -> bool:
    """True when the module adds a weight-independent ``ΔW`` (so deltas can be summed)."""
    return m.algorithm in ADDITIVE_ALGORITHMS and not m.dora


def lora_factors(
    m: LoraModule, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)`` of a LoRA/LoCon module as matrices, unscaled.

    Returns:
        up ``(out, r)`` and down ``(r, in·k·k)``; a Tucker ``lora_mid`` is folded into down.
    """
    t = m.tensors
    down = t["lora_down.weight"].to(device=device, dtype=dtype)
    up = (
        t["lora_up.weight"].to(device=device, dtype=dtype).reshape(t["lora_up.weight"].shape[0], -1)
    )
    mid = t.get("lora_mid.weight")
    if mid is not None:
        # down' (m, in, kh, kw) = Σ_n mid (m, n, kh, kw) · down (n, in)
        down2 = down.reshape(down.shape[0], -1)
        down = torch.einsum("mnhw,ni->mihw", mid.to(device=device, dtype=dtype), down2)
    return up, down.reshape(down.shape[0], -1)


def lora_weight_shape(m: LoraModule) -> tuple[int, ...]:
    """The adapted layer's weight shape as implied by a LoRA/LoCon module's tensors."""
    t = m.tensors
    down, up = t["lora_down.weight"], t["lora_up.weight"]
    if down.dim() == 2:
        return (int(up.shape[0]), int(down.shape[1]))
    return (int(up.shape[0]), int(down.shape[1]), *m.kernel)


def module_delta(
    m: LoraModule,
    *,
    shape: tuple[int, ...] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The scaled ``ΔW`` of an additive module (LoRA/LoCon, LoHa, LoKr, full, norm).

    Args:
        m: the module; must satisfy :func:`is_additive`.
        shape: the layer's weight shape; default: what the tensors imply (a 2-D
            ``(out, in·k·k)`` matrix for a LoHa/LoKr conv whose kernel the tensors do not show).
        dtype, device: where to compute (default float32, the tensors' device).

    Raises:
        ValueError: the module is not additive or ``shape`` does not fit.
    """
    if not is_additive(m):
        raise ValueError(f"{m.name}: {m.algorithm} with dora={m.dora} depends on the base weight")
    return _additive_delta(m, shape, dtype, device)


def _additive_delta(
    m: LoraModule,
    shape: tuple[int, ...] | None,
    dtype: torch.dtype,
    device: torch.device | str | None,
) -> torch.Tensor:
    t = {k: v.to(device=device, dtype=dtype) for k, v in m.tensors.items()}
    if m.algorithm == "lora":
        up, down = lora_factors(m, dtype, device)
        delta = (up @ down).reshape(lora_weight_shape(m))
    elif m.algorithm == "loha":
        delta = _loha(t)
    elif m.algorithm == "lokr":
        delta = _lokr(t)
    elif m.algorithm == "norm":
        delta = t["w_norm"]
    else:
        delta = t["diff"]
    delta = delta * m.scale
    if shape is not None and tuple(delta.shape) != tuple(shape):
        if delta.numel() != _numel(shape):
            raise ValueError(
                f"{m.name}: ΔW {tuple(delta.shape)} does not fit weight {tuple(shape)}"
            )
        delta = delta.reshape(shape)
    return delta


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _tucker(t: torch.Tensor, wb: torch.Tensor, wa: torch.Tensor) -> torch.Tensor:
    # ComfyUI/LyCORIS: rebuild (p, r, k, l) = Σ_ij t (i, j, k, l) · wb (j, r) · wa (i, p)
    return torch.einsum("ijkl,jr,ip->prkl", t, wb, wa)


def _loha(t: dict[str, torch.Tensor]) -> torch.Tensor:
    if "hada_t1" in t:
        m1 = _tucker(t["hada_t1"], t["hada_w1_b"], t["hada_w1_a"])
        m2 = _tucker(t["hada_t2"], t["hada_w2_b"], t["hada_w2_a"])
        return m1 * m2
    w1b = t["hada_w1_b"].reshape(t["hada_w1_b"].shape[0], -1)
    w2b = t["hada_w2_b"].reshape(t["hada_w2_b"].shape[0], -1)
    m1 = t["hada_w1_a"].reshape(t["hada_w1_a"].shape[0], -1) @ w1b
    m2 = t["hada_w2_a"].reshape(t["hada_w2_a"].shape[0], -1) @ w2b
    return m1 * m2


def _lokr(t: dict[str, torch.Tensor]) -> torch.Tensor:
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = _tucker(t["lokr_t2"], t["lokr_w2_b"], t["lokr_w2_a"])
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1.reshape(*w1.shape[:2], 1, 1)
    return torch.kron(w1, w2)


def apply_module(
    m: LoraModule,
    weight: torch.Tensor,
    ratio: float = 1.0,
) -> torch.Tensor:
    """``W'`` for ``weight`` with ``m`` applied at ``ratio``; every supported algorithm.

    Args:
        m: the module.
        weight: the layer weight (computed in its dtype: pass float32/float64).
        ratio: the strength; may be negative.

    Raises:
        ValueError: the module does not fit ``weight``.
    """
    w = weight
    t = {k: v.to(device=w.device, dtype=w.dtype) for k, v in m.tensors.items()}
    if m.algorithm in ADDITIVE_ALGORITHMS:
        delta = _additive_delta(m, tuple(w.shape), w.dtype, w.device)
    elif m.algorithm == "ia3":
        delta = _ia3(t, w)
    elif m.algorithm == "glora":
        delta = _glora(t, w) * m.scale
    else:
        delta = _oft(m, t, w) - w
    if m.dora:
        delta = _weight_decompose(w, delta, t["dora_scale"], bool(m.dora_on_output)) - w
    return w + ratio * delta


def apply_bias(m: LoraModule, bias: torch.Tensor, ratio: float = 1.0) -> torch.Tensor:
    """The layer's bias with ``m``'s bias delta (full ``diff_b``, norm ``b_norm``) at ``ratio``.

    Raises:
        ValueError: the module has no bias delta, or it does not fit ``bias``.
    """
    delta = m.bias_delta
    if delta is None:
        raise ValueError(f"{m.name}: {m.algorithm} has no bias delta")
    if delta.numel() != bias.numel():
        raise ValueError(
            f"{m.name}: bias delta {tuple(delta.shape)} does not fit {tuple(bias.shape)}"
        )
    return bias + ratio * delta.to(device=bias.device, dtype=bias.dtype).reshape(bias.shape)


def _ia3(t: dict[str, torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    scale = t["weight"]
    on_input = "on_input" in t and bool(t["on_input"].reshape(-1)[0].item())
    extra = [1] * (w.dim() - 2)
    scale = scale.reshape(1, -1, *extra) if on_input else scale.reshape(-1, 1, *extra)
    return w * scale


def _glora(t: dict[str, torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    a1, a2, b1, b2 = (
        t[k].flatten(start_dim=1) for k in ("a1.weight", "a2.weight", "b1.weight", "b2.weight")
    )
    if glora_old_layout(t):
        return (b2 @ b1 + (w.flatten(start_dim=1) @ a2) @ a1).reshape(w.shape)
    if w.dim() > 2:
        wa = torch.einsum("oi...,ij->oj...", torch.einsum("oi...,ij->oj...", w, a1), a2)
    else:
        wa = w @ a1 @ a2
    return wa + (b1 @ b2).reshape(w.shape)


def _constraint(alpha: float | None, w: torch.Tensor) -> float | None:
    # The file's alpha is the constraint per output channel: sd-scripts' OFT and lycoris-lora's
    # diag-oft/BOFT both train with alpha * out_dim. (ComfyUI reads plain alpha, A1111 none.)
    return None if alpha is None else alpha * w.shape[0]


def _cayley(blocks: torch.Tensor, constraint: float | None) -> torch.Tensor:
    q = blocks - blocks.transpose(-1, -2)
    if constraint is not None and constraint > 0:
        norm = torch.linalg.vector_norm(q) + 1e-8
        if norm > constraint:
            q = q * (constraint / norm)
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
    return (eye + q) @ torch.linalg.inv(eye - q)


def _oft(m: LoraModule, t: dict[str, torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    blocks = t["oft_blocks"]
    alpha = m.alpha
    if blocks.dim() == 4:
        return _boft(blocks, alpha, t.get("rescale"), w)
    r = _cayley(blocks, _constraint(alpha, w))
    num, size = blocks.shape[0], blocks.shape[1]
    if num * size != w.shape[0]:
        raise ValueError(
            f"{m.name}: OFT blocks {tuple(blocks.shape)} do not fit weight {tuple(w.shape)}"
        )
    rotated = torch.einsum("knm,kn...->km...", r, w.reshape(num, size, *w.shape[1:]))
    rotated = rotated.reshape(w.shape)
    if "rescale" in t:
        rotated = rotated * t["rescale"].reshape(-1, *[1] * (w.dim() - 1))
    return rotated


def _boft(
    blocks: torch.Tensor, alpha: float | None, rescale: torch.Tensor | None, w: torch.Tensor
) -> torch.Tensor:
    # Butterfly OFT as ComfyUI applies it: m stages of block rotations between permutations.
    r = _cayley(blocks, _constraint(alpha, w))
    stages, _, size = blocks.shape[0], blocks.shape[1], blocks.shape[2]
    half = size // 2
    x = w
    for i in range(stages):
        k = 2**i * half
        x = x.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, size))
        x = torch.einsum("bij,bj...->bi...", r[i], x)
        x = x.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
    if rescale is not None:
        x = x * rescale.reshape(-1, *[1] * (w.dim() - 1))
    return x


def _weight_decompose(
    w: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, on_output: bool
) -> torch.Tensor:
    """``(W + ΔW) · m / ‖W + ΔW‖``, the norm per output row or per input column."""
    merged = w + delta
    if on_output:
        norm = merged.reshape(w.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
    else:
        norm = merged.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, -1, *[1] * (w.dim() - 2))
    return merged * (magnitude.reshape(norm.shape) / norm)


def make_lora_tensors(
    name: str,
    up: torch.Tensor,
    down: torch.Tensor,
    alpha: float,
    weight_shape: tuple[int, ...],
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """kohya tensors for ``ΔW = up @ down · alpha / rank`` on a layer of ``weight_shape``.

    Args:
        name: the module name.
        up, down: ``(out, r)`` and ``(r, in·k·k)`` matrices.
        alpha: the alpha to store; stored in ``dtype`` like sd-scripts does. When ``dtype``
            cannot hold it exactly, ``up`` absorbs the rounding so the product stays exact.
        weight_shape: ``(out, in)`` or ``(out, in, kh, kw)``.
        dtype: the save dtype.
    """
    rank = int(down.shape[0])
    stored = torch.tensor(float(alpha), dtype=dtype)
    stored_value = float(stored.float())
    if stored_value != 0.0 and stored_value != alpha:
        up = up * (alpha / stored_value)
    if len(weight_shape) == 4:
        down_t = down.reshape(rank, *weight_shape[1:])
        up_t = up.reshape(weight_shape[0], rank, 1, 1)
    else:
        down_t, up_t = down.reshape(rank, weight_shape[1]), up.reshape(weight_shape[0], rank)
    return {
        f"{name}.lora_down.weight": down_t.to(dtype).contiguous(),
        f"{name}.lora_up.weight": up_t.to(dtype).contiguous(),
        f"{name}.alpha": stored,
    }
