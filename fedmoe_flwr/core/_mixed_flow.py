"""An incumbent and an upper bound for experts of mixed sizes (private; :mod:`._milp`).

With experts of a few sizes ("classes"), a client's memory and deadline rows are
knapsacks, but the client's feasible sets are described by how many experts of each
class it holds. Lagrangian relaxation of the balance rows with expert prices ``p`` splits
the problem per client:

    L(p) = sum_c max_{x_c feasible} sum_k (s[c, k] - p[k]) x[c, k] + sum_k max(p[k] lo[k], p[k] hi[k])

is an upper bound on the optimum for every ``p``, and each client's maximum is exact:
enumerate the counts of all classes but the largest, take the best experts of each class
(prefix sums of sorted reduced scores), and as many of the last class as pay off and fit.
The counts chosen at ``p`` cap a min-cost flow (client -> client-class -> expert), whose
optimum is a feasible assignment (an incumbent); its node potentials give the next
prices. A few rounds of this primal-dual loop give an incumbent and a bound whose gap is
known, before (or instead of) the MILP.
"""

from __future__ import annotations

import itertools
import time

import numpy as np

from ._flow import _PRUNE_MARGIN, _PRUNE_MIN_ARCS, _mcf, flow_available, integer_costs

_GRID_MAX = 4096  # count vectors enumerated per client; beyond, no incumbent (HiGHS only)


def class_incumbent(s, E, nbytes, rows, lo, hi, k_lo, k_hi, *, time_limit, target_gap, rounds=30):
    """Best incumbent of the primal-dual loop: ``(x, value, bound)`` or None.

    Args:
        s, E: ``[C, K]`` scores and eligible pairs; nbytes: ``[K]`` expert sizes (the
        classes); rows: ``[(costs [C, K], budget [C]), ...]`` knapsack rows (memory, and
        deadline unless folded); lo, hi: ``[K]`` bounds or None; k_lo, k_hi: ``[C]``.
    Returns None when some client's costs are not uniform within a class, the grid is
    too large, or no round found a feasible assignment.
    """
    if not flow_available():
        return None
    t0 = time.perf_counter()
    C, K = s.shape
    _, cls = np.unique(nbytes, return_inverse=True)
    G = int(cls.max()) + 1
    units = []
    for costs, budget in rows:
        u = _class_units(costs, E, cls, G, budget)
        if u is None:
            return None
        units.append((u, budget))
    col_cnt = E.sum(axis=0)
    lo_k = np.zeros(K) if lo is None else np.maximum(np.asarray(lo, np.float64), 0)
    hi_k = col_cnt.astype(np.float64) if hi is None else np.minimum(np.asarray(hi, np.float64), col_cnt)
    if (lo_k > hi_k).any():
        return None
    knap = _ClientKnapsack(E, cls, G, units, k_lo, k_hi)
    if knap.grid is None:
        return None
    cost, scale = integer_costs(np.where(E, s, 0.0), C * (G + 1) + K + 1)
    p = np.zeros(K)
    n_arcs = int(np.count_nonzero(E))
    best_x, best_val, bound = None, -np.inf, np.inf
    for _ in range(rounds):
        n, v, col = knap.best_counts(s - p)
        if n is None:
            return None  # some client has no feasible count vector: the stage is infeasible
        L = float(v.sum() + np.where(p > 0, p * hi_k, p * lo_k).sum())
        bound = min(bound, L)
        A = E if n_arcs <= _PRUNE_MIN_ARCS else _class_pruned(s - p, E, cls, n, hi_k)
        x, d_k = _capped_flow(cost, A, cls, n, lo_k.astype(np.int64), hi_k.astype(np.int64), k_lo)
        if x is not None:
            val = float((s * x).sum())
            if val > best_val:
                best_x, best_val = x, val
        if best_x is not None and _rel(bound, best_val) <= target_gap:
            break
        if time.perf_counter() - t0 > time_limit:
            break
        if x is not None and not np.array_equal(-d_k / scale, p):
            p = -d_k / scale  # the flow's duals: the balance prices given these counts
        else:  # Polyak subgradient step on L towards the best value known
            g = col - np.clip(col, lo_k, hi_k)
            g = np.where(p > 0, col - hi_k, np.where(p < 0, col - lo_k, g))
            if not g.any():
                break
            target = best_val if best_x is not None else L - 0.05 * abs(L)
            p = p + max(L - target, 1e-9 * abs(L)) / float(g @ g) * g
    if best_x is None:
        return None
    return best_x, best_val, bound


