"""Aggregating LoRA adapters without the bias of averaging A and B separately.

A client's update to a weight is ``B_i @ A_i``. Averaging the factors gives
``mean(B) @ mean(A)``, which is not ``mean(B @ A)`` (two clients with orthogonal adapters
average to a quarter of their mean update, with cross terms nobody trained). The fixes in
the literature: FLoRA stacks the factors (rank grows with the clients), FlexLoRA averages
the products and re-factorises them by SVD. :func:`merge_pair` does the latter: the
weighted mean product, truncated to the adapters' rank r, which is the best rank-r
approximation of the mean (Eckart-Young), hence never further from it than the factor
average. Per expert, only the clients that held the expert contribute
(:func:`~fedmoe_flwr.core.aggregate.aggregate_experts` calls it for the layout's
``lora_pairs``). Plain numpy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["LORA_AGGREGATIONS", "factorise", "lora_pairs", "mean_product", "merge_lora", "merge_pair"]

LORA_AGGREGATIONS = ("product", "factors")
"""``product``: mean of B @ A re-factorised (unbiased up to rank r); ``factors``: A and B averaged separately."""


def lora_pairs(names: Iterable[str]) -> dict[str, str]:
    """``{A name: B name}`` for every adapter among ``names`` (``.lora_A`` / ``.lora_B``, wire rows too)."""
    names = set(names)
    return {n: n.replace(".lora_A", ".lora_B") for n in sorted(names)
            if ".lora_A" in n and n.replace(".lora_A", ".lora_B") in names}


def mean_product(As: Sequence[np.ndarray], Bs: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """``sum_i w_i B_i @ A_i / sum_i w_i`` (float64); A ``[..., r, in]``, B ``[..., out, r]``."""
    w = np.asarray(weights, dtype=np.float64)
    if len(As) != len(Bs) or len(As) != len(w) or not len(w):
        raise ValueError(f"need as many A, B and weights (>= 1); got {len(As)}, {len(Bs)}, {len(w)}")
    if (w < 0).any() or not np.isfinite(w).all():
        raise ValueError(f"weights must be finite and >= 0, got {w.tolist()}")
    w = w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / len(w))  # all-zero weights: equal
    return sum(wi * (np.asarray(B, np.float64) @ np.asarray(A, np.float64)) for wi, A, B in zip(w, As, Bs))


def factorise(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """``(A [..., r, in], B [..., out, r])`` with ``B @ A`` the best rank-r approximation of delta.

    The singular values are split evenly (``A = sqrt(S) V^T``, ``B = U sqrt(S)``), so both
    factors keep comparable scales for the next round's gradient steps.
    """
    U, S, Vt = np.linalg.svd(delta, full_matrices=False)
    r = min(rank, S.shape[-1])
    root = np.sqrt(S[..., :r])
    A = root[..., :, None] * Vt[..., :r, :]
    B = U[..., :, :r] * root[..., None, :]
    if r < rank:  # pad with zero directions so the shapes stay [r, in] / [out, r]
        A = np.concatenate([A, np.zeros((*A.shape[:-2], rank - r, A.shape[-1]))], axis=-2)
        B = np.concatenate([B, np.zeros((*B.shape[:-1], rank - r))], axis=-1)
    return A, B


def merge_pair(As, Bs, weights) -> tuple[np.ndarray, np.ndarray]:
    """New ``(A, B)`` for one adapter from the clients' ``(A_i, B_i)``: the mean product at rank r."""
    rank = np.asarray(As[0]).shape[-2]
    A, B = factorise(mean_product(As, Bs, weights), rank)
    return A.astype(np.asarray(As[0]).dtype), B.astype(np.asarray(Bs[0]).dtype)


def merge_lora(
    updates: Sequence[Mapping[str, np.ndarray]],
    pairs: Mapping[str, str],
    weight_of: Callable[[int, str], float],
) -> dict[str, np.ndarray]:
    """Product-averaged adapters for every pair ``{A name: B name}`` some update holds.

    ``weight_of(i, a_name)`` is update i's weight for that adapter (e.g. the tokens routed
    to its expert, or its sample count for shared adapters). Returns ``{name: array}`` for
    the A and B names that had contributors; use it to overwrite the factor averages.
    """
    out: dict[str, np.ndarray] = {}
    for a, b in pairs.items():
        holders = [i for i, u in enumerate(updates) if a in u and b in u]
        if not holders:
            continue
        out[a], out[b] = merge_pair(
            [updates[i][a] for i in holders], [updates[i][b] for i in holders], [weight_of(i, a) for i in holders]
        )
    return out
