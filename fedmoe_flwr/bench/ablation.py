"""The ablation of ``aligned``: each mechanism switched off (or an optional one on) alone,
on paired seeds, against the defaults.

    python -m fedmoe_flwr.bench.ablation [--scenario fmnist-domain] [--seeds 3] [--rounds 40]
                                         [--variants aligned,-probe,...] [--out docs/bench/ablation]

Each variant is one Hydra sweep, ``python run.py -m +benchmark=S strategy=aligned seed=0,..
<variant overrides>``, so the data split, initial weights, fleet and cohorts are the same per
seed across variants. The table gives per variant the final accuracy, the accuracy AUC, rounds,
MB and simulated seconds to the scenario's first target (mean ± std over the seeds that reached
it, "(n/N)" when not all did), the expert-load CV, and the paired AUC difference to
``aligned`` (mean ± std over seeds). It writes ``OUT/ablation-<scenario>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fedmoe_flwr.bench.summary import load_runs, run_metrics, seed_stat

ROOT = Path(__file__).resolve().parents[2]
# name -> overrides; "-x" switches a default mechanism off, "+x" switches an optional one on
VARIANTS = {
    "aligned": [],
    "-probe": ["strategy.probe=false"],  # no routing histogram before the first round (cold fitness)
    "-deadline": ["strategy.use_deadline=false"],  # no deadline-aware expert counts nor client filter
    "-pace": ["strategy.pace_margin=0"],  # always wait for the deadline
    # the robustness defaults the benchmark scenarios keep (they switch the trust check off)
    "-defences": ["strategy.clip=none", "strategy.max_share=0", "strategy.max_capture=0", "strategy.min_consistency=0"],
    "+trust": ["strategy.trust_samples=100"],  # the trust check (on by default outside the benchmark)
    "+loss": ["strategy.w_loss=1"],  # expert-loss feedback in the fitness
    "+explore": ["strategy.kappa=0.1"],  # UCB exploration bonus
    "+prices": ["strategy.band=0.5", "strategy.price_step=0.1"],  # a load band with dual prices
    "+reprobe": ["strategy.reprobe=true"],  # the cohort's histograms under the current model, every round
    "+drop": ["train.drop_inactive=true"],  # clients route as the global model; tokens of absent experts skip
}
METRICS = ("final_accuracy", "accuracy_auc", "rounds_to_target", "bytes_to_target", "sim_time_to_target", "load_cv")


def sweep(scenario: str, variant: str, seeds: list[int], out: Path, rounds: int | None) -> list[str]:
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", f"+benchmark={scenario}", "strategy=aligned",
           f"seed={','.join(map(str, seeds))}", f"hydra.sweep.dir={out / scenario / variant}",
           "hydra.sweep.subdir=seed${seed}", "quiet=true", "report=false", "checkpoint_every=0"]
    return cmd + ([f"num_rounds={rounds}"] if rounds else []) + VARIANTS[variant]


def run(scenario: str, variants: list[str], seeds: list[int], out: Path, rounds: int | None, jobs: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    todo = [v for v in variants if not list((out / scenario / v).rglob("summary.json"))]
    for i in range(0, len(todo), jobs):
        t0 = time.perf_counter()
        batch = todo[i:i + jobs]
        procs = [subprocess.Popen(sweep(scenario, v, seeds, out, rounds), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                  stderr=open(out / f"{scenario}.{v}.log", "w")) for v in batch]
        codes = [p.wait() for p in procs]
        print(f"{scenario}: {', '.join(batch)} x {len(seeds)} seeds in {time.perf_counter() - t0:.0f} s", flush=True)
        if any(codes):
            raise SystemExit(f"a sweep failed (exit codes {codes}); see {out}/{scenario}.*.log")


def summarize(scenario: str, variants: list[str], out: Path) -> dict:
    per = {v: {int(r["seed"]): run_metrics(r) for r in load_runs(out / scenario / v)} for v in variants}
    seeds = sorted({s for d in per.values() for s in d})
    result = {}
    for v, by_seed in per.items():
        row = {m: seed_stat([by_seed.get(s, {}).get(m) for s in seeds]) for m in METRICS}
        base = per.get("aligned", {})
        diffs = [by_seed[s]["accuracy_auc"] - base[s]["accuracy_auc"] if s in by_seed and s in base else None for s in seeds]
        row["auc_minus_aligned"] = seed_stat(diffs)
        row["overrides"] = VARIANTS[v]
        result[v] = row
    return {"scenario": scenario, "seeds": seeds, "variants": result}


def table(summary: dict) -> list[str]:
    def f(stat, scale=1.0, digits=1):
        if stat["mean"] is None:
            return "not reached"
        n, total = stat["reached"], len(stat["values"])
        cell = f"{stat['mean'] * scale:.{digits}f}±{stat['std'] * scale:.{digits}f}"
        return cell + (f" ({n}/{total})" if n < total else "")

    lines = [f"| variant | final acc % | AUC % | rounds→target | MB→target | sim s→target | load CV | AUC - aligned |",
             "|---|---|---|---|---|---|---|---|"]
    for v, r in summary["variants"].items():
        lines.append(f"| {v} | {f(r['final_accuracy'], 100)} | {f(r['accuracy_auc'], 100)} | {f(r['rounds_to_target'])} | "
                     f"{f(r['bytes_to_target'], 1e-6, 0)} | {f(r['sim_time_to_target'], 1, 0)} | {f(r['load_cv'], 1, 2)} | "
                     f"{f(r['auc_minus_aligned'], 100) if v != 'aligned' else '-'} |")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", default="fmnist-domain")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=None, help="override the scenario's number of rounds")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default="bench_out/ablation")
    p.add_argument("--jobs", type=int, default=2, help="sweeps at a time")
    p.add_argument("--summarize-only", action="store_true")
    a = p.parse_args(argv)
    variants = [v for v in a.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not a.summarize_only:
        run(a.scenario, variants, list(range(a.seeds)), out, a.rounds, a.jobs)
    summary = summarize(a.scenario, variants, out)
    (out / f"ablation-{a.scenario}.json").write_text(json.dumps(summary, indent=1, default=float))
    print(f"\n{a.scenario} (seeds {summary['seeds']}; aligned and one change each)")
    print("\n".join(table(summary)))


if __name__ == "__main__":
    main()
