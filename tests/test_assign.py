"""The assignment solver against brute force, its graceful degradation, and the helpers."""

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmoe_flwr.core.assign import (
    assign_experts,
    assign_full,
    assign_random,
    assign_topk,
    capacity_in_experts,
)

TOL = 1e-7


def _all_x(C, K):
    bits = np.array(list(itertools.product([0, 1], repeat=C * K)), dtype=bool)
    return bits.reshape(-1, C, K)


def _max_count(nbytes, mem):
    """Most experts that fit each client's memory (cheapest first)."""
    srt = np.sort(nbytes)
    return np.array([(np.cumsum(srt) <= m).sum() for m in mem])


def _brute(inst, lo, hi, deadline_on):
    """Best objective of the exact problem (None if infeasible), solver semantics."""
    s, nbytes, mem, tf, tpe, deadline, k_fixed = (inst[k] for k in
                                                  ("s", "b", "mem", "tf", "tpe", "deadline", "kf"))
    C, K = s.shape
    X = _all_x(C, K)
    ok = ((X * nbytes).sum(-1) <= mem).all(-1)
    elig = nbytes[None, :] <= mem[:, None]
    if deadline_on:
        t = tf[None, :] + (X * tpe).sum(-1)  # a client holding nothing is not bound
        ok &= ((t <= deadline + 1e-9) | ~X.any(-1)).all(-1)
        elig &= tf[:, None] + tpe <= deadline
    cnt = X.sum(-1)
    if k_fixed is not None:
        ok &= (cnt == np.minimum(k_fixed, _max_count(nbytes, mem))).all(-1)
    else:
        ok &= ((cnt >= 1) | ~elig.any(1)).all(-1)
    col = X.sum(1)
    if lo is not None:
        ok &= (col >= lo).all(-1)
    if hi is not None:
        ok &= (col <= hi).all(-1)
    if not ok.any():
        return None
    return float((X[ok] * s).sum((1, 2)).max())


@st.composite
def instances(draw, max_c=4, max_k=4):
    C = draw(st.integers(1, max_c))
    K = draw(st.integers(1, max_k))

    def ints(lo, hi, shape):
        n = int(np.prod(shape))
        return np.array(draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n))).reshape(shape)

    s = ints(-4, 9, (C, K)) / 4.0
    nbytes = ints(1, 3, (K,)).astype(float)
    mem = ints(0, 7, (C,)).astype(float)
    tf = ints(0, 2, (C,)).astype(float)
    tpe = ints(0, 3, (C, K)).astype(float)
    deadline = draw(st.one_of(st.none(), st.integers(1, 7))) if draw(st.booleans()) else None
    lo = draw(st.one_of(st.none(), st.just(ints(0, C, (K,)))))
    hi = draw(st.one_of(st.none(), st.just(ints(0, C, (K,)))))
    kf = draw(st.one_of(st.none(), st.just(ints(0, K, (C,)))))
    return dict(s=s, b=nbytes, mem=mem, tf=tf, tpe=tpe, deadline=deadline, lo=lo, hi=hi, kf=kf)


def _solve(inst, **kw):
    return assign_experts(inst["s"], inst["b"], inst["mem"], time_fixed=inst["tf"],
                          time_per_expert=inst["tpe"], deadline=inst["deadline"], lo=inst["lo"],
                          hi=inst["hi"], k_fixed=inst["kf"], mip_rel_gap=1e-9, **kw)


def _expected(inst):
    """Brute-force objective along the solver's relaxation chain; and the stage name."""
    C, K = inst["s"].shape
    lo, hi, dl = inst["lo"], inst["hi"], inst["deadline"] is not None
    if lo is not None and hi is not None:
        lo = np.minimum(lo, hi)
    if lo is not None:  # lo clipped to the clients that can hold each expert
        elig = inst["b"][None, :] <= inst["mem"][:, None]
        if dl:
            elig &= inst["tf"][:, None] + inst["tpe"] <= inst["deadline"]
        lo = np.minimum(lo, elig.sum(0))
    stages = [(None, lo, hi, dl), ("balance_lo", None, hi, dl), ("balance_hi", None, None, dl),
              ("deadline", None, None, False)]
    for name, l_, h_, d_ in stages:
        best = _brute(inst, l_, h_, d_)
        if best is not None:
            return best, name, lo
    raise AssertionError("the memory-only stage is always feasible")


