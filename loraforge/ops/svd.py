"""Batched SVDs for resize, merge and extract, and the rank cut-off rules.

Two batched factorisations, each grouping same-shaped inputs into one ``torch.linalg`` call:

- :func:`svd_of_products` — the SVD of ``up @ down`` without forming it: orthogonalise both
  factors through their ``r × r`` Gram matrices and SVD the small ``r × r`` core (see
  :func:`_product_svd`). Exact, and ``O((out + in)·r²)`` matrix products instead of an
  ``O(out·in·min(out, in))`` dense SVD.
- :func:`svd_dense` — the SVD of full matrices (extract, LoHa/LoKr/full deltas).

Rank rules (:func:`choose_rank`), with ``σ`` the singular values in decreasing order:

- ``fixed``: ``max_rank``.
- ``sv_ratio p``: keep every ``σᵢ ≥ σ₀ / p`` (the largest kept value is at most ``p`` times smaller
  than the first).
- ``sv_fro p``: the smallest ``k`` with ``‖σ[:k]‖₂ ≥ p · ‖σ‖₂`` (retain a fraction ``p`` of the
  Frobenius norm).
- ``sv_cumulative p``: the smallest ``k`` with ``Σσ[:k] ≥ p · Σσ``.

Every rule is then capped by ``max_rank`` and by the number of singular values, and is at least 1.
sd-scripts' ``networks/resize_lora.py`` computes the same index and then adds 1 to it in
``rank_resize`` (its ``index_sv_*`` helpers already return a count), so it keeps one singular value
more than its criterion asks for — e.g. ``sv_fro 0.9`` where 3 values reach 90 % keeps 4, and it
never goes below rank 2. We keep exactly the rank the criterion defines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

METHODS = ("fixed", "sv_ratio", "sv_fro", "sv_cumulative")

# Elements per stacked batch: on a GPU large batches amortise kernel launches; on a CPU batched
# LAPACK is a loop anyway and a batch that fits the cache is what helps.
_BATCH_ELEMENTS = {"cuda": 1 << 26, "cpu": 1 << 21}
# Gram eigenvalues below this fraction of the largest are rank deficiency, not signal.
_EIGEN_CUTOFF = 1e-13
# Relative slack when comparing accumulated fractions with the target, so p = 1.0 means "all".
_FRACTION_SLACK = 1e-9


@dataclass(frozen=True)
class Svd:
    """A thin SVD ``U diag(S) Vh`` (``U (out, m)``, ``S (m,)`` decreasing, ``Vh (m, in)``)."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor


