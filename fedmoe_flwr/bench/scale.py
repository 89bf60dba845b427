"""The server at scale: memory and per-round time for many known clients, no client training.

    python -m fedmoe_flwr.bench.scale [--clients 1000 10000 100000] [--experts 64]
                                      [--cohort 1000] [--rounds 3] [--out scale.json]

A synthetic fleet of ``N`` known clients (memory tiers holding 2/4/8/16/all experts,
log-uniform link speeds, Dirichlet routing histograms) is registered in one
:func:`~fedmoe_flwr.core.ensure_clients` call; each round then runs the server half of the
``aligned`` strategy on the pure core, with replies fabricated instead of trained:

- ``eligible``: the time model of every known client (``build_problem`` over all ``N``),
  which ``aligned`` uses to leave out clients that cannot meet the deadline;
- ``sample``: the seeded cohort draw over the ``N`` known clients;
- ``problem``: ``build_problem`` for the cohort;
- ``solve``: ``solver_score`` + ``assign_experts`` (the solver's own cost, reported apart);
- ``apply``: :func:`~fedmoe_flwr.core.apply_round` on fabricated replies (validation,
  aggregation over a tiny model with ``K`` experts, profiles, fitness, load).

Times are CPU seconds of this process (wall-clock swings with other jobs on a shared
machine; every step is single-threaded). Memory is the traced size (``tracemalloc``) of the state after registration and the peak
of one round on top of it, measured in a separate pass so the timings run untraced. A
checkpoint of the state (:func:`fedmoe_flwr.checkpoint.save_checkpoint` of an
``AlignedStrategy`` holding it) is timed, loaded back and sized. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from fedmoe_flwr import core
from fedmoe_flwr.layout import ParamLayout, expert_key
from fedmoe_flwr.seeding import rng_for, sample_cohort

# CPU seconds of this process: on a shared machine wall-clock time swings with other jobs,
# and every step here is single-threaded Python and numpy.
clock = time.process_time

EXPERT_BYTES = 4.0e6  # what the time model and capacities assume (the tensors are tiny)
SHARED_BYTES = 2.0e6
DEADLINE_S = 120.0


def tiny_layout(num_experts: int, width: int = 4) -> tuple[ParamLayout, dict[str, np.ndarray]]:
    """A layout with one MoE layer of ``num_experts`` tiny experts, a router and a head."""
    names = {expert_key(0, e): (f"moe.experts.{e}.w",) for e in range(num_experts)}
    params = {"head.w": np.zeros((2, width), np.float32), "moe.router.weight": np.zeros((num_experts, width), np.float32)}
    params.update({n: np.zeros(width, np.float32) for ns in names.values() for n in ns})
    layout = ParamLayout(
        expert_params=names, shared_params=("head.w", "moe.router.weight"), router_params={"moe.router.weight": 0},
        nbytes={n: a.nbytes for n, a in params.items()}, num_experts={0: num_experts},
    )
    return layout, params


def synthetic_fleet(num_clients: int, num_experts: int, seed: int = 0):
    """Client ids, declared profiles and data sizes of a heterogeneous fleet."""
    rng = np.random.default_rng(seed)
    ids = [f"c{i:07d}" for i in range(num_clients)]
    tiers = np.array([2, 4, 8, 16, num_experts])
    memory = rng.choice(tiers, size=num_clients) * EXPERT_BYTES
    bw = np.exp(rng.uniform(math.log(2e5), math.log(2e7), size=num_clients))
    speed = rng.uniform(50.0, 2000.0, size=num_clients)
    declared = {
        cid: core.ClientProfile(memory_bytes=float(m), declared_samples_per_s=float(s), declared_uplink_Bps=float(b),
                                declared_downlink_Bps=float(4 * b))
        for cid, m, s, b in zip(ids, memory, speed, bw)
    }
    examples = dict(zip(ids, rng.integers(50, 500, size=num_clients).tolist()))
    return ids, declared, examples


def fabricate_replies(rnd: int, ids: list[str], x: np.ndarray, layout: ParamLayout, params: dict, examples: dict,
                      speed: dict, seed: int) -> core.RoundInputs:
    """What the cohort would send back: small updates of the held tensors, routing statistics."""
    keys = layout.expert_keys
    K = len(keys)
    rng = rng_for(seed, "replies", rnd)
    sent, received = {}, {}
    hists = rng.dirichlet(np.full(K, 0.3), size=len(ids))
    for cid, row, hist in zip(ids, x, hists):
        held = tuple(keys[k] for k in np.flatnonzero(row))
        if not held:
            continue
        names = layout.param_names(held)
        upd = {n: params[n] + np.float32(0.01) for n in names}
        tokens = np.where(row, 10.0, 0.0)
        # transfer times 0: the tiny tensors stand for EXPERT_BYTES, so no link speed is measured
        report = core.ClientReport(num_examples=examples[cid], train_loss=1.0, down_s=0.0, train_s=examples[cid] / speed[cid], up_s=0.0,
                                   hist=hist, gate=hist, tokens=tokens, expert_loss=np.where(row, 1.0, np.nan))
        nbytes = sum(layout.nbytes[n] for n in names)
        sent[cid] = core.Sent(cid, held, nbytes)
        received[cid] = core.Received(upd, report, nbytes)
    return core.RoundInputs(rnd, sent, received, close_s=None)


class ServerRound:
    """The server half of ``aligned`` for one synthetic fleet, split into timed steps."""

    def __init__(self, num_clients: int, num_experts: int, cohort: int, seed: int = 0):
        self.layout, self.params = tiny_layout(num_experts)
        self.ids, self.declared, self.examples = synthetic_fleet(num_clients, num_experts, seed)
        self.expert_bytes = np.full(num_experts, EXPERT_BYTES)
        self.cohort = cohort
        self.seed = seed
        self.settings = core.RoundSettings()
        self.state = core.init_state(self.layout.expert_keys)

    def probes(self) -> np.ndarray:
        """Each client's routing histogram from its profile query."""
        return rng_for(self.seed, "probe").dirichlet(np.full(len(self.layout.expert_keys), 0.3), size=len(self.ids))

    def register(self) -> None:
        """Profiles and probe histograms of every client, in one step (what the strategy does)."""
        hists, none = self.probes(), np.zeros(len(self.layout.expert_keys), bool)
        self.state, _ = core.ensure_clients(self.state, self.ids, self.declared)
        self.state = core.observe_fitness_batch(self.state, self.ids, list(hists), list(hists), [None] * len(self.ids),
                                                [none] * len(self.ids), self.settings.fitness)

    def register_one_by_one(self) -> None:
        """The same, one client at a time (the strategy's former path, for comparison)."""
        hists, none = self.probes(), np.zeros(len(self.layout.expert_keys), bool)
        for cid, h in zip(self.ids, hists):
            self.state, _ = core.ensure_client(self.state, cid, self.declared[cid])
            self.state = core.observe_fitness(self.state, cid, h, h, None, none, self.settings.fitness)

    def _problem(self, rnd: int, ids: list[str]) -> core.AssignmentProblem:
        return core.build_problem(self.state, ids, rnd=rnd, expert_bytes=self.expert_bytes, shared_bytes=SHARED_BYTES,
                                  num_examples=self.examples, local_epochs=1, deadline=DEADLINE_S,
                                  rng=rng_for(self.seed, "assign", rnd))

    def round(self, rnd: int) -> dict[str, float]:
        t = {}
        t0 = clock()
        everyone = self._problem(rnd, self.ids)
        ok = (everyone.fastest_time() <= DEADLINE_S) & (everyone.max_experts > 0)
        eligible = [c for c, keep in zip(self.ids, ok) if keep]
        t["eligible"] = clock() - t0
        t0 = clock()
        ids = sample_cohort(eligible, self.seed, "train", rnd, self.cohort / max(len(eligible), 1), 1)
        t["sample"] = clock() - t0
        t0 = clock()
        problem = self._problem(rnd, ids)
        t["problem"] = clock() - t0
        t0 = clock()
        score = core.solver_score(self.state.fitness, problem.rows, self.state.load.price)
        lo, hi = core.coverage_bounds(int(problem.max_experts.sum()), len(problem.cols))
        res = core.assign_experts(score, problem.expert_bytes, problem.memory, time_fixed=problem.time_fixed,
                                  time_per_expert=problem.time_per_expert, deadline=DEADLINE_S, lo=lo, hi=hi)
        t["solve"] = clock() - t0
        speed = {c: self.declared[c].declared_samples_per_s for c in ids}
        inputs = fabricate_replies(rnd, ids, res.x, self.layout, self.params, self.examples, speed, self.seed)
        t0 = clock()
        self.state, new_params, _ = core.apply_round(self.state, self.params, self.layout, inputs, self.settings)
        t["apply"] = clock() - t0
        self.params = new_params or self.params
        t["server_excl_solve"] = t["eligible"] + t["sample"] + t["problem"] + t["apply"]
        return t