def _check_memory(inst, x):
    assert ((x * inst["b"]).sum(1) <= inst["mem"]).all()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances())
def test_equals_brute_force_along_relaxation_chain(inst):
    res = _solve(inst)
    x = res.x
    _check_memory(inst, x)
    best, stage, lo = _expected(inst)
    assert res.objective == pytest.approx(float((inst["s"] * x).sum()))
    assert abs(res.objective - best) <= 1e-6 * (1 + abs(best)), (res, best, stage)
    if stage is None:
        assert res.status == "optimal" or "balance_lo_clipped" in res.relaxed
        held = x.any(1)
        if inst["deadline"] is not None:
            t = inst["tf"] + (x * inst["tpe"]).sum(1)
            assert (t[held] <= inst["deadline"] + 1e-9).all()
        if lo is not None:
            assert (x.sum(0) >= lo).all()
        if inst["hi"] is not None:
            assert (x.sum(0) <= inst["hi"]).all()


@settings(max_examples=60, deadline=None)
@given(instances(max_c=3, max_k=3))
def test_greedy_and_milp_methods_respect_memory(inst):
    for method in ("greedy", "milp"):
        res = _solve(inst, method=method)
        _check_memory(inst, res.x)
    best, _, _ = _expected(inst)
    assert _solve(inst, method="milp").objective == pytest.approx(best, abs=1e-6)


def test_feasible_instance_respects_everything():
    rng = np.random.default_rng(1)
    C, K = 40, 8
    s = rng.random((C, K))
    nbytes = np.full(K, 10.0)
    mem = rng.choice([10.0, 20.0, 40.0], size=C)
    tpe = np.full((C, K), 1.0) * rng.uniform(0.5, 2.0, size=(C, 1))
    tf = rng.uniform(0, 2, size=C)
    res = assign_experts(s, nbytes, mem, time_fixed=tf, time_per_expert=tpe, deadline=5.0,
                         lo=np.full(K, 5), hi=np.full(K, 12))
    assert res.status == "optimal" and res.method == "lp" and res.mip_gap == 0.0
    x = res.x
    assert ((x * nbytes).sum(1) <= mem).all()
    assert (tf + (x * tpe).sum(1) <= 5.0 + 1e-9).all()
    assert (x.sum(0) >= 5).all() and (x.sum(0) <= 12).all()
    assert (x.sum(1) >= 1).all()


def test_nonuniform_bytes_lp_and_milp_agree():
    rng = np.random.default_rng(2)
    C, K = 30, 6
    s = rng.random((C, K)) - 0.2
    nbytes = np.array([4.0, 4, 4, 2, 2, 3])
    mem = rng.choice([4.0, 7, 9, 13], size=C)
    kw = dict(lo=np.full(K, 3), hi=np.full(K, 15), mip_rel_gap=1e-9)
    auto = assign_experts(s, nbytes, mem, **kw)
    exact = assign_experts(s, nbytes, mem, method="milp", **kw)
    assert auto.objective == pytest.approx(exact.objective, abs=1e-6)
    assert ((auto.x * nbytes).sum(1) <= mem).all()


def test_infeasible_balance_relaxes_and_never_raises():
    s = np.ones((2, 3))
    res = assign_experts(s, np.ones(3), np.full(2, 3.0), lo=np.full(3, 5), hi=np.full(3, 5))
    assert res.status == "relaxed_balance" and "balance_lo_clipped" in res.relaxed
    res = assign_experts(s, np.ones(3), np.full(2, 3.0), hi=np.zeros(3, int))
    assert res.status == "relaxed_balance" and "balance_hi" in res.relaxed
    assert (res.x.sum(1) >= 1).all()  # min_one survives: hi was dropped


