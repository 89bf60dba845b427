"""Min-cost flow for the count-capped assignment (private; :mod:`fedmoe_flwr.core.assign`).

When every client's memory and deadline reduce to a cap on how many experts it holds,
the assignment is a bipartite b-matching: maximise ``sum s[c, k] x[c, k]`` over eligible
pairs with ``k_lo[c] <= sum_k x[c, k] <= k_hi[c]`` and ``lo[k] <= sum_c x[c, k] <= hi[k]``.
It is solved exactly as a min-cost flow (OR-Tools' cost-scaling push-relabel, C++):

- client ``c`` supplies ``k_hi[c]`` units; each goes to an eligible expert (capacity 1,
  cost ``-s[c, k]``) or straight to the sink as an unused slot (capacity
  ``k_hi[c] - k_lo[c]``, cost 0), so at least ``k_lo[c]`` reach experts;
- expert ``k`` consumes ``lo[k]`` units itself and passes up to ``hi[k] - lo[k]`` more to
  the sink (the standard lower-bound transformation).

Scores are scaled to integers with the largest magnitude OR-Tools accepts for the node
count (at most 2**40): the flow is optimal for the rounded scores, which differ from the
true ones by at most ``max|s| * 2**-41`` per pair.
"""

from __future__ import annotations

import numpy as np

try:  # OR-Tools is a declared dependency; without it the caller falls back to HiGHS
    from ortools.graph.python import min_cost_flow as _mcf
except ImportError:  # pragma: no cover - exercised only where ortools is missing
    _mcf = None

_MAX_COST = 2**40  # cost resolution; OR-Tools also needs max|cost| * (nodes + 1) < 2**63


def flow_available() -> bool:
    return _mcf is not None


def integer_costs(s: np.ndarray, nodes: int) -> tuple[np.ndarray, float]:
    """``round(s * scale)`` as int64, the largest scale OR-Tools accepts (and the scale)."""
    top = float(np.abs(s).max(initial=0.0))
    cap = min(_MAX_COST, (2**62) // (nodes + 1))
    scale = cap / top if top > 0 else 1.0
    return np.rint(s * scale).astype(np.int64), scale


def solve_count_flow(s, E, lo, hi, k_lo, k_hi):
    """The optimal b-matching, or None if the bounds cannot all hold.

    Args:
        s: ``[C, K]`` scores; E: ``[C, K]`` eligible pairs; lo, hi: ``[K]`` int bounds or
        None; k_lo, k_hi: ``[C]`` int count bounds (``k_hi`` at most the eligible count).
    Returns:
        ``(x, state)``: ``x`` the ``[C, K]`` bool optimum or None; ``state`` "optimal" or
        "infeasible".
    """
    C, K = s.shape
    ci, ki = np.nonzero(E)
    col_cnt = np.bincount(ki, minlength=K)
    lo_k = np.zeros(K, np.int64) if lo is None else np.maximum(np.asarray(lo, np.int64), 0)
    hi_k = col_cnt if hi is None else np.minimum(np.asarray(hi, np.int64), col_cnt)
    if (lo_k > hi_k).any() or (k_lo > k_hi).any():
        return None, "infeasible"  # e.g. an expert needs more holders than can hold it
    k_lo = np.asarray(k_lo, np.int64)
    k_hi = np.asarray(k_hi, np.int64)
    sink = C + K
    cost_ck, _ = integer_costs(s[ci, ki], C + K + 1)
    f = _mcf.SimpleMinCostFlow()
    f.add_arcs_with_capacity_and_unit_cost(
        np.concatenate([ci, np.arange(C), C + np.arange(K)]),
        np.concatenate([C + ki, np.full(C, sink), np.full(K, sink)]),
        np.concatenate([np.ones(ci.size, np.int64), k_hi - k_lo, hi_k - lo_k]),
        np.concatenate([-cost_ck, np.zeros(C + K, np.int64)]),
    )
    supply = np.concatenate([k_hi, -lo_k, [int(lo_k.sum() - k_hi.sum())]])
    f.set_nodes_supplies(np.arange(C + K + 1), supply)
    status = f.solve()
    if status == _mcf.SimpleMinCostFlow.INFEASIBLE:
        return None, "infeasible"
    if status != _mcf.SimpleMinCostFlow.OPTIMAL:  # cost/capacity range: let HiGHS try
        return None, "error"
    x = np.zeros((C, K), bool)
    x[ci, ki] = f.flows(np.arange(ci.size)) > 0
    return x, "optimal"
