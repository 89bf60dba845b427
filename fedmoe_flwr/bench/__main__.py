"""The convergence benchmark: Hydra sweeps of every strategy on every scenario, then a summary.

    python -m fedmoe_flwr.bench [--quick] [--scenario NAME ...] [--seeds N] [--out DIR]
                                [--strategies aligned,random,...] [--jobs 2] [--summarize-only]

Each scenario is a config under ``conf/benchmark/``; the sweep for one scenario is exactly

    python run.py -m +benchmark=NAME strategy=aligned,flex,...,fedrolex seed=0,..,N-1

(run it by hand and summarise it with ``--summarize-only --out DIR`` if you like). Every
strategy runs on the same paired seeds, so the data split, initial weights, fleet and client
sequence are the same per seed. ``--quick`` uses 3 seeds (1 for shakespeare-lm), fewer rounds and, for shakespeare-lm, less
work per round (``QUICK_OVERRIDES``).
The summary prints one table per scenario and writes ``DIR/results.json`` and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fedmoe_flwr.bench.summary import STRATEGY_ORDER, load_runs, plot_scenario, print_tables, summarize_scenario

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ["shakespeare-lm", "fmnist-label", "fmnist-tight", "fmnist-domain", "synthetic", "shakespeare", "quick"]
# Rounds in --quick mode (the full mode uses each scenario config's num_rounds).
QUICK_ROUNDS = {"fmnist-label": 30, "fmnist-tight": 30, "fmnist-domain": 30, "synthetic": 30, "shakespeare": 10, "quick": 20,
                "shakespeare-lm": 12}
# --quick also shrinks the LM scenario's work to fit ~10 minutes on 2 cores with every strategy:
# 100 roles (10 per round), 5 local batches, 1,000 test windows, 5% of clients in personalised
# evaluation, a lower target.
QUICK_OVERRIDES = {"shakespeare-lm": ["dataset.num_clients=100", "strategy.fraction_train=0.1", "strategy.min_train_nodes=10",
                                      "train.max_batches=5", "dataset.max_test_samples=1000", "eval_every=2",
                                      "strategy.fraction_evaluate=0.05", "targets=[0.25]"]}
QUICK_SEEDS = {"shakespeare-lm": 1}  # one paired seed: 12 strategies x 12 rounds fill the ~10 minutes


def sweep_command(scenario: str, strategies: list[str], seeds: list[int], out: Path, rounds: int | None,
                  overrides: list[str] = ()) -> list[str]:
    cmd = [
        sys.executable, str(ROOT / "run.py"), "-m", f"+benchmark={scenario}",
        f"strategy={','.join(strategies)}", f"seed={','.join(map(str, seeds))}",
        f"hydra.sweep.dir={out / scenario}", "hydra.sweep.subdir=${strategy.name}-seed${seed}",
        "quiet=true", "report=false", "checkpoint_every=0",
    ]
    if rounds is not None:
        cmd.append(f"num_rounds={rounds}")
    return cmd + list(overrides)


def run_sweeps(scenarios, strategies, seeds, out: Path, quick: bool, jobs: int, rounds: int | None = None,
               seeds_given: bool = True) -> None:
    """Launch the sweeps; ``jobs`` processes at a time, each a share of the strategies."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    for scenario in scenarios:
        n_rounds = rounds or (QUICK_ROUNDS[scenario] if quick else None)
        overrides = QUICK_OVERRIDES.get(scenario, []) if quick else []
        run_seeds = seeds[: QUICK_SEEDS[scenario]] if quick and not seeds_given and scenario in QUICK_SEEDS else seeds
        shares = [strategies[i::jobs] for i in range(jobs) if strategies[i::jobs]]
        t0 = time.perf_counter()
        procs = [
            subprocess.Popen(sweep_command(scenario, share, run_seeds, out, n_rounds, overrides), cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=open(out / f"{scenario}.{i}.log", "w"))
            for i, share in enumerate(shares)
        ]
        codes = [p.wait() for p in procs]
        print(f"{scenario}: {len(strategies)} strategies x {len(run_seeds)} seeds in {time.perf_counter() - t0:.0f} s", flush=True)
        if any(codes):
            raise SystemExit(f"{scenario}: a sweep failed (exit codes {codes}); see {out}/{scenario}.*.log")


def summarize(out: Path, scenarios: list[str]) -> dict:
    results = {}
    for scenario in scenarios:
        runs = load_runs(out / scenario)
        if not runs:
            continue
        results[scenario] = summarize_scenario(runs)
        plot_scenario(runs, out, scenario)
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=1)
    print_tables(results)
    print(f"wrote {out / 'results.json'} and plots in {out}")
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Run and summarise the fedmoe_flwr convergence benchmark.")
    p.add_argument("--quick", action="store_true", help="3 seeds and fewer rounds (about 10 minutes)")
    p.add_argument("--scenario", nargs="+", default=None, choices=SCENARIOS)
    p.add_argument("--seeds", type=int, default=None, help="paired seeds (default 5, --quick 3)")
    p.add_argument("--strategies", default=",".join(STRATEGY_ORDER))
    p.add_argument("--out", default="bench_out")
    p.add_argument("--jobs", type=int, default=2, help="sweep processes at a time")
    p.add_argument("--rounds", type=int, default=None, help="override every scenario's number of rounds")
    p.add_argument("--summarize-only", action="store_true")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    scenarios = a.scenario or (["quick", "fmnist-label"] if a.quick else SCENARIOS)
    seeds = list(range(a.seeds or (3 if a.quick else 5)))
    strategies = [s for s in a.strategies.split(",") if s]
    if not a.summarize_only:
        run_sweeps(scenarios, strategies, seeds, out, a.quick, a.jobs, a.rounds, seeds_given=a.seeds is not None)
    summarize(out, scenarios)


if __name__ == "__main__":
    main()