def checkpoint_figures(server: ServerRound) -> dict[str, float]:
    """Save, size and load a checkpoint holding ``server``'s state."""
    from fedmoe_flwr.checkpoint import load_checkpoint, save_checkpoint
    from fedmoe_flwr.strategies import AlignedStrategy

    strategy = AlignedStrategy(server.layout)
    strategy.state = server.state
    strategy.num_examples = dict(server.examples)
    with tempfile.TemporaryDirectory() as tmp:
        t0, w0 = clock(), time.perf_counter()
        path = save_checkpoint(tmp, server.state.round, server.params, strategy, metrics=[], keep=1)
        save_s, save_wall_s = clock() - t0, time.perf_counter() - w0
        size = sum(f.stat().st_size for f in Path(path).iterdir())
        t0, w0 = clock(), time.perf_counter()
        ck = load_checkpoint(path)
        AlignedStrategy(server.layout).load_state_dict(ck.strategy_state)
        load_s, load_wall_s = clock() - t0, time.perf_counter() - w0
    return {"save_s": save_s, "load_s": load_s, "save_wall_s": save_wall_s, "load_wall_s": load_wall_s,
            "bytes": float(size)}


def measure(num_clients: int, num_experts: int, cohort: int, rounds: int, seed: int = 0,
            one_by_one_max: int = 10000) -> dict:
    one_by_one_s = None
    if num_clients <= one_by_one_max:
        slow = ServerRound(num_clients, num_experts, cohort, seed)
        t0 = clock()
        slow.register_one_by_one()
        one_by_one_s = clock() - t0
    server = ServerRound(num_clients, num_experts, cohort, seed)
    t0 = clock()
    server.register()
    register_s = clock() - t0
    same = None if one_by_one_s is None else bool(np.array_equal(slow.state.fitness.Q, server.state.fitness.Q))
    per_round = [server.round(r) for r in range(1, rounds + 1)]
    mean = {k: float(np.mean([t[k] for t in per_round])) for k in per_round[0]}
    # memory: a fresh fleet, traced (tracing slows allocation, so this pass is not timed)
    traced = ServerRound(num_clients, num_experts, cohort, seed)
    tracemalloc.start()
    traced.register()
    state_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    traced.round(1)
    round_peak = tracemalloc.get_traced_memory()[1] - state_bytes
    tracemalloc.stop()
    return {"clients": num_clients, "experts": num_experts, "cohort": cohort, "rounds": rounds,
            "register_s": register_s, "register_one_by_one_s": one_by_one_s,
            "one_by_one_same_fitness": same, "round_s": mean, "state_bytes": float(state_bytes),
            "round_peak_bytes": float(round_peak), "checkpoint": checkpoint_figures(server)}


