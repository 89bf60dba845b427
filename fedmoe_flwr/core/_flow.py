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
_PRUNE_MIN_ARCS = 200_000  # below this the full problem solves in tens of ms: no pruning
_PRUNE_MARGIN = 8  # experts kept per client beyond what it can hold, plus
_PRUNE_MARGIN_SHARE = 0.25  # this share of its cap (near-ties grow with the cap)
_PRUNE_ROUNDS = 3
_KEEP_ALL_FRACTION = 2.0  # clients that can hold half the experts keep all their arcs
_PRUNE_MAX_SHARE = 0.4  # a pruned problem with more of the arcs than this is no faster


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

    Large instances are first solved on a pruned arc set (:func:`_pruned_arcs`); the result is certified optimal for the full
    arc set by node potentials (:func:`_potentials`) under which no left-out arc has a
    negative reduced cost. Left-out arcs that violate it are added and the pruned problem
    solved again; after ``_PRUNE_ROUNDS`` (or if the pruned problem is infeasible) the
    full problem is solved. Either way the answer is the full problem's optimum.

    Args:
        s: ``[C, K]`` scores; E: ``[C, K]`` eligible pairs; lo, hi: ``[K]`` int bounds or
        None; k_lo, k_hi: ``[C]`` int count bounds (``k_hi`` at most the eligible count).
    Returns:
        ``(x, state)``: ``x`` the ``[C, K]`` bool optimum or None; ``state`` "optimal",
        "infeasible" or "error" (OR-Tools refused the ranges: the caller uses HiGHS).
    """
    C, K = s.shape
    col_cnt = E.sum(axis=0)
    lo_k = np.zeros(K, np.int64) if lo is None else np.maximum(np.asarray(lo, np.int64), 0)
    hi_k = col_cnt if hi is None else np.minimum(np.asarray(hi, np.int64), col_cnt)
    k_lo = np.asarray(k_lo, np.int64)
    k_hi = np.asarray(k_hi, np.int64)
    if (lo_k > hi_k).any() or (k_lo > k_hi).any():
        return None, "infeasible"  # e.g. an expert needs more holders than can hold it
    cost, _ = integer_costs(np.where(E, s, 0.0), C + K + 1)
    net = _Network(C, K, lo_k, hi_k, k_lo, k_hi)
    n_arcs = int(np.count_nonzero(E))
    if n_arcs > _PRUNE_MIN_ARCS:
        A = _pruned_arcs(cost, E, net)
        for _ in range(_PRUNE_ROUNDS):
            if A.sum() >= _PRUNE_MAX_SHARE * n_arcs:
                break
            x, _ = net.solve(A, cost)
            if x is None:
                break  # infeasible on the pruned arcs says nothing: solve in full
            d = _potentials(net, x, A, cost)
            if d is None:
                break
            d_c, d_k = d
            violated = E & ~A & (d_c[:, None] - d_k[None, :] - cost < 0)
            if not violated.any():
                return x, "optimal"
            A |= violated
    return net.solve(E, cost)


def _pruned_arcs(cost, E, net):
    """Arcs likely in the optimum: each client's ``k_hi + margin`` best (margin 8 plus a
    quarter of ``k_hi``), all arcs of a
    client that can hold half the experts (its choice among many near-ties is set by the
    balance prices), and each expert's ``max(hi) + margin`` best clients relative to what
    the client's last slot is worth (so every expert keeps enough candidates). Prices are
    not estimated: a sample's prices proved worse than none."""
    C, K = E.shape
    key = np.where(E, cost.astype(np.float64), -np.inf)
    srt = -np.sort(-key, axis=1)
    rows = np.arange(C)
    keep = net.k_hi + _PRUNE_MARGIN + (net.k_hi * _PRUNE_MARGIN_SHARE).astype(np.int64)
    A = key >= srt[rows, np.clip(keep, 1, K) - 1][:, None]
    last = srt[rows, np.clip(net.k_hi, 1, K) - 1]  # the client's marginal slot
    rel = key - np.where(np.isfinite(last), last, 0.0)[:, None]
    A |= (net.k_hi * _KEEP_ALL_FRACTION >= K)[:, None]
    m = min(C, max(1, int(net.hi_k.max(initial=0)) + _PRUNE_MARGIN))
    thr = np.partition(np.ascontiguousarray(rel.T), C - m, axis=1)[:, C - m]  # rows: faster
    return E & (A | (rel >= thr[None, :]))


