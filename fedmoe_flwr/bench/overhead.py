"""The plugin's own cost, measured like for like: the same training three ways in one run.

    python -m fedmoe_flwr.bench.overhead [--rounds 4] [--repeats 2] [--workers 2]
                                         [--quickstart] [--out overhead.json]

One process, one config (default: ``moe_cnn`` on Fashion-MNIST, 10 clients, every client
every round, all experts, no deadline, no dropouts), the same cohort, initial weights and
per-client seeds, and the same local-training function (``train_local``):

- ``(a) plain loop``: a PyTorch loop over the clients: load the global weights, train,
  average weighted by examples. No messages, no Flower: the compute limit. Also run with
  the routing histogram each fedmoe ClientApp measures before training (``a ... with
  routing stats``), to tell that signal's compute from the cost of messages.
- ``(b) fedmoe full``: the ``full`` strategy (every client all experts) through Flower's
  ``Strategy.start`` over the in-process grid and the shipped ClientApp.
- ``(c) Flower FedAvg``: Flower's stock ``FedAvg`` with the same ClientApp and cohort.
- ``(b) with N workers`` (``--workers N``, N > 1): (b) with ClientApp calls on N forked
  processes (:class:`~fedmoe_flwr.sim.LocalGrid`), which gives the same model.

Per-round times are taken after round 1 (which adds fedmoe's one-off profile query), each
way run ``--repeats`` times interleaved, the median kept; ratios compare CPU seconds of
this single-threaded process (wall-clock on a shared machine swings with other jobs), the
parallel speed-up compares wall-clock seconds. ``--quickstart`` measures the
tiny quickstart model instead (digits, ``moe_mlp``), where messages cost more than
training, and profiles (b) (:mod:`fedmoe_flwr.bench.profile_round`). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np

from fedmoe_flwr.config import Config, ModelName, StrategyName, TierConfig, DatasetName


def like_for_like_config(quickstart: bool = False) -> Config:
    """Every client trains every expert every round on a reliable, unhurried fleet."""
    cfg = Config()
    cfg.quiet = True
    cfg.strategy.name = StrategyName.full
    cfg.strategy.fraction_train = 1.0
    cfg.strategy.fraction_evaluate = 0.0
    cfg.fleet.tiers = [TierConfig(name="all", fraction=1.0, max_experts=-1, reliability=1.0)]
    cfg.fleet.deadline_s = None
    if not quickstart:
        cfg.dataset.name = DatasetName.fashion_mnist
        cfg.dataset.num_clients = 10
        cfg.dataset.max_train_samples = 6000
        cfg.model.name = ModelName.moe_cnn
        cfg.train.local_epochs = 2  # ~960 samples trained per client and round, 480 routed for statistics
    return cfg


def _experiment(cfg: Config):
    from fedmoe_flwr.experiment import build, experiment_for
    from fedmoe_flwr.models.slicing import to_array_record

    cfg, data, _, layout = experiment_for(cfg)
    return cfg, data, layout, to_array_record(build(cfg, data).state_dict())


def _stamp() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _rounds(stamps: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of each round from the stamps taken before and after each."""
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:])]


def plain_loop(cfg: Config, rounds: int, routing_stats: bool = False) -> list[tuple[float, float]]:
    """(a): the clients' local training and a weighted average, nothing else; (wall, CPU) per round.

    ``routing_stats``: also measure each client's routing histogram before training, on the
    inputs the ClientApp measures it on (``train.stats_samples``), as fedmoe's ClientApp does.
    """
    import torch

    from fedmoe_flwr.client.local_update import routing_stats as measure_routing, train_local
    from fedmoe_flwr.experiment import build
    from fedmoe_flwr.models import set_active_experts
    from fedmoe_flwr.seeding import rng_for

    cfg, data, _, initial = _experiment(cfg)
    model = build(cfg, data)
    torch.set_num_threads(1)  # as the ClientApp runs
    global_state = {n: torch.from_numpy(a.numpy().copy()) for n, a in initial.items()}
    t = cfg.train
    stamps = [_stamp()]
    for rnd in range(1, rounds + 1):
        total, acc = 0, None
        for pid in range(cfg.dataset.num_clients):
            x, y = data.client_train(pid)
            model.load_state_dict(global_state)
            set_active_experts(model, None)
            if routing_stats:
                measure_routing(model, x[: t.stats_samples])
            torch.manual_seed(int(rng_for(cfg.seed, "torch", rnd, pid).integers(2**31)))
            r = train_local(model, x, y, epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr,
                            rng=rng_for(cfg.seed, "batches", rnd, pid), momentum=t.momentum,
                            balance_weight=t.balance_weight, z_weight=t.z_weight, max_batches=t.max_batches)
            w = r.num_examples
            sd = model.state_dict()
            acc = {n: v.double() * w for n, v in sd.items()} if acc is None else {n: acc[n] + sd[n].double() * w for n in acc}
            total += w
        global_state = {n: (v / total).to(global_state[n].dtype) for n, v in acc.items()}
        stamps.append(_stamp())
    return _rounds(stamps)