def _rel(bound, value):
    return max(0.0, (bound - value) / max(abs(value), 1e-9))


def _class_units(costs, E, cls, G, budget):
    """``[C, G]`` cost of one expert of each class per client (0 where the budget is
    infinite), or None if some client's costs differ within a class."""
    out = np.zeros((E.shape[0], G))
    for g in range(G):
        cols = cls == g
        e = E[:, cols]
        c = costs[:, cols]
        lo_c = np.where(e, c, np.inf).min(axis=1)
        hi_c = np.where(e, c, -np.inf).max(axis=1)
        has = e.any(axis=1) & np.isfinite(budget)
        if (has & (lo_c != hi_c)).any():
            return None
        out[:, g] = np.where(has, lo_c, 0.0)
    return out


class _ClientKnapsack:
    """Each client's best count vector (experts per class) at given reduced scores."""

    def __init__(self, E, cls, G, units, k_lo, k_hi):
        C = E.shape[0]
        self.E, self.cls, self.G = E, cls, G
        self.cols_g = [np.flatnonzero(cls == g) for g in range(G)]
        self.E_g = [E[:, c] for c in self.cols_g]
        self.elig = np.stack([E[:, cls == g].sum(axis=1) for g in range(G)], axis=1)  # [C, G]
        sizes = np.bincount(cls, minlength=G)
        self.last = int(np.argmax(sizes))  # the class chosen in closed form
        others = [g for g in range(G) if g != self.last]
        m = int(np.prod([sizes[g] + 1 for g in others])) if others else 1
        self.grid = None
        if m > _GRID_MAX:
            return
        self.others = others
        self.grid = np.array(list(itertools.product(*[range(sizes[g] + 1) for g in others])),
                             dtype=np.int64).reshape(m, len(others))  # [M, G-1]
        cnt = self.grid.sum(axis=1)  # [M]
        valid = np.ones((C, m), bool)
        room = np.minimum(self.elig[:, self.last][:, None], k_hi[:, None] - cnt[None, :]).astype(np.float64)
        for u, budget in units:
            used = u[:, others] @ self.grid.T if others else np.zeros((C, 1))  # [C, M]
            left = budget[:, None] - used
            valid &= used <= budget[:, None] + 1e-12 * np.abs(budget[:, None])
            ul = u[:, self.last][:, None]
            with np.errstate(divide="ignore", invalid="ignore"):
                fit = np.floor(np.where(ul > 0, left / np.where(ul > 0, ul, 1.0), np.inf))
                fit = np.where(np.isfinite(fit) & (used + fit * ul > budget[:, None]), fit - 1, fit)
            room = np.minimum(room, np.where(np.isnan(fit), 0.0, fit))
        for j, g in enumerate(others):
            valid &= self.grid[None, :, j] <= self.elig[:, g][:, None]
        self.lower = np.maximum(0, k_lo[:, None] - cnt[None, :])
        self.room = room
        self.valid = valid & (self.lower <= room) & (room >= 0)

    def best_counts(self, r):
        """``(n [C, G], value [C], col [K])`` maximising each client's reduced score (``col``:
        about how many clients would hold each expert, ties counted), or (None, None, None)."""
        C = r.shape[0]
        keys, srt, prefix, npos = [], [], [], []
        for g in range(self.G):
            key = np.where(self.E_g[g], r[:, self.cols_g[g]], -np.inf)
            v = -np.sort(-key, axis=1)
            keys.append(key)
            srt.append(v)
            npos.append((v > 0).sum(axis=1))
            prefix.append(np.concatenate([np.zeros((C, 1)), np.cumsum(np.where(v > -np.inf, v, 0.0), axis=1)], axis=1))
        n_last = np.clip(npos[self.last][:, None], self.lower, self.room).astype(np.int64)  # concave: clip
        n_last = np.where(self.valid, n_last, 0)
        val = np.take_along_axis(prefix[self.last], n_last, axis=1)
        for j, g in enumerate(self.others):
            val = val + prefix[g][:, self.grid[:, j]]
        val = np.where(self.valid, val, -np.inf)
        m = val.argmax(axis=1)
        best = val[np.arange(C), m]
        if not np.isfinite(best).all():
            return None, None, None
        n = np.zeros((C, self.G), np.int64)
        n[:, self.last] = n_last[np.arange(C), m]
        for j, g in enumerate(self.others):
            n[:, g] = self.grid[m, j]
        col = np.zeros(r.shape[1])
        for g in range(self.G):  # each client's n[c, g] best of class g (by threshold)
            thr = srt[g][np.arange(C), np.maximum(n[:, g], 1) - 1]
            take = (keys[g] >= thr[:, None]) & (n[:, g] > 0)[:, None]
            col[self.cols_g[g]] = take.sum(axis=0)
        return n, best, col


