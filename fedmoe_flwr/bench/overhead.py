"""The plugin's own costs, printed (never asserted): solver time and per-round overhead.

    python -m fedmoe_flwr.bench.overhead [--rounds 5] [--out overhead.json]

1. Assignment solve time for a cohort of 1,000 clients x 64 experts (memory, deadline,
   balance), for uniform and mixed expert sizes (the latter is a true MILP).
2. Wall-clock per round of ``aligned`` and of Flower's stock ``FedAvg`` on the same MoE
   model, data and fleet, over the in-process grid, evaluation excluded.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg

from fedmoe_flwr.config import Config
from fedmoe_flwr.core import bench_solver


def solver_times(seeds: int = 3) -> dict:
    out = {}
    for uniform in (True, False):
        times = [bench_solver(1000, 64, s, uniform_bytes=uniform).solve_time_s for s in range(seeds)]
        out["uniform_bytes" if uniform else "mixed_bytes"] = {"mean_s": float(np.mean(times)), "max_s": float(np.max(times))}
    return out


def round_times(rounds: int, cfg: Config | None = None) -> dict:
    from fedmoe_flwr.client.app import make_client_app
    from fedmoe_flwr.config import flatten
    from fedmoe_flwr.experiment import build, experiment_for
    from fedmoe_flwr.models.slicing import to_array_record
    from fedmoe_flwr.server_app import build_strategy
    from fedmoe_flwr.sim import LocalGrid

    cfg = cfg or Config()
    cfg, data, _, layout = experiment_for(cfg)
    out = {}
    for name in ("aligned", "fedavg"):
        grid = LocalGrid(make_client_app(flatten(cfg)), cfg.dataset.num_clients, seed=cfg.seed)
        strategy = (
            build_strategy(cfg, layout) if name == "aligned"
            else FedAvg(fraction_train=cfg.strategy.fraction_train, fraction_evaluate=0.0, min_available_nodes=1)
        )
        stamps = []
        strategy.start(grid=grid, initial_arrays=to_array_record(build(cfg, data).state_dict()), num_rounds=rounds,
                       train_config=ConfigRecord({"local-epochs": cfg.train.local_epochs}),
                       evaluate_fn=lambda r, a: stamps.append(time.perf_counter()))
        per_round = np.diff(stamps)
        out[name] = {"mean_round_s": float(per_round[1:].mean() if rounds > 1 else per_round.mean()), "rounds": rounds}
    out["aligned_over_fedavg"] = out["aligned"]["mean_round_s"] / out["fedavg"]["mean_round_s"]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    a = p.parse_args(argv)
    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)
    res = {"solver_1000x64": solver_times(), "round_time": round_times(a.rounds)}
    for k, v in res["solver_1000x64"].items():
        print(f"solver 1000 clients x 64 experts ({k}): mean {v['mean_s'] * 1e3:.0f} ms, max {v['max_s'] * 1e3:.0f} ms")
    rt = res["round_time"]
    print(f"per round (in-process grid, digits, 20 clients): aligned {rt['aligned']['mean_round_s'] * 1e3:.0f} ms, "
          f"Flower FedAvg {rt['fedavg']['mean_round_s'] * 1e3:.0f} ms ({rt['aligned_over_fedavg']:.2f}x)")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
