"""One stage of :mod:`fedmoe_flwr.core.assign` (private): reduce, dispatch, solve.

Reduces memory and deadline rows to per-client count caps where the client's experts
cost the same, then dispatches: a pure count-capped problem to the min-cost flow
(:mod:`._flow`); a problem with knapsack rows to the primal-dual incumbent
(:mod:`._mixed_flow`) and to HiGHS. The HiGHS program is sparse over the eligible
(client, expert) pairs: LP relaxation first (integral for a bipartite degree-bound
system), then a restricted MILP incumbent, then the full MILP.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, milp

from ._flow import flow_available, solve_count_flow
from ._mixed_flow import class_incumbent


_HIGHS_MAX_PAIRS = 300_000


def max_count_fitting(costs: np.ndarray, eligible: np.ndarray, budget: np.ndarray) -> np.ndarray:
    """Per row, the most eligible items whose costs fit ``budget`` (cheapest first)."""
    c = np.sort(np.where(eligible, costs, np.inf), axis=1)
    return (np.cumsum(c, axis=1) <= budget[:, None]).sum(axis=1)


def _uniform_cap(costs: np.ndarray, E: np.ndarray, budget: np.ndarray):
    """Rows whose eligible costs are all equal, and how many such items fit the budget
    (the eligible count for other rows). Division, not a sort: O(C K)."""
    lo_c = np.where(E, costs, np.inf).min(axis=1)
    hi_c = np.where(E, costs, -np.inf).max(axis=1)
    n_elig = E.sum(axis=1)
    uniform = (lo_c == hi_c) | (n_elig == 0)
    unit = np.where(uniform & (n_elig > 0), lo_c, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        n = np.floor(np.where(unit > 0, budget / np.where(unit > 0, unit, 1.0), np.inf))
        n = np.where(np.isnan(n), 0.0, n)
        n = np.where(np.isfinite(n) & (n * unit > budget), n - 1, n)  # guard the division's rounding
    n = np.where(budget < 0, -1.0, n)  # nothing fits, not even a free item
    cap = np.where(uniform, np.clip(n, 0, n_elig), n_elig).astype(np.int64)
    return uniform, cap


def _budget_rows(E, nbytes, memory, tpe, slack):
    """The memory and deadline rows as (costs [C, K], budget [C]) pairs, tightened.

    A client whose per-expert times are proportional to expert bytes (the transfer-only
    time model) has its deadline folded into its byte budget (``slack / ratio``), leaving
    one knapsack row instead of two. With integer byte sizes, byte budgets are rounded
    down to a multiple of the gcd of the client's eligible sizes (valid: every feasible
    load is such a multiple), which tightens the LP relaxation.
    """
    C, K = E.shape
    costs_b = np.broadcast_to(nbytes, (C, K))
    budget = memory.copy()
    rows = []
    if tpe is not None:
        ok = E & (nbytes > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = tpe / nbytes
        rmin = np.where(ok, ratio, np.inf).min(axis=1)
        rmax = np.where(ok, ratio, -np.inf).max(axis=1)
        prop = ok.any(axis=1) & (rmin > 0) & np.isfinite(rmin) & (rmax - rmin <= 1e-12 * rmax)
        prop &= ~(E & (nbytes <= 0)).any(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            budget = np.where(prop, np.minimum(budget, slack / rmin * (1 + 1e-9)), budget)
        if (~prop).any():
            rows.append((tpe, np.where(prop, np.inf, slack)))
    # (equal sizes: every budget is already a whole number of experts, nothing to tighten)
    if np.all(nbytes == np.round(nbytes)) and nbytes.max(initial=0) < 2**52 and np.ptp(nbytes) > 0:
        b_int = nbytes.astype(np.int64)
        g = np.gcd.reduce(np.where(E, b_int[None, :], 0), axis=1).astype(np.float64)
        fin = (g > 0) & np.isfinite(budget)
        budget = np.where(fin, np.floor(budget / np.where(fin, g, 1.0)) * g, budget)
    rows.insert(0, (costs_b, budget))
    return rows


def solve_stage(s, E, nbytes, memory, tpe, slack, lo, hi, k_lo, k_hi, *, force_milp, time_limit, gap,
                use_flow=True):
    """One solve of the (possibly relaxed) problem. Returns (x, state, gap, method, engine).

    ``state`` is "optimal", "time_limit", "infeasible" or "error"; ``x`` is None unless a
    solution was found. When every client reduces to a count cap (no knapsack row) and
    ``use_flow``, the problem is a b-matching solved exactly by min-cost flow (method
    "lp": its LP relaxation is integral; engine "flow"); otherwise HiGHS.
    """
    C, K = s.shape
    cnt_hi = np.minimum(k_hi, E.sum(axis=1))
    t0 = time.perf_counter()
    knap = []  # (row mask, costs [C, K], budget [C]) kept as knapsack rows
    budget_rows = _budget_rows(E, nbytes, memory, tpe, slack)
    for costs, budget in budget_rows:
        binding = (np.where(E, costs, 0.0)).sum(axis=1) > budget
        uniform, cap = _uniform_cap(costs, E, budget)
        red = binding & uniform
        cnt_hi = np.where(red, np.minimum(cnt_hi, cap), cnt_hi)
        if (binding & ~uniform).any():
            knap.append((binding & ~uniform, costs, budget))
    if (k_lo > cnt_hi).any():
        return None, "infeasible", None, "lp", "none"
    if not E.any():
        return np.zeros((C, K), bool), "optimal", 0.0, "lp", "none"
    if not knap and not force_milp and use_flow and flow_available():
        x, state = solve_count_flow(s, E, lo, hi, k_lo, cnt_hi)
        if state != "error":
            return x, state, (0.0 if x is not None else None), "lp", "flow"
    inc = None  # (x, value, upper bound) of the mixed-size primal-dual loop
    if knap and not force_milp and use_flow:
        # past _HIGHS_MAX_PAIRS variables HiGHS cannot improve on the loop within seconds
        # (building its model alone takes that long): the loop gets all the time
        big = int(np.count_nonzero(E)) > _HIGHS_MAX_PAIRS
        inc = class_incumbent(s, E, nbytes, budget_rows, lo, hi, k_lo, cnt_hi,
                              time_limit=time_limit if big else time_limit / 4, target_gap=gap,
                              rounds=1000 if big else 30)
        if inc is not None and (big or _rel_gap(-inc[2], -inc[1]) <= gap):
            g = _rel_gap(-inc[2], -inc[1])
            return inc[0], ("optimal" if g <= gap else "time_limit"), g, "milp", "flow_lagrange"
    time_limit -= time.perf_counter() - t0
    ci, ki = np.nonzero(E)
    n = ci.size
    j = np.arange(n)
    rows = []
    need = (k_lo > 0) | (cnt_hi < E.sum(axis=1))
    if need.any():
        a = sp.csr_array((np.ones(n), (ci, j)), shape=(C, n))[np.flatnonzero(need)]
        rows.append(LinearConstraint(a, k_lo[need], cnt_hi[need]))
    for mask, costs, budget in knap:
        sel = np.flatnonzero(mask)
        pick = mask[ci]
        rmap = np.full(C, -1)
        rmap[sel] = np.arange(sel.size)
        scale = np.where(E, costs, 0.0).max(axis=1)[sel]  # row scaling, for HiGHS numerics
        vals = costs[ci[pick], ki[pick]] / scale[rmap[ci[pick]]]
        a = sp.csr_array((vals, (rmap[ci[pick]], j[pick])), shape=(sel.size, n))
        rows.append(LinearConstraint(a, -np.inf, budget[sel] / scale))
    col_cnt = E.sum(axis=0)
    lo_k = np.zeros(K) if lo is None else lo.astype(np.float64)
    hi_k = np.full(K, np.inf) if hi is None else hi.astype(np.float64)
    need_k = (lo_k > 0) | (hi_k < col_cnt)
    if need_k.any():
        a = sp.csr_array((np.ones(n), (ki, j)), shape=(K, n))[np.flatnonzero(need_k)]
        rows.append(LinearConstraint(a, lo_k[need_k], hi_k[need_k]))
    obj = -s[ci, ki]
    top = float(np.abs(obj).max())
    obj = obj / top if top > 0 else obj  # HiGHS minimises; costs scaled to max |c| = 1
    xv, state, mgap, method = _solve_program(obj, rows, force_milp, time_limit, gap)
    engine = "highs_lp" if method == "lp" else "highs_milp"
    x = None
    if xv is not None:
        x = np.zeros((C, K), bool)
        x[ci, ki] = xv > 0.5
    if inc is None:
        return x, state, mgap, method, engine
    return _better_of(s, x, state, mgap, inc, gap)


def _better_of(s, x, state, mgap, inc, gap):
    """The better of HiGHS's answer and the primal-dual incumbent, with the gap between
    it and the tighter of their upper bounds (scores are maximised)."""
    x_inc, v_inc, bound = inc
    if x is not None and mgap is not None:
        v = float((s * x).sum())
        bound = min(bound, v + mgap * abs(v))  # HiGHS's bound, in score units
    if x is not None and float((s * x).sum()) >= v_inc:
        best, engine = x, "highs_milp"
    else:
        best, engine = x_inc, "flow_lagrange"
    if x is not None and state == "optimal" and mgap is not None and mgap <= gap and engine == "highs_milp":
        return best, "optimal", mgap, "milp", engine
    g = _rel_gap(-bound, -float((s * best).sum()))
    return best, ("optimal" if g <= gap else "time_limit"), g, "milp", engine


def _solve_program(obj, rows, force_milp, time_limit, gap):
    """Minimise ``obj @ x`` over ``x`` in {0,1}^n subject to ``rows``.

    First the LP relaxation: its optimum is returned when integral (always so for a
    bipartite degree-bound system). Otherwise a quick incumbent (the MILP restricted to
    the LP's support) is returned if its gap to the LP bound is within ``gap``; else
    HiGHS solves the full MILP in the remaining time and the better solution wins.
    ``force_milp`` (``method="milp"``) goes straight to the full MILP.
    Returns (x, state, relative gap, method).
    """
    t0 = time.perf_counter()
    n = obj.size
    left = lambda: time_limit - (time.perf_counter() - t0)  # noqa: E731
    if force_milp:
        res = _highs(obj, rows, n, True, left(), gap)
        if res.x is None:
            return None, ("infeasible" if res.status == 2 else "error"), None, "milp"
        return res.x, ("optimal" if res.status == 0 else "time_limit"), _gap_of(res, obj @ res.x), "milp"
    lp = _highs(obj, rows, n, False, left(), gap)
    if lp.x is None:
        return None, ("infeasible" if lp.status == 2 else "error"), None, "lp"
    if lp.status == 0 and np.abs(lp.x - np.round(lp.x)).max(initial=0.0) <= 1e-6:
        return np.round(lp.x), "optimal", 0.0, "lp"
    bound = float(lp.fun)  # a lower bound on the MILP's minimum
    best = _fix_and_solve(obj, rows, lp.x, left(), gap)
    if best is not None:
        best_gap = _rel_gap(bound, float(obj @ best))
        if best_gap <= gap or left() <= 0:
            return best, ("optimal" if best_gap <= gap else "time_limit"), best_gap, "milp"
    res = _highs(obj, rows, n, True, left(), gap)
    if res.x is not None and (best is None or obj @ res.x <= obj @ best):
        return res.x, ("optimal" if res.status == 0 else "time_limit"), _gap_of(res, obj @ res.x), "milp"
    if best is None:
        return None, ("infeasible" if res.status == 2 else "error"), None, "milp"
    if res.status == 0:  # HiGHS proved its solution optimal and the incumbent is no worse
        return best, "optimal", 0.0, "milp"
    bound = max(bound, float(getattr(res, "mip_dual_bound", bound) or bound))
    return best, "time_limit", _rel_gap(bound, float(obj @ best)), "milp"


def _rel_gap(bound: float, value: float) -> float:
    """HiGHS-style relative gap between a minimisation's bound and a solution value."""
    return max(0.0, (value - bound) / max(abs(value), 1e-9))


def _gap_of(res, value) -> float | None:
    g = getattr(res, "mip_gap", None)
    if g is not None and np.isfinite(g):
        return float(g)
    db = getattr(res, "mip_dual_bound", None)
    return None if db is None or not np.isfinite(db) else _rel_gap(float(db), float(value))


def _fix_and_solve(obj, rows, xlp, time_limit, gap):
    """RENS-style incumbent: solve the MILP restricted to the LP's support (x_lp > 0)."""
    if time_limit <= 0:
        return None
    free = np.flatnonzero(xlp > 1e-6)
    sub = []
    for r in rows:
        Af = sp.csr_array(sp.csr_array(r.A)[:, free])
        m = Af.shape[0]
        has = np.diff(Af.indptr) > 0
        lb, ub = np.broadcast_to(r.lb, (m,)), np.broadcast_to(r.ub, (m,))
        if ((~has) & ((lb > 1e-7) | (ub < -1e-7))).any():
            return None
        if has.any():
            sub.append(LinearConstraint(Af[np.flatnonzero(has)], lb[has], ub[has]))
    res = _highs(obj[free], sub, free.size, True, time_limit, gap)
    if res.x is None:
        return None
    x = np.zeros_like(xlp)
    x[free] = np.round(res.x)
    return x


def _highs(obj, rows, n, integral, time_limit, gap):
    opts = {"time_limit": max(float(time_limit), 1e-3), "disp": False}
    if integral:
        opts["mip_rel_gap"] = gap
    return milp(
        obj,
        constraints=rows,
        integrality=np.ones(n) if integral else None,
        bounds=Bounds(0.0, 1.0),
        options=opts,
    )
