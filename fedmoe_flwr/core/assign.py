"""Expert assignment: the exact optimisation (docs/architecture.md#assignment), plus the
baselines' helpers.

:func:`assign_experts` maximises ``sum score[c, k] x[c, k]`` over binary ``x`` subject to

- memory (hard, never relaxed): ``sum_k bytes[k] x[c, k] <= memory[c]``;
- deadline: ``time_fixed[c] + sum_k time_per_expert[c, k] x[c, k] <= deadline``;
- balance: ``lo[k] <= sum_c x[c, k] <= hi[k]``;
- count: ``sum_k x[c, k] >= 1`` for each client that can hold one expert within memory
  and deadline (``min_one``), or ``== k_fixed[c]`` when given.

Only the eligible pairs are variables (an expert that alone breaks a client's memory or
deadline is not). For a client whose eligible experts all have the same bytes and the
same time, memory and deadline reduce to a cap on how many it holds (a per-expert time
proportional to bytes, the transfer-only time model, also folds the deadline into the
byte budget). When every client reduces so, the problem is a bipartite b-matching
(totally unimodular): it is solved exactly as a min-cost flow (:mod:`._flow`, OR-Tools;
large cohorts on pruned arcs with an optimality certificate), or by HiGHS's LP
relaxation, whose vertex optimum is integral, with ``method="highs"``. Otherwise
(experts of different sizes, or times that differ by expert within a client) it is a
MILP: a primal-dual loop (:mod:`._mixed_flow`: Lagrangian bound, class-capped flows)
gives an incumbent with a proven gap, and HiGHS (:func:`scipy.optimize.milp`, LP first)
runs in the remaining time unless the loop already met ``mip_rel_gap``; the better
solution and the tighter bound are kept. Solutions are checked and repaired to satisfy
memory exactly (and the deadline up to 1e-9 relative), guarding against solver
tolerances.

Infeasibility degrades gracefully and never raises. Relaxations, in order, each tried
only if the previous problem was infeasible:

1. ``lo[k]`` is clipped to the number of clients that can hold expert ``k``
   (``"balance_lo_clipped"``), and to ``hi[k]``;
2. ``lo`` is dropped (``"balance_lo"``), then 3. ``hi`` (``"balance_hi"``);
4. the deadline is dropped for everyone (``"deadline"``). Since ``min_one`` only covers
   clients that can meet the deadline with one expert, this is reached only when
   ``k_fixed`` asks for more experts than the deadline allows.

Memory is never relaxed: a client whose memory holds no expert gets none. ``k_fixed`` is
capped at what fits the client's memory. If HiGHS fails or times out without any
solution, a greedy assignment (best scores first, memory and deadline respected, balance
ignored) is returned with status ``"fallback"``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ._milp import max_count_fitting, solve_stage

__all__ = [
    "AssignmentResult",
    "assign_experts",
    "assign_full",
    "assign_random",
    "assign_topk",
    "bench_solver",
    "capacity_in_experts",
]

_INF_SCORE = 1.0e6  # stands for +-inf scores
_METHODS = ("auto", "highs", "milp", "greedy")


@dataclass
class AssignmentResult:
    """What the solver decided and how.

    Attributes:
        x: ``[C, K]`` bool assignment.
        status: ``"optimal"`` | ``"time_limit"`` (best solution at the time limit) |
            ``"relaxed_balance"`` | ``"relaxed_deadline"`` | ``"fallback"`` (greedy) |
            ``"empty"`` (no clients or no experts).
        solve_time_s: wall time of the whole call.
        objective: ``sum score * x`` with the cleaned score (NaN -> 0).
        mip_gap: proven relative gap to the optimum (the tighter of HiGHS's bound and the
            mixed-size loop's Lagrangian bound); 0.0 for the exact paths; ``None`` for
            greedy.
        relaxed: what was relaxed, in order, e.g. ``["balance_lo_clipped", "balance_lo"]``.
        method: ``"lp"`` (the LP relaxation is integral: exact without branching),
            ``"milp"`` or ``"greedy"`` (``"none"`` when built by a caller, e.g. the
            random/full baselines).
        engine: the code that found ``x``: ``"flow"`` (min-cost flow), ``"highs_lp"``,
            ``"highs_milp"``, ``"greedy"``, or ``"none"`` (nothing to solve).
    """

    x: np.ndarray
    status: str
    solve_time_s: float
    objective: float
    mip_gap: float | None
    relaxed: list[str] = field(default_factory=list)
    method: str = "none"
    engine: str = "none"


def _clean_score(score: np.ndarray) -> np.ndarray:
    """NaN -> 0; +-inf -> +-(1e6 or twice the largest finite magnitude)."""
    s = np.asarray(score, dtype=np.float64)
    finite = np.isfinite(s)
    if finite.all():
        return s
    big = max(_INF_SCORE, 2.0 * float(np.abs(s[finite]).max(initial=0.0)))
    return np.where(np.isnan(s), 0.0, np.clip(np.where(finite, s, np.sign(s) * big), -big, big))


def _repair(x, s, costs, budget):
    """Drop lowest-score experts of rows over ``budget`` (guards solver tolerances)."""
    over = np.flatnonzero((x * costs).sum(axis=1) > budget)
    for c in over:
        for k in np.argsort(s[c], kind="stable"):
            if (x[c] * costs[c]).sum() <= budget[c]:
                break
            x[c, k] = False
    return x


def _greedy(s, E, nbytes, memory, tpe, slack, k_lo, k_hi):
    """Per client, best-scoring eligible experts that fit; positive scores, or up to k_lo."""
    C, K = s.shape
    x = np.zeros((C, K), bool)
    for c in range(C):
        used_b, used_t, cnt = 0.0, 0.0, 0
        for k in np.argsort(-s[c], kind="stable"):
            if not E[c, k] or cnt >= k_hi[c] or (s[c, k] <= 0 and cnt >= k_lo[c]):
                continue
            if used_b + nbytes[k] > memory[c]:
                continue
            if tpe is not None and used_t + tpe[c, k] > slack[c]:
                continue
            x[c, k] = True
            used_b, used_t, cnt = used_b + nbytes[k], used_t + (0.0 if tpe is None else tpe[c, k]), cnt + 1
    return x


def assign_experts(
    score: np.ndarray,
    expert_bytes: np.ndarray,
    memory: np.ndarray,
    *,
    time_fixed: np.ndarray | None = None,
    time_per_expert: np.ndarray | None = None,
    deadline: float | None = None,
    lo: np.ndarray | None = None,
    hi: np.ndarray | None = None,
    k_fixed: np.ndarray | None = None,
    min_one: bool = True,
    method: str = "auto",
    time_limit_s: float = 10.0,
    mip_rel_gap: float = 1e-4,
) -> AssignmentResult:
    """Solve the assignment (module docstring); never raises on infeasible inputs.

    Args:
        score: ``[C, K]`` objective coefficients (fitness + exploration + price). NaN is
            treated as 0 ("no information"); +-inf as a large finite value.
        expert_bytes: ``[K]`` bytes of each expert.
        memory: ``[C]`` expert-byte budget per client (``inf`` allowed).
        time_fixed, time_per_expert, deadline: the linear round-time model
            (:func:`fedmoe_flwr.core.profiles.expert_time_costs`); ignored if ``deadline``
            is None. Missing ``time_fixed`` / ``time_per_expert`` count as 0.
        lo, hi: ``[K]`` per-expert client-count bounds (:func:`coverage_bounds`); None = none.
        k_fixed: ``[C]`` exact experts per client (flex baseline); capped at what fits the
            client's memory (noted as ``"k_fixed_capped"``); it overrides ``min_one``.
        min_one: each client that can hold an expert gets at least one.
        method: ``"auto"`` (min-cost flow when every client reduces to a count cap,
            else the LP relaxation first and the MILP only if its optimum is fractional),
            ``"highs"`` (as ``"auto"`` but HiGHS only, no flow), ``"milp"`` (straight to
            the MILP) or ``"greedy"`` (no solver; balance ignored).
        time_limit_s: time limit for the whole call (the mixed-size loop and HiGHS; the
            flow has none: it is exact and fast).
        mip_rel_gap: relative gap at which the MILP search (loop or HiGHS) stops.
    """
    t0 = time.perf_counter()
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    s = _clean_score(score)
    if s.ndim != 2:
        raise ValueError(f"score must be [C, K], got shape {s.shape}")
    C, K = s.shape
    nbytes = np.asarray(expert_bytes, dtype=np.float64).reshape(K)
    mem = np.asarray(memory, dtype=np.float64).reshape(C)
    mem = np.where(np.isnan(mem), 0.0, np.minimum(mem, nbytes.sum() + 1.0))
    if C == 0 or K == 0:
        return AssignmentResult(np.zeros((C, K), bool), "empty", time.perf_counter() - t0, 0.0, 0.0, [], "lp")
    E_mem = nbytes[None, :] <= mem[:, None]
    tpe = slack = None
    E = E_mem
    if deadline is not None:
        tf = np.zeros(C) if time_fixed is None else np.asarray(time_fixed, np.float64).reshape(C)
        tpe = np.zeros((C, K)) if time_per_expert is None else np.asarray(time_per_expert, np.float64)
        slack = float(deadline) - tf
        E = E_mem & (tpe <= slack[:, None]) & (slack[:, None] >= 0)
    relaxed: list[str] = []
    if k_fixed is not None:
        kf = np.clip(np.asarray(k_fixed, dtype=np.int64).reshape(C), 0, K)
        cap = np.minimum(max_count_fitting(np.broadcast_to(nbytes, (C, K)), E_mem, mem), kf)
        if (cap < kf).any():
            relaxed.append("k_fixed_capped")
        kf = cap
    lo_a = None if lo is None else np.asarray(lo, dtype=np.int64).reshape(K)
    hi_a = None if hi is None else np.asarray(hi, dtype=np.int64).reshape(K)
    if hi_a is not None and lo_a is not None:
        lo_a = np.minimum(lo_a, hi_a)

    def counts(Ecur):
        """Per-client count bounds under eligibility ``Ecur``."""
        if k_fixed is not None:
            return kf.copy(), kf.copy()
        k_lo = (Ecur.any(axis=1) & min_one).astype(np.int64)
        return k_lo, np.full(C, K, dtype=np.int64)

    # Stages: (relaxation name, lo, hi, deadline active)
    if lo_a is not None:
        clipped = np.minimum(lo_a, E.sum(axis=0))
        if (clipped < lo_a).any():
            relaxed.append("balance_lo_clipped")
        lo_a = clipped
    stages = [(None, lo_a, hi_a, deadline is not None)]
    if lo_a is not None and lo_a.any():
        stages.append(("balance_lo", None, hi_a, deadline is not None))
    if hi_a is not None:
        stages.append(("balance_hi", None, None, deadline is not None))
    if deadline is not None:
        stages.append(("deadline", None, None, False))

    x, state, gap, used, engine = None, "error", None, "greedy", "greedy"
    if method != "greedy":
        for name, lo_s, hi_s, dl in stages:
            if name is not None:
                relaxed.append(name)
            Ecur = E if dl else E_mem
            k_lo, k_hi = counts(Ecur)
            remaining = time_limit_s - (time.perf_counter() - t0)
            x, state, gap, used, engine = solve_stage(
                s, Ecur, nbytes, mem, tpe if dl else None, slack if dl else None,
                lo_s, hi_s, k_lo, k_hi,
                force_milp=(method == "milp"), time_limit=remaining, gap=mip_rel_gap,
                use_flow=(method == "auto"),
            )
            if x is not None or state == "error" or remaining <= 0:
                break
    dl_final = deadline is not None and "deadline" not in relaxed
    if x is None:
        Ecur = E if deadline is not None else E_mem
        k_lo, k_hi = counts(Ecur)
        x = _greedy(s, Ecur, nbytes, mem, tpe, slack, k_lo, k_hi)
        state, gap, used, engine = "fallback", None, "greedy", "greedy"
        dl_final = deadline is not None
    x = _repair(x, s, np.broadcast_to(nbytes, (C, K)), mem)
    if dl_final:
        x = _repair(x, s, tpe, slack + 1e-9 * np.abs(slack))
    if state == "fallback":
        status = "fallback"
    elif "deadline" in relaxed:
        status = "relaxed_deadline"
    elif any(r.startswith("balance") for r in relaxed):
        status = "relaxed_balance"
    else:
        status = state
    return AssignmentResult(
        x=x, status=status, solve_time_s=time.perf_counter() - t0,
        objective=float((s * x).sum()), mip_gap=gap, relaxed=relaxed, method=used, engine=engine,
    )


def capacity_in_experts(memory: np.ndarray, expert_bytes: np.ndarray) -> np.ndarray:
    """Experts each client can hold assuming every expert is the largest:
    ``floor(memory / max(bytes))`` capped to ``[0, K]`` (int64 ``[C]``)."""
    nbytes = np.asarray(expert_bytes, dtype=np.float64)
    mem = np.asarray(memory, dtype=np.float64)
    K = nbytes.size
    if K == 0:
        return np.zeros(mem.shape, dtype=np.int64)
    b = float(nbytes.max())
    if b <= 0:
        return np.full(mem.shape, K, dtype=np.int64)
    with np.errstate(invalid="ignore"):
        k = np.floor(np.nan_to_num(mem / b, nan=0.0, posinf=K))
    return np.clip(k, 0, K).astype(np.int64)


def assign_random(k: np.ndarray, num_experts: int, rng: np.random.Generator) -> np.ndarray:
    """``k[c]`` distinct experts per client, uniformly at random (``k`` clipped to [0, K])."""
    k = np.clip(np.asarray(k, dtype=np.int64), 0, num_experts)
    ranks = np.argsort(rng.random((k.size, num_experts)), axis=1)
    x = np.zeros((k.size, num_experts), bool)
    take = np.arange(num_experts)[None, :] < k[:, None]
    np.put_along_axis(x, ranks, take, axis=1)
    return x


def assign_topk(score: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Each client's ``k[c]`` best experts by score (greedy, no balance; NaN ranks last,
    ties go to the lower index)."""
    s = np.asarray(score, dtype=np.float64)
    C, K = s.shape
    k = np.clip(np.asarray(k, dtype=np.int64).reshape(C), 0, K)
    order = np.argsort(-np.where(np.isnan(s), -np.inf, s), axis=1, kind="stable")
    x = np.zeros((C, K), bool)
    np.put_along_axis(x, order, np.arange(K)[None, :] < k[:, None], axis=1)
    return x


def assign_full(num_clients: int, num_experts: int) -> np.ndarray:
    """Every client holds every expert (the ``full`` baseline)."""
    return np.ones((num_clients, num_experts), dtype=bool)


def __getattr__(name: str):
    """``bench_solver`` lives in :mod:`.assign_bench` (off the solver's import path)."""
    if name == "bench_solver":
        from .assign_bench import bench_solver

        return bench_solver
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":  # python -m fedmoe_flwr.core.assign --bench [--grid]
    from .assign_bench import main

    main()
