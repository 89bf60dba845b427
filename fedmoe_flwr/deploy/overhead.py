"""Per-round wall time of the same run: in-process simulation, Flower simulation, loopback deployment.

    python -m fedmoe_flwr.deploy.overhead                      # 3 clients, 6 rounds, all four ways
    python -m fedmoe_flwr.deploy.overhead --clients 5 --rounds 8 --ways local,deployment

The config is the deployment test's (digits, a 4-expert MoE, every client trains every
round, no deadline). Each way runs the same ServerApp; ``metrics.jsonl``'s ``wall_time_s``
(seconds since the ServerApp started) gives the steady per-round time, measured from the
end of round 1 to the end of the last round so that start-up (Ray, process spawns, the
first QUERY) is reported apart, as ``first round``. ``end to end`` is the whole command.
Nothing here is asserted in tests: these are measurements of this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from fedmoe_flwr.config import Backend, Config, TierConfig, flatten

ROOT = Path(__file__).resolve().parents[2]
WAYS = ("local", "ray", "flwr-sim", "deployment")


def overhead_config(clients: int, rounds: int) -> Config:
    cfg = Config()
    cfg.num_rounds = rounds
    cfg.quiet = True
    cfg.save_model = False
    cfg.dataset.num_clients = clients
    cfg.model.num_experts = 4
    cfg.model.d_model = cfg.model.d_hidden = 32
    cfg.strategy.fraction_train = 1.0
    cfg.strategy.min_train_nodes = clients
    cfg.strategy.pace_margin = 0.0
    cfg.fleet.deadline_s = None
    cfg.fleet.jitter = 0.0
    cfg.fleet.tiers = [
        TierConfig(name="small", fraction=1 / 3, max_experts=1),
        TierConfig(name="mid", fraction=1 / 3, max_experts=2),
        TierConfig(name="large", fraction=1 / 3, max_experts=-1),
    ]
    cfg.train.local_epochs = 1
    return cfg


def _rows(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def measure(way: str, cfg: Config, work: Path) -> dict:
    """Run ``cfg`` one way; per-round and start-up seconds."""
    from fedmoe_flwr.deploy.launcher import LocalSimulation, LoopbackFederation
    from fedmoe_flwr.deploy.nodes import fleet_node_configs
    from fedmoe_flwr.simulation import run as simulate

    out = work / way
    t0 = time.perf_counter()
    run_config = {**flatten(cfg), "output-dir": str(out), "round-timeout": 600.0}
    if way in ("local", "ray"):
        cfg.backend = Backend(way)
        simulate(cfg, out)
    elif way == "flwr-sim":
        with LocalSimulation(work / "flwr-sim-home", num_supernodes=cfg.dataset.num_clients) as sim:
            sim.run(ROOT, run_config, timeout=1800, done_file=out / "summary.json")
    elif way == "deployment":
        with LoopbackFederation(work / "loopback", fleet_node_configs(cfg)) as fed:
            fed.run(ROOT, run_config, timeout=1800, done_file=out / "summary.json")
    else:
        raise ValueError(f"unknown way {way!r}; allowed: {WAYS}")
    total = time.perf_counter() - t0
    rows = _rows(out)
    w = {r["round"]: r["wall_time_s"] for r in rows}
    steady = (w[cfg.num_rounds] - w[1]) / (cfg.num_rounds - 1)
    return {"way": way, "per_round_s": steady, "rounds_per_s": 1.0 / steady, "first_round_s": w[1],
            "end_to_end_s": total, "final_accuracy": rows[-1].get("accuracy")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--ways", default=",".join(WAYS))
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    args = ap.parse_args(argv)
    work = args.out or Path(tempfile.mkdtemp(prefix="fedmoe-overhead-"))
    results = []
    for way in args.ways.split(","):
        r = measure(way, overhead_config(args.clients, args.rounds), work)
        results.append(r)
        print(f"{way:>10}: {r['per_round_s']:6.2f} s/round ({r['rounds_per_s']:.3f} rounds/s), "
              f"first round {r['first_round_s']:6.1f} s, end to end {r['end_to_end_s']:6.1f} s, "
              f"final accuracy {r['final_accuracy']:.3f}", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(json.dumps({"clients": args.clients, "rounds": args.rounds, "cpus": os.cpu_count(),
                      "load_avg_1min_at_end": load, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