def _class_pruned(r, E, cls, n, hi_k):
    """The arcs a round's flow may use on a large instance (a heuristic: the bound does
    not depend on them): per client and class the ``n[c, g] + margin`` best by reduced
    score ``r``, and per expert its ``max(hi) + margin`` best clients."""
    C, K = E.shape
    key = np.where(E, r, -np.inf)
    keep = np.zeros((C, K), bool)
    for g in range(n.shape[1]):
        cols = np.flatnonzero(cls == g)
        v = -np.sort(-key[:, cols], axis=1)
        thr = v[np.arange(C), np.clip(n[:, g] + _PRUNE_MARGIN, 1, cols.size) - 1]
        keep[:, cols] = key[:, cols] >= thr[:, None]
    m = min(C, max(1, int(hi_k.max(initial=0)) + _PRUNE_MARGIN))
    keep |= key >= np.partition(np.ascontiguousarray(key.T), C - m, axis=1)[:, C - m][None, :]
    return E & keep


def _capped_flow(cost, E, cls, n, lo_k, hi_k, k_lo):
    """Best assignment holding at most ``n[c, g]`` experts of class ``g`` per client (and at
    least ``k_lo[c]`` in all), and its expert potentials; (None, None) if infeasible."""
    C, K = E.shape
    G = n.shape[1]
    ci, ki = np.nonzero(E)
    node_cg = C + ci * G + cls[ki]
    ex0 = C + C * G
    sink = ex0 + K
    supply_c = n.sum(axis=1)
    cg = np.arange(C * G)
    tails = np.concatenate([cg // G, node_cg, np.arange(C), ex0 + np.arange(K)])
    heads = np.concatenate([C + cg, ex0 + ki, np.full(C, sink), np.full(K, sink)])
    caps = np.concatenate([n.reshape(-1), np.ones(ci.size, np.int64), supply_c - k_lo, hi_k - lo_k])
    costs = np.concatenate([np.zeros(C * G, np.int64), -cost[ci, ki], np.zeros(C + K, np.int64)])
    f = _mcf.SimpleMinCostFlow()
    f.add_arcs_with_capacity_and_unit_cost(tails, heads, caps, costs)
    supply = np.zeros(sink + 1, np.int64)
    supply[:C] = supply_c
    supply[ex0:sink] = -lo_k
    supply[sink] = int(lo_k.sum() - supply_c.sum())
    f.set_nodes_supplies(np.arange(sink + 1), supply)
    if f.solve() != _mcf.SimpleMinCostFlow.OPTIMAL:
        return None, None
    flow = f.flows(np.arange(tails.size))
    x = np.zeros((C, K), bool)
    x[ci, ki] = flow[C * G:C * G + ci.size] > 0
    d = _residual_potentials(tails, heads, caps, costs, flow, sink + 1)
    # relative to the sink (an unused slot is worth 0), so prices p = -that / scale
    return x, (np.zeros(K) if d is None else (d[ex0:sink] - d[sink]).astype(np.float64))


def _residual_potentials(tails, heads, caps, costs, flow, n_nodes):
    """Bellman-Ford (vectorised, from a virtual root) on the residual network; None if it
    has not converged within the bound (only a run-time guard: an optimum has no
    negative cycle)."""
    fwd = flow < caps
    bwd = flow > 0
    t = np.concatenate([tails[fwd], heads[bwd]])
    h = np.concatenate([heads[fwd], tails[bwd]])
    w = np.concatenate([costs[fwd], -costs[bwd]])
    d = np.zeros(n_nodes, np.int64)
    for _ in range(n_nodes + 1):
        new = d.copy()
        np.minimum.at(new, h, d[t] + w)
        if np.array_equal(new, d):
            return d
        d = new
    return None
