"""Summarise benchmark sweeps: one table per scenario, ``results.json``, plots.

Reads every job directory under a sweep (each holds ``summary.json`` and ``metrics.jsonl``,
as ``run.py`` writes them) and compares strategies on the same seeds.

``results.json`` schema::

    {scenario: {strategy: {metric: {"mean": x, "std": y, "values": [...]}}}}

with metrics ``rounds_to_target``, ``bytes_to_target``, ``sim_time_to_target``,
``final_accuracy``, ``final_loss``, ``final_perplexity``, ``final_personal_accuracy``,
``accuracy_auc``, ``load_cv``, ``solve_time``, ``bytes_total``, ``sim_time_total``, and
per-seed paired ratios ``{rounds,bytes,sim_time}_to_target_vs_<base>`` and the paired
difference ``accuracy_auc_minus_<base>`` for each base of :data:`BASELINES` that ran. A target
never reached is ``null`` in ``values`` (and makes that seed's ratios ``null``); ``mean``
and ``std`` are over the reached seeds, with ``reached`` counting them.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from fedmoe_flwr.outputs import read_jsonl

STRATEGY_ORDER = ["aligned", "flex", "greedy", "random", "rolling", "full", "dense",
                  "dense-small", "dense-large-exclusive", "heterofl", "fjord", "fedrolex"]
BASELINES = ["random", "flex", "full", "rolling", "dense-small", "heterofl", "fjord", "fedrolex"]
METRICS = [
    "rounds_to_target", "bytes_to_target", "sim_time_to_target", "final_accuracy", "final_loss", "final_perplexity",
    "final_personal_accuracy", "accuracy_auc", "load_cv", "solve_time", "bytes_total", "sim_time_total",
]


def load_runs(sweep_dir: str | Path) -> list[dict]:
    """Every finished job under ``sweep_dir``: its summary plus its metrics rows."""
    runs = []
    for summary_path in sorted(Path(sweep_dir).rglob("summary.json")):
        summary = json.loads(summary_path.read_text())
        metrics_path = summary_path.parent / "metrics.jsonl"
        summary["rows"] = read_jsonl(metrics_path) if metrics_path.exists() else []
        summary["dir"] = str(summary_path.parent)
        runs.append(summary)
    return runs


def run_metrics(run: dict) -> dict:
    target = run["to_target"][0] if run.get("to_target") else {}
    return {
        "rounds_to_target": target.get("rounds"),
        "bytes_to_target": target.get("bytes"),
        "sim_time_to_target": target.get("sim_time_s"),
        "final_accuracy": run.get("final_accuracy"),
        "final_loss": run.get("final_loss"),
        "final_perplexity": math.exp(run["final_loss"]) if run.get("final_loss") is not None else None,
        "bytes_total": run.get("bytes_total"),
        "sim_time_total": run.get("sim_time_total"),
        "final_personal_accuracy": run.get("final_personal_accuracy"),
        "accuracy_auc": run.get("accuracy_auc"),
        "load_cv": run.get("load_cv"),
        "solve_time": run.get("solve_time"),
    }


def seed_stat(values: list) -> dict:
    ok = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return {
        "mean": float(np.mean(ok)) if ok else None,
        "std": float(np.std(ok)) if ok else None,
        "values": values,
        "reached": len(ok),
    }


def summarize_scenario(runs: list[dict]) -> dict:
    """``{strategy: {metric: stat}}`` with paired comparisons to the baselines."""
    by = defaultdict(dict)  # strategy -> seed -> metrics
    for run in runs:
        by[run["strategy"]][int(run["seed"])] = run_metrics(run)
    seeds = sorted({s for d in by.values() for s in d})
    out = {}
    for strategy, per_seed in by.items():
        res = {m: seed_stat([per_seed.get(s, {}).get(m) for s in seeds]) for m in METRICS}
        for base in BASELINES:
            if base not in by or base == strategy:
                continue
            for m in ("rounds_to_target", "bytes_to_target", "sim_time_to_target"):
                ratios = []
                for s in seeds:
                    a, b = per_seed.get(s, {}).get(m), by[base].get(s, {}).get(m)
                    ratios.append(a / b if a is not None and b not in (None, 0) else None)
                res[f"{m}_vs_{base}"] = seed_stat(ratios)
            diffs = []
            for s in seeds:
                a, b = per_seed.get(s, {}).get("accuracy_auc"), by[base].get(s, {}).get("accuracy_auc")
                diffs.append(a - b if a is not None and b is not None else None)
            res[f"accuracy_auc_minus_{base}"] = seed_stat(diffs)
        res["seeds"] = seeds
        out[strategy] = res
    return dict(sorted(out.items(), key=lambda kv: STRATEGY_ORDER.index(kv[0]) if kv[0] in STRATEGY_ORDER else 99))


def _fmt(stat: dict, scale: float = 1.0, digits: int = 3, pct: bool = False) -> str:
    if stat is None:
        return "-"
    if stat["mean"] is None:
        return "not reached"
    n, total = stat["reached"], len(stat["values"])
    mean, std = stat["mean"] * scale, stat["std"] * scale
    s = f"{mean:.{digits}f}±{std:.{digits}f}" if not pct else f"{100 * mean:.1f}±{100 * std:.1f}"
    return s if n == total else f"{s} ({n}/{total})"


def print_tables(results: dict, console=None) -> None:
    """One rich table per scenario."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=200)
    for scenario, strategies in results.items():
        table = Table(title=f"{scenario} (mean±std over seeds; (n/N) = seeds reaching the target)")
        for col in ["strategy", "rounds→target", "MB→target", "sim s→target", "final acc %", "final ppl", "AUC %",
                    "personal acc %", "MB total", "load CV", "rounds vs random", "AUC − random"]:
            table.add_column(col, justify="right")
        for name, r in strategies.items():
            table.add_row(
                name, _fmt(r["rounds_to_target"], digits=1), _fmt(r["bytes_to_target"], 1e-6, 1),
                _fmt(r["sim_time_to_target"], digits=0), _fmt(r["final_accuracy"], pct=True),
                _fmt(r.get("final_perplexity"), digits=2), _fmt(r["accuracy_auc"], pct=True),
                _fmt(r["final_personal_accuracy"], pct=True), _fmt(r.get("bytes_total"), 1e-6, 0),
                _fmt(r["load_cv"], digits=2),
                _fmt(r.get("rounds_to_target_vs_random"), digits=2),
                _fmt(r.get("accuracy_auc_minus_random"), pct=True),
            )
        console.print(table)