def flower_rounds(cfg: Config, rounds: int, which: str, workers: int = 1) -> list[tuple[float, float]]:
    """(b) ``which="full"`` or (c) ``which="fedavg"`` through ``Strategy.start``; (wall, CPU) per round.

    CPU time is this process's: with ``workers`` > 1 the clients' time is in the workers.
    """
    from flwr.app import ConfigRecord
    from flwr.serverapp.strategy import FedAvg

    from fedmoe_flwr import protocol as P
    from fedmoe_flwr.client.app import make_client_app
    from fedmoe_flwr.config import flatten
    from fedmoe_flwr.server_app import build_strategy
    from fedmoe_flwr.sim import LocalGrid

    cfg, _, layout, initial = _experiment(cfg)
    if which == "full":
        strategy = build_strategy(cfg, layout)
    else:
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1,
                          weighted_by_key=P.NUM_EXAMPLES)
    stamps: list[tuple[float, float]] = []
    train_config = ConfigRecord({"local-epochs": cfg.train.local_epochs})
    with LocalGrid(make_client_app(flatten(cfg)), cfg.dataset.num_clients, seed=cfg.seed, workers=workers) as grid:
        strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds, train_config=train_config,
                       evaluate_fn=lambda r, a: stamps.append(_stamp()))
    return _rounds(stamps)


