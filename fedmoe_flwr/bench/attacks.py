"""The attack benchmark: what lying clients do to a run, with and without the defences.

    python -m fedmoe_flwr.bench.attacks [--scenario quickstart fmnist] [--seeds 5] [--fmnist-seeds 3]
                                        [--attacks sign_flip,...] [--out docs/bench/attacks.json]

Every run is ``run_server`` over the in-process grid (:class:`~fedmoe_flwr.sim.LocalGrid`)
with the ClientApp wrapped by :func:`~fedmoe_flwr.bench.attackers.attacked_client_app`;
malicious partition ids are drawn from the seed (10% and 20% of the clients) and the
target expert is ``L0.E0``. "defences off" is ``strategy.clip=none strategy.max_share=0
strategy.sample_drift=1e9 strategy.min_consistency=0 strategy.trust_samples=0
strategy.max_capture=0`` (``norm_bound`` stays None in both;
the identity binding cannot be switched off). Paired seeds: the data, fleet, initial model
and cohorts are the same across the rows of one seed.

Per run: the final test accuracy and ``accuracy_last``, the mean of the last 3 evaluations
(the quickstart evaluates every round, FMNIST every 2: label-skewed runs swing by several
points from one round to the next); ``target_share``, the mean over rounds of the malicious
clients' share of the target expert's aggregation weight (vs ``fair`` = their share of
the population); ``shared_share``, the same for the shared tensors; ``max_ratio``, the
largest weight one client got on one expert (or the shared tensors) in one round over the
fair share ``1/m`` (``m`` = clients with a positive weight there). Results are kept in the JSON file as they come (a rerun skips
runs already there), and a table is printed.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from fedmoe_flwr.bench.attackers import ATTACKS, AttackPlan, attacked_client_app, choose_malicious, choose_victims

SCENARIOS = {
    "quickstart": ["eval_every=1"],  # the quickstart as shipped (30 rounds), evaluated every round
    # the benchmark scenarios switch the trust check off (strategy comparisons); here it is under test
    "fmnist": ["+benchmark=fmnist-label", "num_rounds=30", "eval_every=2", "strategy.fraction_evaluate=0",
               "strategy.trust_samples=100"],
}
COMMON = ["backend=local", "quiet=true", "report=false", "checkpoint_every=0", "save_model=false", "loggers=[jsonl]"]
LAST_EVALS = 3  # accuracy_last: the mean of the last evaluations (label-skewed runs oscillate)
DEFENCES_OFF = ["strategy.clip=none", "strategy.max_share=0", "strategy.sample_drift=1e9", "strategy.min_consistency=0",
                "strategy.trust_samples=0", "strategy.max_capture=0"]
FRACTIONS = (0.1, 0.2)


def run_key(scenario: str, seed: int, attack: str, fraction: float, defences: bool, variant: str = "") -> str:
    return f"{scenario}{'+' + variant if variant else ''}/seed{seed}/{attack}/{fraction:g}/{'on' if defences else 'off'}"


def influence(details: list[dict], malicious: set[str], target: str) -> dict:
    """Malicious shares of the target expert's and the shared weight, and the largest
    single-client weight over its fair share (module doc), from ``details.jsonl`` rows."""
    target_shares, shared_shares, holder_shares, max_ratio = [], [], [], 0.0
    for row in details:
        weights = row.get("weights") or {}
        groups: dict[str, dict[str, float]] = {}
        for cid, w in weights.items():
            for key, v in w.items():
                if v and v > 0:  # a holder that routed no token has no weight to share
                    groups.setdefault(key, {})[cid] = float(v)
        for key, by_client in groups.items():
            total = sum(by_client.values())
            if total <= 0:
                continue
            max_ratio = max(max_ratio, max(by_client.values()) / total * len(by_client))
            bad = sum(v for c, v in by_client.items() if c in malicious) / total
            if key == target:
                target_shares.append(bad)
                holder_shares.append(sum(c in malicious for c in by_client) / len(by_client))
            elif key == "shared":
                shared_shares.append(bad)
    mean = lambda xs: float(np.mean(xs)) if xs else 0.0  # noqa: E731
    return {"target_share": mean(target_shares), "target_holder_share": mean(holder_shares),
            "target_rounds": len(target_shares), "shared_share": mean(shared_shares), "max_ratio": max_ratio}


def run_one(scenario: str, seed: int, attack: str | None, fraction: float, defences: bool,
            extra: tuple[str, ...] = (), variant: str = "") -> dict:
    """One run; ``attack=None`` is the clean run; ``extra`` overrides go after the rest."""
    from fedmoe_flwr.client.app import make_client_app
    from fedmoe_flwr.config import flatten
    from fedmoe_flwr.deploy.app_config import quickstart_config
    from fedmoe_flwr.experiment import experiment_for
    from fedmoe_flwr.server_app import run_server
    from fedmoe_flwr.sim import LocalGrid
    from fedmoe_flwr.simulation import quiet_flower

    overrides = COMMON + SCENARIOS[scenario] + [f"seed={seed}"] + ([] if defences else DEFENCES_OFF) + list(extra)
    cfg = quickstart_config(overrides)
    layout = experiment_for(cfg)[3]
    n = cfg.dataset.num_clients
    malicious = choose_malicious(n, fraction, seed) if attack else frozenset()
    plan = AttackPlan(attack or "sign_flip", malicious, tuple(layout.expert_keys), target_expert=0,
                      cohort_size=max(int(round(n * cfg.strategy.fraction_train)), cfg.strategy.min_train_nodes),
                      seed=seed, victims=choose_victims(n, malicious, seed) if attack == "takeover" else {})
    app = attacked_client_app(make_client_app(flatten(cfg)), plan)
    quiet_flower()
    logging.getLogger("flwr").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        summary = run_server(LocalGrid(app, n, seed=seed), cfg, tmp)
        details = [json.loads(line) for line in (Path(tmp) / "details.jsonl").read_text().splitlines() if line]
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines() if line]
    given = {int(node): ids[1] for row in details for node, ids in row.get("refused_claims", {}).items()}
    trained_as = plan.trained_as(given)
    crashes = {c: why for row in details for c, why in row.get("dropped", {}).items() if "Error" in why}
    if crashes:  # a bug in the wrapper would show up as dropped clients, not as a result
        raise RuntimeError(f"client apps raised: {dict(list(crashes.items())[:3])}")
    out = {"scenario": scenario + (f"+{variant}" if variant else ""), "overrides": list(extra), "seed": seed, "attack": attack or "clean", "fraction": fraction if attack else 0.0,
           "defences": defences, "accuracy": summary["final_accuracy"],
           "accuracy_last": float(np.mean([r["accuracy"] for r in rows if r["round"] > 0 and "accuracy" in r][-LAST_EVALS:])),
           "rounds": cfg.num_rounds,
           "num_clients": n, "malicious": sorted(malicious), "trained_as": sorted(trained_as),
           "rejected_total": summary.get("rejected_total"), "dropped_total": summary.get("dropped_total")}
    out.update(influence(details, trained_as, layout.expert_keys[0]))
    return out


def table(results: dict) -> list[str]:
    """Mean over seeds per (scenario, attack, fraction): accuracy and its paired change
    against the clean run with defences on, and against ``absent`` and ``excluded`` at the same
    fraction with defences on (the attackers' updates missing; the attackers not in the
    federation at all: what a perfect filter leaves), target share vs fair, max single-client
    ratio."""
    runs = list(results.values())
    lines = []
    for scenario in sorted({r["scenario"] for r in runs}):
        rs = [r for r in runs if r["scenario"] == scenario]
        acc = "accuracy_last" if all("accuracy_last" in r for r in rs) else "accuracy"
        clean = {r["seed"]: r[acc] for r in rs if r["attack"] == "clean" and r["defences"]}
        ceilings = {name: {(r["seed"], r["fraction"]): r[acc] for r in rs if r["attack"] == name and r["defences"]}
                    for name in ("absent", "excluded")}
        what = f"mean of the last {LAST_EVALS} evaluations" if acc == "accuracy_last" else "final accuracy"
        lines.append(f"\n{scenario} (seeds {sorted(clean)}; {what} %, change vs clean with defences on)")
        lines.append(f"{'attack':<10} {'frac':>4} | {'acc on':>7} {'d on':>6} {'vs abs':>6} {'vs exc':>6} {'acc off':>8} {'d off':>6} | "
                     f"{'tgt on':>6} {'tgt off':>7} {'fair':>5} | {'max on':>6} {'max off':>7}")
        keys = sorted({(r["attack"], r["fraction"]) for r in rs}, key=lambda k: (k[0] != "clean", ATTACKS.index(k[0])
                                                                                  if k[0] in ATTACKS else -1, k[1]))
        for attack, frac in keys:
            cell = {}
            for on in (True, False):
                sel = [r for r in rs if r["attack"] == attack and r["fraction"] == frac and r["defences"] == on]
                if sel:
                    cell[on] = {
                        "acc": 100 * np.mean([r[acc] for r in sel]),
                        "d": 100 * np.mean([r[acc] - clean[r["seed"]] for r in sel if r["seed"] in clean]),
                        **{name[:3]: _paired(sel, ceiling, frac, acc) for name, ceiling in ceilings.items()},
                        "tgt": 100 * np.mean([r["target_share"] for r in sel]),
                        "max": max(r["max_ratio"] for r in sel),
                    }
            f = lambda on, k, w, p=1: (f"{cell[on][k]:{w}.{p}f}" if on in cell and np.isfinite(cell[on][k])  # noqa: E731
                                       else f"{'-':>{w}}")
            lines.append(f"{attack:<10} {frac:>4.1f} | {f(True, 'acc', 7)} {f(True, 'd', 6)} {f(True, 'abs', 6)} {f(True, 'exc', 6)} {f(False, 'acc', 8)} "
                         f"{f(False, 'd', 6)} | {f(True, 'tgt', 6)} {f(False, 'tgt', 7)} {100 * frac:5.0f} | "
                         f"{f(True, 'max', 6, 2)} {f(False, 'max', 7, 2)}")
    return lines


def _paired(sel: list[dict], ceiling: dict, frac: float, acc: str) -> float:
    """Mean change (points) of the runs ``sel`` against ``ceiling`` at the same seed and fraction."""
    pairs = [r[acc] - ceiling[r["seed"], frac] for r in sel if (r["seed"], frac) in ceiling]
    return 100 * float(np.mean(pairs)) if pairs else float("nan")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    p.add_argument("--seeds", type=int, default=5, help="paired seeds of the quickstart")
    p.add_argument("--fmnist-seeds", type=int, default=3, help="paired seeds of the FMNIST scenario")
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--out", default="docs/bench/attacks.json")
    p.add_argument("--table-only", action="store_true", help="print the table of the results in --out")
    p.add_argument("--variant", default="", help="a name for --overrides (rows are keyed scenario+variant)")
    p.add_argument("--overrides", nargs="*", default=[], help="config overrides of a variant, e.g. strategy.aggregator=median")
    p.add_argument("--only-on", action="store_true", help="skip the runs with defences off")
    p.add_argument("--fractions", default=",".join(map(str, FRACTIONS)))
    a = p.parse_args(argv)
    out = Path(a.out)
    results = json.loads(out.read_text())["runs"] if out.exists() else {}
    attacks = [x for x in a.attacks.split(",") if x]
    unknown = sorted(set(attacks) - set(ATTACKS))
    if unknown:
        raise SystemExit(f"unknown attack(s) {unknown}; choose from {ATTACKS}")
    if a.overrides and not a.variant:
        raise SystemExit("--overrides need a --variant name")
    plan, modes = [], (True,) if a.only_on else (True, False)
    fractions = [float(f) for f in a.fractions.split(",") if f]
    for scenario in a.scenario:
        for seed in range(a.seeds if scenario == "quickstart" else a.fmnist_seeds):
            plan += [(scenario, seed, None, 0.0, on) for on in modes]
            plan += [(scenario, seed, att, frac, on) for att in attacks for frac in fractions for on in modes]
    for scenario, seed, attack, frac, on in ([] if a.table_only else plan):
        key = run_key(scenario, seed, attack or "clean", frac, on, a.variant)
        if key in results:
            continue
        results[key] = run_one(scenario, seed, attack, frac, on, tuple(a.overrides), a.variant)
        r = results[key]
        print(f"{key}: accuracy {100 * r['accuracy']:.1f}%, target share {100 * r['target_share']:.1f}%, "
              f"max ratio {r['max_ratio']:.2f}", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"runs": results}, indent=1))
    print("\n".join(table(results)))


if __name__ == "__main__":
    main()