class _Network:
    """The flow network of one b-matching; solves it on any eligible arc subset."""

    def __init__(self, C, K, lo_k, hi_k, k_lo, k_hi):
        self.C, self.K = C, K
        self.lo_k, self.hi_k, self.k_lo, self.k_hi = lo_k, hi_k, k_lo, k_hi

    def solve(self, A, cost):
        """Optimal ``x`` using only arcs in ``A``: (x, state)."""
        C, K = self.C, self.K
        ci, ki = np.nonzero(A)
        sink = C + K
        f = _mcf.SimpleMinCostFlow()
        f.add_arcs_with_capacity_and_unit_cost(
            np.concatenate([ci, np.arange(C), C + np.arange(K)]),
            np.concatenate([C + ki, np.full(C, sink), np.full(K, sink)]),
            np.concatenate([np.ones(ci.size, np.int64), self.k_hi - self.k_lo, self.hi_k - self.lo_k]),
            np.concatenate([-cost[ci, ki], np.zeros(C + K, np.int64)]),
        )
        supply = np.concatenate([self.k_hi, -self.lo_k, [int(self.lo_k.sum() - self.k_hi.sum())]])
        f.set_nodes_supplies(np.arange(C + K + 1), supply)
        status = f.solve()
        if status == _mcf.SimpleMinCostFlow.INFEASIBLE:
            return None, "infeasible"
        if status != _mcf.SimpleMinCostFlow.OPTIMAL:
            return None, "error"
        x = np.zeros((C, K), bool)
        x[ci, ki] = f.flows(np.arange(ci.size)) > 0
        return x, "optimal"


def _potentials(net, x, A, cost):
    """Node potentials ``(d_c, d_k)`` of the residual network of an optimal ``x`` on ``A``.

    Bellman-Ford from a virtual root (all distances start at 0), vectorised over the
    bipartite structure: clients, experts and the sink. Reduced costs
    ``cost(u, v) + d[u] - d[v]`` are then >= 0 on every residual arc; a left-out arc
    ``(c, k)`` keeps ``x`` optimal iff ``-cost[c, k] + d_c[c] - d_k[k] >= 0``. Integer
    costs make this exact. None if it has not converged within the bound (it always
    converges for an optimal ``x``; the bound only guards the run time).
    """
    C, K = x.shape
    count, col = x.sum(axis=1), x.sum(axis=0)
    # residual arcs: held (c, k): k -> c with +cost; unheld (c, k) in A: c -> k with -cost
    hc, hk = np.nonzero(x)
    uc, uk = np.nonzero(A & ~x)
    w_h, w_u = cost[hc, hk], -cost[uc, uk]
    h_start = np.flatnonzero(np.r_[True, hc[1:] != hc[:-1]]) if hc.size else np.zeros(0, int)
    h_rows = hc[h_start]
    order = np.argsort(uk, kind="stable")
    uc, uk, w_u = uc[order], uk[order], w_u[order]
    u_start = np.flatnonzero(np.r_[True, uk[1:] != uk[:-1]]) if uk.size else np.zeros(0, int)
    u_cols = uk[u_start]
    from_sink_c = count < net.k_hi  # the unused-slot arc c -> sink carries flow
    to_sink_c = count > net.k_lo
    from_sink_k = col > net.lo_k  # the expert's k -> sink arc carries flow
    to_sink_k = col < net.hi_k
    d_c, d_k, d_t = np.zeros(C, np.int64), np.zeros(K, np.int64), 0
    for _ in range(2 * K + 8):
        new_c = d_c.copy()
        if hc.size:
            np.minimum.at(new_c, h_rows, np.minimum.reduceat(d_k[hk] + w_h, h_start))
        new_c[from_sink_c] = np.minimum(new_c[from_sink_c], d_t)
        new_k = d_k.copy()
        if uc.size:
            np.minimum.at(new_k, u_cols, np.minimum.reduceat(new_c[uc] + w_u, u_start))
        new_k[from_sink_k] = np.minimum(new_k[from_sink_k], d_t)
        new_t = min(d_t, int(new_c[to_sink_c].min(initial=d_t)), int(new_k[to_sink_k].min(initial=d_t)))
        if new_t == d_t and np.array_equal(new_c, d_c) and np.array_equal(new_k, d_k):
            return d_c, d_k
        d_c, d_k, d_t = new_c, new_k, new_t
    return None
