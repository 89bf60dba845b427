"""Each baseline's assignment follows its own rules; the quick benchmark runs end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord

from fedmoe_flwr import core
from fedmoe_flwr import protocol as P
from tests.test_strategy import build_setup

ROOT = Path(__file__).resolve().parents[1]


def _assignment(name):
    cfg, layout, grid, strat, arrays = build_setup(name)
    msgs = list(strat.configure_train(1, arrays, ConfigRecord(), grid))
    problem = strat._problem(1, [m.metadata.dst_node_id for m in msgs])
    x = np.array([[k in m.content[P.CONFIG]["experts"] for k in layout.expert_keys] for m in msgs])
    return strat, problem, x


@pytest.mark.parametrize("name", ["random", "greedy", "flex"])
def test_each_client_gets_exactly_k_c_experts(name):
    _, problem, x = _assignment(name)
    assert (x.sum(1) == problem.max_experts).all()


def test_greedy_takes_the_top_k_by_fitness():
    strat, problem, x = _assignment("greedy")
    q = problem.scores(strat.state.fitness.Q)
    for i in range(len(x)):
        chosen = q[i, x[i]]
        others = q[i, ~x[i]]
        assert others.size == 0 or chosen.min() >= others.max()


def test_flex_respects_its_load_bounds():
    strat, problem, x = _assignment("flex")
    lo, hi = core.coverage_bounds(int(problem.max_experts.sum()), x.shape[1], strat.band)
    load = x.sum(0)
    assert (load >= lo).all() and (load <= hi).all()


def test_random_is_seeded_by_round():
    strat, problem, _ = _assignment("random")
    nodes = sorted(strat.node_clients, key=strat.node_clients.get)

    def draw(rnd):  # the same cohort, assigned in round rnd by a fresh strategy
        other = build_setup("random")[3]
        other.node_clients, other.state, other.num_examples = strat.node_clients, strat.state, strat.num_examples
        return other.assign(other._problem(rnd, nodes)).x

    assert np.array_equal(draw(1), draw(1))  # same seed and round: same draw
    assert not np.array_equal(draw(1), draw(2))  # another round: another draw


@pytest.mark.slow
def test_quick_benchmark_runs_every_strategy_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "fedmoe_flwr.bench", "--scenario", "quick", "--seeds", "1", "--rounds", "4",
           "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["quick"]) == {"aligned", "flex", "greedy", "random", "full", "dense"}
    for strategy, r in results["quick"].items():
        assert r["final_accuracy"]["values"][0] > 0.2, strategy
    assert results["quick"]["aligned"]["accuracy_auc_minus_random"]["values"][0] is not None
    assert (tmp_path / "quick_accuracy_vs_round.png").stat().st_size > 0