def print_table(rows: list[dict]) -> None:
    head = (f"{'clients':>8} {'register':>9} {'1-by-1':>8} {'eligible':>9} {'sample':>7} {'problem':>8} {'apply':>7} "
            f"{'server*':>8} {'solve':>7} {'state MB':>9} {'peak MB':>8} {'ckpt save':>9} {'ckpt load':>9} {'ckpt MB':>8}")
    print(head)
    for r in rows:
        t, ck = r["round_s"], r["checkpoint"]
        one = "-" if r["register_one_by_one_s"] is None else f"{r['register_one_by_one_s']:.2f}s"
        print(f"{r['clients']:>8} {r['register_s']:>8.2f}s {one:>8} {t['eligible'] * 1e3:>7.0f}ms {t['sample'] * 1e3:>5.1f}ms "
              f"{t['problem'] * 1e3:>6.0f}ms {t['apply'] * 1e3:>5.0f}ms {t['server_excl_solve'] * 1e3:>6.0f}ms "
              f"{t['solve'] * 1e3:>5.0f}ms {r['state_bytes'] / 1e6:>9.1f} {r['round_peak_bytes'] / 1e6:>8.1f} "
              f"{ck['save_s']:>8.2f}s {ck['load_s']:>8.2f}s {ck['bytes'] / 1e6:>8.1f}")
    print("CPU seconds; register = profiles and probe histograms of every client in one step, 1-by-1 = the "
          "same one client at a time (the former strategy path); per round means; server* = eligible + sample + problem + apply (the solver apart); "
          "state = traced bytes after registration; peak = extra traced bytes during one round; "
          "checkpoint save/load CPU (wall in the JSON)")


def fleet_arguments(description: str) -> argparse.ArgumentParser:
    """The synthetic fleet's command-line settings, shared by the scale benchmarks."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--clients", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--cohort", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    return p


def main(argv=None) -> None:
    p = fleet_arguments(__doc__.splitlines()[0])
    p.add_argument("--one-by-one-max", type=int, default=10000,
                   help="also time one-at-a-time registration up to this many clients (it is quadratic)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    a = p.parse_args(argv)
    measure(200, a.experts, 100, 1)  # warm-up: imports and first-call costs out of the figures
    rows = []
    for n in a.clients:
        rows.append(measure(n, a.experts, min(a.cohort, n), a.rounds, one_by_one_max=a.one_by_one_max))
        print(f"measured {n} clients", flush=True)
    print_table(rows)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