def plot_scenario(runs: list[dict], out_dir: Path, scenario: str) -> list[Path]:
    """Accuracy vs rounds, vs bytes and vs simulated time, mean over seeds per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = defaultdict(list)
    for run in runs:
        by[run["strategy"]].append([r for r in run["rows"] if "accuracy" in r])
    paths = []
    for x_key, label, scale in (("round", "round", 1.0), ("bytes_total", "MB transferred", 1e-6),
                                ("sim_time_total_s", "simulated time (s)", 1.0)):
        fig, ax = plt.subplots(figsize=(6, 4))
        for strategy in sorted(by, key=lambda s: STRATEGY_ORDER.index(s) if s in STRATEGY_ORDER else 99):
            curves = by[strategy]
            n = min(len(c) for c in curves)
            acc = np.mean([[r["accuracy"] for r in c[:n]] for c in curves], axis=0)
            xs = np.mean([[r.get(x_key, 0.0) * scale for r in c[:n]] for c in curves], axis=0)
            ax.plot(xs, acc, label=strategy)
        ax.set_xlabel(label)
        ax.set_ylabel("global test accuracy")
        ax.set_title(scenario)
        ax.grid(alpha=0.3)
        ax.legend()
        path = out_dir / f"{scenario}_accuracy_vs_{x_key.split('_')[0]}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
