"""Krum, Multi-Krum and Bulyan per aggregation group (docs/robustness.md#aggregators).

A group is the shared tensors (routers included) or one expert's tensors; its contributors
are the clients that returned it. Each rule picks the contributors whose (clipped) group
deltas the group's mean may use; :func:`fedmoe_flwr.core.aggregate.aggregate_experts` then
averages the picked ones (Krum, Multi-Krum: the usual weighted mean; Bulyan: a
coordinate-wise trimmed mean).

- Krum (Blanchard et al., NeurIPS 2017): the score of ``i`` is the sum of squared distances
  to its ``m - f - 2`` nearest neighbours; the lowest score is picked.
- Multi-Krum: the ``m - f`` lowest scores.
- Bulyan (El Mhamdi et al., ICML 2018): Krum applied ``m - 2f`` times, each pick removed
  from the pool; per coordinate, the ``f`` largest and ``f`` smallest picked values are cut
  and the ``m - 4f`` left are averaged (the paper keeps the ``m - 4f`` values nearest the
  median: the same window when it is centred on the median).

``f = max(1, floor(byzantine_fraction * m))`` per group. Krum and Multi-Krum need
``m >= 2f + 3`` contributors and Bulyan ``m >= 4f + 3``; a smaller group (with 2-5 holders
per expert: most of them) **falls back to the coordinate-wise median** and is counted.
"""

from __future__ import annotations

import math

import numpy as np

SELECTIONS = ("krum", "multikrum", "bulyan")


def assumed_byzantine(m: int, fraction: float) -> int:
    """``f`` of a group of ``m`` contributors: ``max(1, floor(fraction * m))``."""
    return max(1, int(math.floor(fraction * m)))


def enough(method: str, m: int, f: int) -> bool:
    """Whether ``m`` contributors are enough for ``method`` with ``f`` assumed malicious."""
    return m >= (4 * f + 3 if method == "bulyan" else 2 * f + 3)


def krum_scores(vectors: np.ndarray, f: int) -> np.ndarray:
    """``[m]`` Krum scores of the rows of ``vectors`` ``[m, d]`` (lower = more central)."""
    sq = np.sum(vectors * vectors, axis=1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * vectors @ vectors.T, 0.0)
    np.fill_diagonal(dist, np.inf)
    closest = max(1, len(vectors) - f - 2)
    return np.sort(dist, axis=1)[:, :closest].sum(axis=1)


def select(vectors: np.ndarray, method: str, f: int) -> list[int]:
    """Indices of the picked rows (sorted), by ``method`` (module doc); needs :func:`enough`."""
    m = len(vectors)
    if method == "krum":
        return [int(np.argmin(krum_scores(vectors, f)))]
    if method == "multikrum":
        return sorted(int(i) for i in np.argsort(krum_scores(vectors, f), kind="stable")[: m - f])
    if method == "bulyan":
        pool, picked = list(range(m)), []
        for _ in range(m - 2 * f):
            best = pool[int(np.argmin(krum_scores(vectors[pool], f)))]
            picked.append(best)
            pool.remove(best)
        return sorted(picked)
    raise ValueError(f"method must be one of {SELECTIONS}, got {method!r}")