def test_client_too_small_gets_nothing():
    res = assign_experts(np.ones((3, 2)), np.array([5.0, 6.0]), np.array([4.0, 5.0, np.inf]),
                         lo=np.full(2, 3))
    assert res.x[0].sum() == 0 and res.x[1].tolist() == [True, False] and res.x[2].all()
    assert res.status == "relaxed_balance"


def test_deadline_relaxed_for_k_fixed():
    res = assign_experts(np.ones((1, 3)), np.ones(3), np.array([3.0]), time_fixed=np.zeros(1),
                         time_per_expert=np.ones((1, 3)), deadline=1.5, k_fixed=np.array([2]))
    assert res.status == "relaxed_deadline" and res.x.sum() == 2


def test_k_fixed_respected_and_capped():
    rng = np.random.default_rng(0)
    s = rng.random((10, 6))
    k = np.array([1, 2, 3, 0, 6, 2, 2, 1, 1, 4])
    res = assign_experts(s, np.ones(6), np.full(10, 6.0), k_fixed=k, lo=np.full(6, 3), hi=np.full(6, 4))
    assert res.x.sum(1).tolist() == k.tolist() and res.status == "optimal"
    assert (res.x.sum(0) >= 3).all() and (res.x.sum(0) <= 4).all()
    res = assign_experts(s[:2], np.ones(6), np.array([2.0, 6.0]), k_fixed=np.array([5, 5]))
    assert res.x.sum(1).tolist() == [2, 5] and "k_fixed_capped" in res.relaxed


def test_nan_and_inf_scores():
    s = np.array([[np.nan, 1.0, -np.inf], [np.inf, np.nan, 0.5]])
    res = assign_experts(s, np.ones(3), np.full(2, 1.0))
    assert res.x.tolist() == [[False, True, False], [True, False, False]]
    assert np.isfinite(res.objective)
    # NaN counts as 0: a client whose only choices are NaN/negative still gets one (min_one)
    res = assign_experts(np.array([[np.nan, -1.0]]), np.ones(2), np.array([2.0]))
    assert res.x.tolist() == [[True, False]]


def test_negative_scores_min_one_only():
    res = assign_experts(-np.ones((2, 3)), np.ones(3), np.full(2, 3.0))
    assert res.x.sum(1).tolist() == [1, 1]
    res = assign_experts(-np.ones((2, 3)), np.ones(3), np.full(2, 3.0), min_one=False)
    assert res.x.sum() == 0


def test_empty_inputs():
    assert assign_experts(np.zeros((0, 3)), np.ones(3), np.zeros(0)).x.shape == (0, 3)
    assert assign_experts(np.zeros((2, 0)), np.ones(0), np.ones(2)).status == "empty"


def test_time_limit_zero_falls_back_without_raising():
    rng = np.random.default_rng(3)
    res = assign_experts(rng.random((20, 5)), np.array([1.0, 2, 3, 1, 2]), np.full(20, 4.0),
                         lo=np.full(5, 4), time_limit_s=0.0)
    assert ((res.x * np.array([1.0, 2, 3, 1, 2])).sum(1) <= 4.0).all()


# ---- helpers -------------------------------------------------------------------------


@given(st.lists(st.integers(-1, 9), min_size=1, max_size=20), st.integers(1, 8), st.integers(0, 99))
def test_random_and_topk_respect_k(k, K, seed):
    k = np.array(k)
    x = assign_random(k, K, np.random.default_rng(seed))
    assert x.sum(1).tolist() == np.clip(k, 0, K).tolist()
    assert np.array_equal(x, assign_random(k, K, np.random.default_rng(seed)))
    s = np.random.default_rng(seed).random((k.size, K))
    t = assign_topk(s, k)
    assert t.sum(1).tolist() == np.clip(k, 0, K).tolist()
    for c in range(k.size):  # every chosen expert scores at least every unchosen one
        if t[c].any() and (~t[c]).any():
            assert s[c, t[c]].min() >= s[c, ~t[c]].max()


