"""``python -m fedmoe_flwr.bench.targets``: each target computed paired per seed from the runs."""

import math

import pytest

from fedmoe_flwr.bench.targets import main, measure


def _run(strategy, seed, accs, *, sim_per_round=10.0, mb_per_round=1.0, personal=None, load_cv=0.2, target=0.3):
    rows, bytes_total = [{"round": 0, "accuracy": 0.0}], 0.0
    for r, a in enumerate(accs, start=1):
        rows.append({"round": r, "accuracy": a, "sim_time_total_s": r * sim_per_round, "bytes_total": r * mb_per_round * 1e6})
    reach = next((i + 1 for i in range(len(accs)) if sum(accs[max(0, i - 2):i + 1]) / len(accs[max(0, i - 2):i + 1]) >= target), None)
    return {
        "strategy": strategy, "seed": seed, "rows": rows, "final_accuracy": accs[-1], "final_loss": -math.log(accs[-1]),
        "accuracy_auc": sum(accs) / len(accs), "final_personal_accuracy": personal, "load_cv": load_cv,
        "to_target": [{"target": target, "rounds": reach, "bytes": reach and reach * mb_per_round * 1e6,
                       "sim_time_s": reach and reach * sim_per_round}],
    }


def test_targets_are_paired_per_seed():
    runs = []
    for seed in (0, 1):
        runs += [
            _run("aligned", seed, [0.2, 0.4, 0.5, 0.6], sim_per_round=2.0, personal=0.7, load_cv=0.05),
            _run("random", seed, [0.1, 0.2, 0.3, 0.4, 0.5], personal=0.6),
            _run("rolling", seed, [0.1, 0.2, 0.3, 0.4, 0.5]),
            _run("full", seed, [0.2, 0.4, 0.5, 0.6], mb_per_round=4.0),
            _run("dense-small", seed, [0.3, 0.5, 0.55, 0.56]),
        ]
    t = measure(runs)["targets"]
    best = t["sim_time_to_best_final_vs_fastest_non_moe"]
    assert best["best_baseline"] == "full" and best["level"] == pytest.approx(0.6)
    # aligned's moving average reaches 0.6? (0.4+0.5+0.6)/3 = 0.5 < 0.6: never; dense-small never either
    assert best["value"] is None and not best["holds"] and best["aligned_reaches_it"] == "0/2"
    assert t["final_accuracy_points_vs_best_non_moe"]["value"] == pytest.approx(4.0)
    assert t["final_accuracy_points_vs_best_non_moe"]["holds"]
    assert t["perplexity_ratio_vs_best_non_moe"]["value"] == pytest.approx(0.56 / 0.6)  # perplexity = exp(-log acc) = 1 / acc
    # rounds to 0.3: aligned 3 ((0.2+0.4+0.5)/3 >= 0.3 at round 3? 0.367: yes at round 3; (0.2+0.4)/2=0.3 at round 2)
    assert t["rounds_to_target_vs_random"]["value"] == pytest.approx(2 / 4)
    assert t["auc_points_vs_random"]["value"] == pytest.approx(100 * (0.425 - 0.3))
    assert t["personal_accuracy_points_vs_random"]["value"] == pytest.approx(10.0)
    assert t["load_cv"]["holds"] and t["bytes_to_target_vs_full"]["value"] == pytest.approx(2 / (2 * 4))


def test_missing_strategy_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no 'aligned' runs"):
        main([str(tmp_path)])
