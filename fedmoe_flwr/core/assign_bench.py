"""Benchmark of the expert-assignment solver: timings printed and written, never asserted.

    python -m fedmoe_flwr.core.assign --bench [--C 1000 --K 64 --seeds 3 --nonuniform]
    python -m fedmoe_flwr.core.assign --bench --grid [--seeds 1 --out docs/bench/solver.json]
                                      [--cohorts 100,1000,10000 --experts 8,64,256 --gap 0.01]

(``python -m fedmoe_flwr.core.assign_bench`` takes the same arguments.)

``--grid`` solves cohorts of 100, 1,000 and 10,000 clients x 8, 64 and 256 experts, with
uniform and mixed expert sizes, and prints one row per cell: wall and CPU seconds (the CPU
time is the steadier figure on a shared machine), which code found the answer, the status
and the proven relative gap. Mixed sizes stop at ``--gap`` (default 1%): the row says how
long a solution proven within that gap took. Kept out of :mod:`.assign` so the solver's
import stays lean.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from .assign import AssignmentResult, assign_experts, capacity_in_experts
from .load import coverage_bounds

GRID_COHORTS = (100, 1000, 10_000)
GRID_EXPERTS = (8, 64, 256)


def bench_instance(C: int = 1000, K: int = 64, seed: int = 0, *, uniform_bytes: bool = True,
                   band: float = 0.0) -> dict:
    """One synthetic cohort with memory, deadline and balance: ``assign_experts`` kwargs.

    Memory tiers hold 2/4/8/16/all experts; bandwidths are log-uniform 0.2-20 MB/s and the
    per-expert time is its transfer (so the 120 s deadline caps slow clients at a few
    experts); balance is ``coverage_bounds`` with ``band`` around the mean of the
    per-client count caps; scores are Dirichlet(0.3) routing-like shares.
    ``uniform_bytes=False`` makes half the experts half as large: memory and deadline
    become knapsack rows and the problem a MILP.
    """
    rng = np.random.default_rng(seed)
    nbytes = np.full(K, 4.0e6)
    if not uniform_bytes:
        nbytes[K // 2:] = 2.0e6
    tiers = np.array([2, 4, 8, 16, K])
    memory = rng.choice(tiers, size=C) * nbytes.max()
    bw = np.exp(rng.uniform(np.log(2e5), np.log(2e7), size=C))
    tpe = 2.0 * nbytes[None, :] / bw[:, None]
    time_fixed = rng.uniform(5.0, 30.0, size=C)
    deadline = 120.0
    cap_mem = capacity_in_experts(memory, nbytes)
    cap_dl = np.floor(np.maximum(deadline - time_fixed, 0) / tpe.max(axis=1))
    slots = int(np.minimum(cap_mem, cap_dl).sum())
    lo, hi = coverage_bounds(slots, K, band)
    score = rng.dirichlet(np.full(K, 0.3), size=C)
    return dict(score=score, expert_bytes=nbytes, memory=memory, time_fixed=time_fixed,
                time_per_expert=tpe, deadline=deadline, lo=lo, hi=hi)


def bench_solver(C: int = 1000, K: int = 64, seed: int = 0, *, uniform_bytes: bool = True,
                 band: float = 0.0, method: str = "auto", time_limit_s: float = 10.0,
                 mip_rel_gap: float = 1e-4) -> AssignmentResult:
    """Solve one :func:`bench_instance`; returns the result (``solve_time_s`` is wall time)."""
    inst = bench_instance(C, K, seed, uniform_bytes=uniform_bytes, band=band)
    return assign_experts(**inst, method=method, time_limit_s=time_limit_s, mip_rel_gap=mip_rel_gap)


def _timed(C, K, seed, uniform, band, time_limit_s, gap) -> dict:
    inst = bench_instance(C, K, seed, uniform_bytes=uniform, band=band)
    cpu0 = time.process_time()
    r = assign_experts(**inst, time_limit_s=time_limit_s, mip_rel_gap=gap)
    return dict(C=C, K=K, seed=seed, uniform_bytes=uniform, band=band, wall_s=r.solve_time_s,
                cpu_s=time.process_time() - cpu0, method=r.method, engine=r.engine, status=r.status,
                mip_gap=r.mip_gap, objective=r.objective, assigned=int(r.x.sum()), relaxed=r.relaxed)


def run_grid(seeds: int = 1, time_limit_s: float = 10.0, gap: float = 0.01, band: float = 0.0,
             cohorts=GRID_COHORTS, experts=GRID_EXPERTS) -> list[dict]:
    """Every (sizes, cohort, experts) cell over ``seeds`` seeds; prints a row per cell."""
    rows = []
    print(f"{'sizes':8} {'C':>6} {'K':>4} {'wall s':>8} {'cpu s':>8} {'engine':>14} {'status':>10} "
          f"{'gap':>9}  (median over {seeds} seed(s); mixed stops at gap <= {gap:g})")
    for uniform in (True, False):
        for C in cohorts:
            for K in experts:
                runs = [_timed(C, K, s, uniform, band, time_limit_s, 1e-4 if uniform else gap)
                        for s in range(seeds)]
                wall = float(np.median([r["wall_s"] for r in runs]))
                cpu = float(np.median([r["cpu_s"] for r in runs]))
                gaps = [r["mip_gap"] for r in runs if r["mip_gap"] is not None]
                worst_gap = max(gaps) if gaps else None
                engines = ",".join(sorted({r["engine"] for r in runs}))
                states = ",".join(sorted({r["status"] for r in runs}))
                print(f"{'uniform' if uniform else 'mixed':8} {C:>6} {K:>4} {wall:>8.3f} {cpu:>8.3f} "
                      f"{engines:>14} {states:>10} {'-' if worst_gap is None else f'{worst_gap:.2e}':>9}",
                      flush=True)
                rows.append(dict(sizes="uniform" if uniform else "mixed", C=C, K=K, wall_s_median=wall,
                                 cpu_s_median=cpu, worst_gap=worst_gap, runs=runs))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Benchmark the expert-assignment solver.")
    p.add_argument("--bench", action="store_true", help="run the benchmark (the default action)")
    p.add_argument("--grid", action="store_true", help="the scaling table (cohorts x experts x sizes)")
    p.add_argument("--C", type=int, default=1000)
    p.add_argument("--K", type=int, default=64)
    p.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 3; --grid 1)")
    p.add_argument("--nonuniform", action="store_true",
                   help="also bench experts of two sizes (the mixed-size MILP path)")
    p.add_argument("--time-limit", type=float, default=10.0)
    p.add_argument("--gap", type=float, default=0.01, help="--grid: relative gap at which mixed sizes stop")
    p.add_argument("--band", type=float, default=0.0, help="--grid: load band (0 = tightest balance)")
    p.add_argument("--cohorts", default=",".join(map(str, GRID_COHORTS)), help="--grid: cohort sizes")
    p.add_argument("--experts", default=",".join(map(str, GRID_EXPERTS)), help="--grid: expert counts")
    p.add_argument("--out", default=None, help="JSON path (--grid default: docs/bench/solver.json)")
    a = p.parse_args(argv)
    if a.grid:
        load_before = os.getloadavg()[0]  # wall times stretch on a busy machine; CPU times less so
        rows = run_grid(a.seeds or 1, a.time_limit, a.gap, a.band,
                        [int(c) for c in a.cohorts.split(",")], [int(k) for k in a.experts.split(",")])
        out = Path(a.out or "docs/bench/solver.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(command="python -m fedmoe_flwr.core.assign --bench --grid", seeds=a.seeds or 1,
                    time_limit_s=a.time_limit, mixed_gap=a.gap, band=a.band, python=platform.python_version(),
                    machine=platform.machine(), cpus=os.cpu_count(),
                    load_avg_1min=[load_before, os.getloadavg()[0]])
        out.write_text(json.dumps(dict(meta=meta, cells=rows), indent=1))
        print(f"wrote {out}")
        return
    results = []
    for uniform in (True, False) if a.nonuniform else (True,):
        for band in (0.0, 0.5):
            for seed in range(a.seeds or 3):
                r = _timed(a.C, a.K, seed, uniform, band, a.time_limit, 1e-4)
                results.append(r)
                print(f"C={a.C} K={a.K} uniform_bytes={uniform} band={band} seed={seed}: "
                      f"{r['wall_s'] * 1e3:.0f} ms (cpu {r['cpu_s'] * 1e3:.0f} ms) method={r['method']} "
                      f"engine={r['engine']} status={r['status']} gap={r['mip_gap']} "
                      f"assigned={r['assigned']} relaxed={r['relaxed']}")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