def test_topk_nan_last_and_full():
    x = assign_topk(np.array([[np.nan, 0.1, 0.3]]), np.array([2]))
    assert x.tolist() == [[False, True, True]]
    assert assign_full(2, 3).all() and assign_full(2, 3).shape == (2, 3)


def test_capacity_in_experts():
    k = capacity_in_experts(np.array([0.0, 9.9, 10.0, 35.0, np.inf, 1e9]), np.array([10.0, 5, 10, 10]))
    assert k.tolist() == [0, 0, 1, 3, 4, 4]


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 25), st.integers(1, 10), st.integers(0, 10_000), st.booleans(), st.booleans())
def test_random_instances_respect_memory_and_every_constraint_not_relaxed(C, K, seed, dl, bal):
    rng = np.random.default_rng(seed)
    nbytes = rng.uniform(0.5, 3.0, K)  # non-integer sizes: knapsack rows, MILP path
    mem = rng.uniform(0.0, 8.0, C)
    tf, tpe = rng.uniform(0, 2, C), rng.uniform(0, 2, (C, K))
    lo, hi = (np.full(K, C // K), np.full(K, C // K + 2)) if bal else (None, None)
    res = assign_experts(rng.normal(size=(C, K)), nbytes, mem, time_fixed=tf, time_per_expert=tpe,
                         deadline=3.0 if dl else None, lo=lo, hi=hi)
    x = res.x
    assert x.dtype == bool and x.shape == (C, K)
    assert ((x * nbytes).sum(1) <= mem).all()
    # small instances are solved, never left to the greedy fallback; without k_fixed the
    # deadline is never relaxed, and "optimal" means nothing was
    assert res.status in ("optimal", "relaxed_balance") and res.method in ("lp", "milp")
    assert "deadline" not in res.relaxed and (res.status != "optimal" or res.relaxed == [])
    elig = nbytes[None, :] <= mem[:, None]
    held = x.any(1)
    if dl:
        assert (tf + (x * tpe).sum(1))[held].max(initial=0) <= 3.0 + 1e-9
        elig &= tf[:, None] + tpe <= 3.0
    assert (held | ~elig.any(1)).all()  # at least one expert wherever one fits
    if bal:
        lo_eff = np.minimum(lo, elig.sum(0)) if "balance_lo_clipped" in res.relaxed else lo
        if "balance_lo" not in res.relaxed:
            assert (x.sum(0) >= lo_eff).all()
        if "balance_hi" not in res.relaxed:
            assert (x.sum(0) <= hi).all()
    if res.status == "optimal":
        held = x.any(1)
        if dl:
            assert (tf + (x * tpe).sum(1))[held].max(initial=0) <= 3.0 + 1e-9
        if bal:
            assert (x.sum(0) >= lo).all() and (x.sum(0) <= hi).all()


def test_time_model_keeps_slow_client_within_deadline():
    from fedmoe_flwr.core.profiles import ClientProfile, expert_time_costs

    nbytes = np.full(4, 1e6)
    fast = ClientProfile(declared_downlink_Bps=1e7, declared_uplink_Bps=1e7, declared_samples_per_s=1e3)
    slow = ClientProfile(declared_downlink_Bps=1e6, declared_uplink_Bps=1e6, declared_samples_per_s=1e3)
    costs = [expert_time_costs(p, nbytes, shared_bytes=1e6, num_samples=1000) for p in (fast, slow)]
    tf = np.array([c[0] for c in costs])  # fast 1.2 s, slow 3 s
    tpe = np.stack([c[1] for c in costs])  # fast 0.2 s, slow 2 s per expert
    res = assign_experts(np.ones((2, 4)), nbytes, np.full(2, 4e6), time_fixed=tf, time_per_expert=tpe,
                         deadline=6.0)
    assert res.x.sum(1).tolist() == [4, 1] and res.status == "optimal"


# ---- min-cost flow (count caps) and the mixed-size incumbent, against HiGHS ----------


def _check_all(inst, res):
    """Memory always; deadline, balance, at-least-one and k_fixed unless relaxed."""
    x, b, mem, tpe, tf, dl = res.x, inst["b"], inst["mem"], inst["tpe"], inst["tf"], inst["deadline"]
    assert ((x * b).sum(1) <= mem * (1 + 1e-12)).all()
    elig = b[None, :] <= mem[:, None]
    if dl is not None and "deadline" not in res.relaxed:
        assert ((tf + (x * tpe).sum(1))[x.any(1)] <= dl + 1e-9).all()
        elig &= tf[:, None] + tpe <= dl
    if inst["kf"] is None:
        assert (x.any(1) | ~elig.any(1)).all()
    elif "k_fixed_capped" not in res.relaxed:
        assert (x.sum(1) == inst["kf"]).all()
    lo, hi = inst["lo"], inst["hi"]
    if "deadline" in res.relaxed:  # the last stage keeps memory (and counts) only
        return
    if lo is not None and "balance_lo" not in res.relaxed:
        lo = np.minimum(lo, hi) if hi is not None else lo
        assert (x.sum(0) >= (np.minimum(lo, elig.sum(0)) if "balance_lo_clipped" in res.relaxed else lo)).all()
    if hi is not None and "balance_hi" not in res.relaxed:
        assert (x.sum(0) <= hi).all()


@st.composite
def count_capped(draw, sizes=(1,)):
    """Instances whose clients' memory and deadline are caps on a count (uniform sizes, a
    per-client time per expert), or with ``sizes`` of several values, knapsack rows whose
    costs are equal within a size class (the time model of ``expert_time_costs``)."""
    C, K = draw(st.integers(1, 30)), draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    b = rng.choice(np.array(sizes, float), size=K)
    t_c = rng.choice([0.5, 1.0, 2.0], size=C)
    # transfer time proportional to size, plus (for some clients) a per-expert compute
    # share: then memory and deadline are two rows, not one
    extra = rng.choice([0.0, 0.0, 0.5], size=C)
    dl = draw(st.one_of(st.none(), st.integers(1, 8)))
    band = [None, rng.integers(0, C // 2 + 2, K), rng.integers(C // 4, C + 1, K)]
    return dict(s=rng.integers(-4, 12, (C, K)) / 4.0, b=b, mem=rng.integers(0, 2 * K + 2, C) * 1.0,
                tf=rng.integers(0, 3, C) * 1.0, tpe=t_c[:, None] * b[None, :] + extra[:, None], deadline=dl,
                lo=band[draw(st.integers(0, 2))], hi=band[draw(st.integers(0, 2))],
                kf=rng.integers(0, K + 1, C) if draw(st.integers(0, 4)) == 0 else None)


def _top1_arcs(cost, E, net):
    """Each client's single best arc: a pruned set the certificate must keep extending."""
    key = np.where(E, cost, np.iinfo(np.int64).min)
    return E & (key == key.max(axis=1, keepdims=True))


@pytest.mark.parametrize("prune", ["none", "pruned", "top1"])
@settings(max_examples=60, deadline=None)
@given(count_capped())
def test_min_cost_flow_equals_highs_and_respects_every_constraint(prune, inst):
    from fedmoe_flwr.core import _flow

    with pytest.MonkeyPatch.context() as mp:
        if prune != "none":  # prune every instance, so the optimality certificate decides
            mp.setattr(_flow, "_PRUNE_MIN_ARCS", -1)
            mp.setattr(_flow, "_PRUNE_MAX_SHARE", 2.0)
            mp.setattr(_flow, "_PRUNE_ROUNDS", 50)
            mp.setattr(_flow, "_PRUNE_MARGIN", 0)
        if prune == "top1":
            mp.setattr(_flow, "_pruned_arcs", _top1_arcs)
        flow = _solve(inst)
    exact = _solve(inst, method="highs")
    assert flow.engine in ("flow", "none") and exact.engine != "flow"
    assert flow.status == exact.status and flow.relaxed == exact.relaxed
    assert flow.objective == pytest.approx(exact.objective, abs=1e-6)
    assert flow.mip_gap == 0.0 and flow.method == "lp"
    _check_all(inst, flow)


@pytest.mark.parametrize("highs_too", [True, False])
# Derandomized: a counterexample was seen where HiGHS "proved" a lower optimum than the loop's
# feasible incumbent (only with torch imported first); kept reproducible until it is explained.
@settings(max_examples=50, deadline=None, derandomize=True, database=None)
@given(count_capped(sizes=(1, 2, 3)), st.sampled_from([1e-9, 0.05, 0.5]))
def test_mixed_sizes_reported_gap_bounds_the_true_gap(highs_too, inst, gap):
    from fedmoe_flwr.core import _milp

    with pytest.MonkeyPatch.context() as mp:
        if not highs_too:  # as on a large cohort: the primal-dual loop alone
            mp.setattr(_milp, "_HIGHS_MAX_PAIRS", -1)
        res = assign_experts(inst["s"], inst["b"], inst["mem"], time_fixed=inst["tf"],
                             time_per_expert=inst["tpe"], deadline=inst["deadline"], lo=inst["lo"],
                             hi=inst["hi"], k_fixed=inst["kf"], mip_rel_gap=gap)
    exact = _solve(inst, method="milp")
    assert res.relaxed == exact.relaxed
    assert res.objective <= exact.objective + 1e-6
    assert exact.objective <= res.objective + res.mip_gap * abs(res.objective) + 1e-6
    if not res.relaxed:
        assert res.status == ("optimal" if res.mip_gap <= gap else "time_limit")
    _check_all(inst, res)


def test_uniform_sizes_with_expert_dependent_times_keep_the_deadline_exactly():
    # equal bytes but times that differ by expert: the deadline is a knapsack, not a count cap
    tpe = np.array([[1.0, 3.0, 1.0, 3.0]])
    res = assign_experts(np.array([[1.0, 5.0, 1.0, 5.0]]), np.ones(4), np.array([4.0]),
                         time_fixed=np.zeros(1), time_per_expert=tpe, deadline=4.0)
    assert res.engine != "flow" and res.status == "optimal"
    # a count cap of 4 / min time would take both 5s (time 6); the optimum is one 5 and one 1
    assert res.objective == 6.0 and (res.x * tpe).sum() <= 4.0


def test_bench_solver_still_exported_and_solves_by_flow():
    from fedmoe_flwr.core import bench_solver

    r = bench_solver(50, 8, 0)
    assert r.status == "optimal" and r.engine == "flow" and r.x.any(1).all()
    r = bench_solver(50, 8, 0, uniform_bytes=False, mip_rel_gap=1e-9)
    assert r.status == "optimal" and r.method == "milp"


def test_without_ortools_highs_solves_the_same_problem():
    from fedmoe_flwr.core import _flow, _mixed_flow

    rng = np.random.default_rng(4)
    s, mem = rng.random((40, 6)), rng.choice([1.0, 2.0, 4.0], size=40)
    kw = dict(lo=np.full(6, 5), hi=np.full(6, 12))
    with_flow = assign_experts(s, np.ones(6), mem, **kw)
    mixed_flow = assign_experts(s, np.array([1.0, 1, 1, 2, 2, 2]), mem, mip_rel_gap=1e-9, **kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_flow, "_mcf", None)
        mp.setattr(_mixed_flow, "_mcf", None)
        plain = assign_experts(s, np.ones(6), mem, **kw)
        mixed = assign_experts(s, np.array([1.0, 1, 1, 2, 2, 2]), mem, mip_rel_gap=1e-9, **kw)
    assert with_flow.engine == "flow" and plain.engine == "highs_lp" and plain.status == "optimal"
    assert plain.objective == pytest.approx(with_flow.objective, abs=1e-9)
    assert mixed.engine == "highs_milp" and mixed.objective == pytest.approx(mixed_flow.objective, abs=1e-6)