def _chunks(indices: list[int], per_item: int, device: torch.device | str) -> list[list[int]]:
    budget = _BATCH_ELEMENTS["cuda" if torch.device(device).type == "cuda" else "cpu"]
    size = max(1, budget // max(per_item, 1))
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def svd_of_products(
    ups: Sequence[torch.Tensor],
    downs: Sequence[torch.Tensor],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
    batched: bool = True,
) -> list[Svd]:
    """The thin SVD of each ``ups[i] @ downs[i]`` (``(out, r) @ (r, in)``), batched by shape.

    Args:
        ups, downs: matching lists of 2-D factors.
        device: where to compute (results come back on the CPU as float32).
        dtype: the working precision (float64 default: the Gram matrices square the condition
            number, see :func:`_product_svd`).
        batched: default True; False runs one module at a time (for the benchmark).
    """
    results: list[Svd | None] = [None] * len(ups)
    groups: dict[tuple[int, int, int], list[int]] = {}
    for i, (up, down) in enumerate(zip(ups, downs, strict=True)):
        key = (int(up.shape[0]), int(up.shape[1]), int(down.shape[1]))
        groups.setdefault(key, []).append(i)
    for (out, rank, inn), members in groups.items():
        chunks = _chunks(members, (out + inn) * rank, device) if batched else [[i] for i in members]
        for chunk in chunks:
            a = torch.stack([ups[i] for i in chunk]).to(device=device, dtype=dtype)
            b = torch.stack([downs[i] for i in chunk]).to(device=device, dtype=dtype)
            u, s, vh = (x.to("cpu", torch.float32) for x in _product_svd(a, b))
            for j, i in enumerate(chunk):
                results[i] = Svd(u[j], s[j], vh[j])
    return [r for r in results if r is not None]


def _per_matrix(decompose, batch: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Run a LAPACK decomposition on a batch: in one call on a GPU, matrix by matrix on a CPU.

    CPU LAPACK has no batched kernels: torch loops over the batch inside a parallel region, which
    nests with MKL's own threads and oversubscribes the cores (measured several times slower than
    a plain loop on 2 shared cores). The batched matrix products around it stay batched.
    """
    if batch.device.type != "cpu":
        return decompose(batch)
    parts = [decompose(m) for m in batch]
    return tuple(torch.stack(p) for p in zip(*parts, strict=True))


def _gram_root(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For ``x (B, n, r)``: ``x = P diag(root) Wᵀ`` with ``P`` orthonormal, from ``xᵀx = W Λ Wᵀ``.

    Returns ``(W, root, inverse root)``; directions whose eigenvalue is negligible (rank
    deficiency, e.g. an untrained all-zero ``up``) get root 0 and inverse root 0.
    """
    lam, w = _per_matrix(torch.linalg.eigh, x.transpose(1, 2) @ x)
    lam = lam.clamp_min(0.0)
    keep = lam > lam[..., -1:] * _EIGEN_CUTOFF
    root = torch.where(keep, lam.sqrt(), torch.zeros_like(lam))
    inverse = torch.where(
        keep, 1.0 / root.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(lam)
    )
    return w, root, inverse


def _product_svd(
    up: torch.Tensor, down: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched thin SVD of ``up @ down`` through the ``r × r`` Gram matrices of both factors.

    ``up = Pu Ru``, ``downᵀ = Pd Rd`` with ``R = diag(root) Wᵀ`` (:func:`_gram_root`), so
    ``up @ down = Pu (Ru Rdᵀ) Pdᵀ``; the small core's SVD ``Uc S Vcᵀ`` gives ``U = Pu Uc`` and
    ``Vᵀ = Vcᵀ Pdᵀ``. Everything large is a matrix product (no QR of the tall factors), which is
    what makes it fast; working in float64 keeps singular values down to ~1e-7 of the largest.
    """
    wu, root_u, inv_u = _gram_root(up)
    wd, root_d, inv_d = _gram_root(down.transpose(1, 2))
    core = root_u.unsqueeze(2) * (wu.transpose(1, 2) @ wd) * root_d.unsqueeze(1)
    uc, s, vch = _per_matrix(lambda m: torch.linalg.svd(m, full_matrices=False), core)
    u = up @ (wu * inv_u.unsqueeze(1) @ uc)
    vh = (vch @ (wd * inv_d.unsqueeze(1)).transpose(1, 2)) @ down
    return u, s, vh


def svd_dense(
    mats: Sequence[torch.Tensor],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_rank: int | None = None,
) -> list[Svd]:
    """The thin SVD of each 2-D matrix, batched by shape.

    Args:
        mats: the matrices.
        device, dtype: where and in which precision to compute (results come back on the CPU).
        max_rank: default all; keep only this many leading singular triplets on the way back
            (the singular values are all kept, for reporting).
    """
    results: list[Svd | None] = [None] * len(mats)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, m in enumerate(mats):
        groups.setdefault((int(m.shape[0]), int(m.shape[1])), []).append(i)
    for (rows, cols), members in groups.items():
        for chunk in _chunks(members, rows * cols, device):
            x = torch.stack([mats[i] for i in chunk]).to(device=device, dtype=dtype)
            u, s, vh = _per_matrix(lambda m: torch.linalg.svd(m, full_matrices=False), x)
            keep = s.shape[-1] if max_rank is None else min(max_rank, s.shape[-1])
            u, vh, s = u[..., :keep].cpu(), vh[..., :keep, :].cpu(), s.cpu()
            for j, i in enumerate(chunk):
                results[i] = Svd(u[j], s[j], vh[j])
    return [r for r in results if r is not None]


def choose_rank(s: torch.Tensor, method: str, param: float | None, max_rank: int) -> int:
    """The rank to keep for singular values ``s`` (decreasing) under a rank rule.

    Args:
        s: singular values, decreasing.
        method: one of :data:`METHODS`.
        param: the rule's parameter (``sv_ratio`` ≥ 1, ``sv_fro``/``sv_cumulative`` in (0, 1]).
        max_rank: the cap (``--rank``).

    Returns:
        A rank in ``[1, min(max_rank, len(s))]``.

    Raises:
        ValueError: an unknown method or a parameter out of range.
    """
    n = int(s.numel())
    cap = max(1, min(max_rank, n))
    if method == "fixed":
        return cap
    check_param(method, param)
    assert param is not None
    values = s.detach().to("cpu", torch.float64)
    if n == 0 or float(values[0]) <= 0.0:
        return 1
    if method == "sv_ratio":
        k = int((values >= values[0] / param).sum())
    else:
        weights = values.square() if method == "sv_fro" else values
        target = param**2 if method == "sv_fro" else param
        fractions = torch.cumsum(weights, 0) / weights.sum()
        k = int((fractions < target - _FRACTION_SLACK).sum()) + 1
    return max(1, min(k, cap))


def check_param(method: str, param: float | None) -> None:
    """Validate a rank rule's parameter.

    Raises:
        ValueError: naming the valid range.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if method == "fixed":
        return
    if param is None:
        raise ValueError(f"--method {method} needs --param")
    if method == "sv_ratio" and not param >= 1.0:
        raise ValueError(f"sv_ratio takes a ratio >= 1 (largest/smallest kept value), got {param}")
    if method in ("sv_fro", "sv_cumulative") and not 0.0 < param <= 1.0:
        raise ValueError(f"{method} takes a fraction in (0, 1], got {param}")