def measure(cfg: Config, rounds: int, repeats: int, workers: int) -> dict:
    """Every way ``repeats`` times, interleaved; the median of the per-round means after round 1.

    Ratios are of CPU seconds (robust to other jobs on a shared machine: every way is one
    single-threaded process); the parallel speed-up is of wall-clock seconds.
    """
    ways = {
        "a_plain_loop": lambda: plain_loop(cfg, rounds),
        "a_plain_loop_with_routing_stats": lambda: plain_loop(cfg, rounds, routing_stats=True),
        "b_fedmoe_full": lambda: flower_rounds(cfg, rounds, "full"),
        "c_flower_fedavg": lambda: flower_rounds(cfg, rounds, "fedavg"),
    }
    par = f"b_fedmoe_full_{workers}_workers"
    if workers > 1:
        ways[par] = lambda: flower_rounds(cfg, rounds, "full", workers)
    _experiment(cfg)  # load the data and build the model once, outside every timing
    runs: dict[str, list] = {k: [] for k in ways}
    worker_cpu: list[float] = []
    for _ in range(repeats):
        for name, fn in ways.items():
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            runs[name].append(fn())
            if name == par:  # the pool has exited: its workers' CPU time is now counted
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                worker_cpu.append((after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / rounds)
    out = {}
    for name, reps in runs.items():
        after_first = [r[1:] if len(r) > 1 else r for r in reps]
        out[name] = {
            "wall_s": float(np.median([np.mean([w for w, _ in r]) for r in after_first])),
            "cpu_s": float(np.median([np.mean([c for _, c in r]) for r in after_first])),
            "first_round_wall_s": float(np.median([r[0][0] for r in reps])),
            "runs_wall_s": [[w for w, _ in r] for r in reps],
        }
    a, a2, b, c = (out[k]["cpu_s"] for k in ("a_plain_loop", "a_plain_loop_with_routing_stats", "b_fedmoe_full",
                                             "c_flower_fedavg"))
    ratios = {"b_over_a": b / a, "b_over_c": b / c, "c_over_a": c / a, "b_over_a_with_routing_stats": b / a2}
    if workers > 1:
        ratios[f"speedup_{workers}_workers_wall"] = out["b_fedmoe_full"]["wall_s"] / out[par]["wall_s"]
        # Amdahl: the server's share of a round stays serial, the clients' spreads over the workers
        serial, spread = out[par]["cpu_s"], float(np.median(worker_cpu))
        out[par]["workers_cpu_s_per_round"] = spread
        ratios["expected_speedup"] = {str(n): (serial + spread) / (serial + spread / n) for n in (2, 4, 8, 16)}
    n = cfg.dataset.num_clients
    t = cfg.train
    return {"config": {"dataset": cfg.dataset.name.value, "model": cfg.model.name.value, "clients": n,
                       "rounds": rounds, "repeats": repeats, "local_epochs": t.local_epochs,
                       "max_batches": t.max_batches, "stats_samples": t.stats_samples,
                       "max_train_samples": cfg.dataset.max_train_samples},
            "ways": out, "ratios": ratios,
            "per_message_cpu_ms_over_a": {"b": (b - a) / n * 1e3, "c": (c - a) / n * 1e3,
                                          "routing_stats": (a2 - a) / n * 1e3}}


def print_table(res: dict) -> None:
    c = res["config"]
    print(f"{c['model']} on {c['dataset']}, {c['clients']} clients (all, every round), {c['local_epochs']} local "
          f"epoch(s), max_batches {c['max_batches']}, {c['rounds']} rounds x {c['repeats']} repeats; "
          "per round after round 1, median")
    a = res["ways"]["a_plain_loop"]["cpu_s"]
    print(f"{'way':<34} {'CPU s':>7} {'x (a)':>7} {'wall s':>7} {'round 1 wall s':>15}")
    for name, v in res["ways"].items():
        print(f"{name:<34} {v['cpu_s']:>7.3f} {v['cpu_s'] / a:>7.3f} {v['wall_s']:>7.3f} {v['first_round_wall_s']:>15.3f}")
    print("ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in res["ratios"].items() if not isinstance(v, dict)))
    if "expected_speedup" in res["ratios"]:
        print("expected speed-up of the parallel grid with N free cores (server CPU serial, workers' CPU spread): "
              + ", ".join(f"N={n}: {v:.2f}x" for n, v in res["ratios"]["expected_speedup"].items()))
    m = res["per_message_cpu_ms_over_a"]
    print(f"CPU per client and round over (a): fedmoe {m['b']:.1f} ms, Flower FedAvg {m['c']:.1f} ms, "
          f"of which routing statistics {m['routing_stats']:.1f} ms")


def solver_times(seeds: int = 3) -> dict:
    """Assignment solve time, 1,000 clients x 64 experts, uniform and mixed expert sizes."""
    from fedmoe_flwr.core import bench_solver

    out = {}
    for uniform in (True, False):
        times = [bench_solver(1000, 64, s, uniform_bytes=uniform).solve_time_s for s in range(seeds)]
        out["uniform_bytes" if uniform else "mixed_bytes"] = {"mean_s": float(np.mean(times)), "max_s": float(np.max(times))}
    return out


def round_times(rounds: int, cfg: Config | None = None, repeats: int = 1, workers: int = 1) -> dict:
    """:func:`measure` on ``cfg`` (default: :func:`like_for_like_config`)."""
    return measure(cfg or like_for_like_config(), rounds, repeats, workers)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="also run (b) on this many worker processes (1 = skip)")
    p.add_argument("--quickstart", action="store_true", help="the tiny quickstart model, and a profile of (b)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    a = p.parse_args(argv)
    from fedmoe_flwr.simulation import quiet_flower

    import flwr.serverapp  # noqa: F401  (importing flwr resets its log level: silence it after)

    quiet_flower()
    cfg = like_for_like_config(a.quickstart)
    res = measure(cfg, a.rounds, a.repeats, a.workers)
    print_table(res)
    if a.quickstart:
        from fedmoe_flwr.bench.profile_round import profile_full_rounds

        res["profile"] = profile_full_rounds(cfg, a.rounds)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
