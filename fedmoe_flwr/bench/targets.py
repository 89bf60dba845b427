"""The capacity-bound scenario's targets (docs/peers.md#targets), measured on a benchmark sweep.

    python -m fedmoe_flwr.bench.targets bench_out/shakespeare-lm [--strategy aligned] [--json out.json]

Reads the finished runs of one scenario (as ``python -m fedmoe_flwr.bench`` writes them) and
checks each target paired per seed, with the value measured, the bar and whether it holds:

- time: ``strategy`` reaches the best baseline's final accuracy (mean over seeds) in at most
  0.5x the simulated time of the fastest non-MoE baseline to reach it;
- final accuracy >= the best non-MoE baseline's + 3 points, perplexity <= 0.95x its;
- rounds to the scenario's first target <= 0.8x ``random`` and <= 0.9x ``rolling``;
  accuracy AUC >= ``random`` + 3 points;
- personalised accuracy >= ``random`` + 5 points; expert-load CV <= 0.1;
- bytes to the first target <= 0.5x ``full``.

A comparison a seed cannot make (a target not reached) is left out of its mean and counted.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from fedmoe_flwr.bench.summary import load_runs, run_metrics
from fedmoe_flwr.outputs import to_target

NON_MOE = ("dense-small", "heterofl", "fjord", "fedrolex")
BASELINES = NON_MOE + ("dense-large-exclusive", "random", "rolling", "full", "flex", "greedy")


def _mean(values) -> tuple[float | None, int]:
    ok = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return (float(np.mean(ok)) if ok else None), len(ok)


def _paired(by: dict, a: str, b: str, metric: str, op) -> tuple[float | None, int, int]:
    """Mean over seeds of ``op(a's metric, b's metric)``; (value, seeds used, seeds in all)."""
    seeds = sorted(set(by.get(a, {})) & set(by.get(b, {})))
    vals = []
    for s in seeds:
        x, y = by[a][s].get(metric), by[b][s].get(metric)
        vals.append(op(x, y) if x is not None and y is not None else None)
    mean, n = _mean(vals)
    return mean, n, len(seeds)


def measure(runs: list[dict], strategy: str = "aligned") -> dict:
    """Every target's measured value for ``strategy`` on these runs."""
    by = defaultdict(dict)  # strategy -> seed -> metrics (+ rows)
    for run in runs:
        by[run["strategy"]][int(run["seed"])] = {**run_metrics(run), "rows": run["rows"]}
    if strategy not in by:
        raise SystemExit(f"no {strategy!r} runs here; found {sorted(by)}")
    final = {s: _mean([m["final_accuracy"] for m in by[s].values()])[0] for s in by}
    ppl = {s: _mean([m["final_perplexity"] for m in by[s].values()])[0] for s in by}
    baselines = [b for b in BASELINES if b in by and b != strategy]
    non_moe = [b for b in NON_MOE if b in by]
    out: dict = {"strategy": strategy, "seeds": sorted(by[strategy]), "targets": {}}
    t = out["targets"]

    def add(name, value, bar, holds, **extra):
        t[name] = {"value": value, "bar": bar, "holds": bool(holds) if value is not None else False, **extra}

    if baselines and non_moe:
        best = max(baselines, key=lambda b: final[b] if final[b] is not None else -1)
        level = final[best]
        for s in by:
            for m in by[s].values():
                m["sim_to_best"] = to_target(m["rows"], level)["sim_time_s"]
        fastest = min(non_moe, key=lambda b: _mean([m["sim_to_best"] for m in by[b].values()])[0] or math.inf)
        ratio, n, total = _paired(by, strategy, fastest, "sim_to_best", lambda a, b: a / b if b else None)
        reached = sum(m["sim_to_best"] is not None for m in by[strategy].values())
        add("sim_time_to_best_final_vs_fastest_non_moe", ratio, 0.5, ratio is not None and ratio <= 0.5,
            best_baseline=best, level=level, against=fastest, seeds_compared=f"{n}/{total}",
            **{f"{strategy}_reaches_it": f"{reached}/{len(by[strategy])}"})
        top = max(non_moe, key=lambda b: final[b] if final[b] is not None else -1)
        diff, n, total = _paired(by, strategy, top, "final_accuracy", lambda a, b: 100 * (a - b))
        add("final_accuracy_points_vs_best_non_moe", diff, 3.0, diff is not None and diff >= 3.0, against=top,
            seeds_compared=f"{n}/{total}")
        low = min(non_moe, key=lambda b: ppl[b] if ppl[b] is not None else math.inf)
        r, n, total = _paired(by, strategy, low, "final_perplexity", lambda a, b: a / b)
        add("perplexity_ratio_vs_best_non_moe", r, 0.95, r is not None and r <= 0.95, against=low,
            seeds_compared=f"{n}/{total}")
    for base, bar in (("random", 0.8), ("rolling", 0.9)):
        if base in by:
            r, n, total = _paired(by, strategy, base, "rounds_to_target", lambda a, b: a / b)
            add(f"rounds_to_target_vs_{base}", r, bar, r is not None and r <= bar, seeds_compared=f"{n}/{total}")
    if "random" in by:
        d, n, total = _paired(by, strategy, "random", "accuracy_auc", lambda a, b: 100 * (a - b))
        add("auc_points_vs_random", d, 3.0, d is not None and d >= 3.0, seeds_compared=f"{n}/{total}")
        d, n, total = _paired(by, strategy, "random", "final_personal_accuracy", lambda a, b: 100 * (a - b))
        add("personal_accuracy_points_vs_random", d, 5.0, d is not None and d >= 5.0, seeds_compared=f"{n}/{total}")
    cv, _ = _mean([m["load_cv"] for m in by[strategy].values()])
    add("load_cv", cv, 0.1, cv is not None and cv <= 0.1)
    if "full" in by:
        r, n, total = _paired(by, strategy, "full", "bytes_to_target", lambda a, b: a / b)
        add("bytes_to_target_vs_full", r, 0.5, r is not None and r <= 0.5, seeds_compared=f"{n}/{total}")
    return out


def table(result: dict) -> list[str]:
    lines = [f"targets for {result['strategy']} (seeds {result['seeds']})", "| target | measured | bar | holds |",
             "|---|---|---|---|"]
    for name, r in result["targets"].items():
        value = "not measurable" if r["value"] is None else f"{r['value']:.2f}"
        note = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in r.items() if k not in ("value", "bar", "holds"))
        lines.append(f"| {name}{f' ({note})' if note else ''} | {value} | {r['bar']} | {'yes' if r['holds'] else 'no'} |")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep_dir", help="a scenario's sweep directory, e.g. bench_out/shakespeare-lm")
    p.add_argument("--strategy", default="aligned")
    p.add_argument("--json", default=None, help="write the result here too")
    a = p.parse_args(argv)
    result = measure(load_runs(a.sweep_dir), a.strategy)
    print("\n".join(table(result)))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
