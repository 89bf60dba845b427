"""Each baseline's assignment follows its own rules (the MoE ones, rolling, and the width
peers HeteroFL/FjORD/FedRolex/dense-large-exclusive, dense-small); each runs end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord
from hypothesis import given
from hypothesis import strategies as st

from fedmoe_flwr import core
from fedmoe_flwr import protocol as P
from fedmoe_flwr import widths as W
from fedmoe_flwr.config import Backend
from fedmoe_flwr.experiment import build, experiment_for, moe_layout
from fedmoe_flwr.strategies.rolling import rolling_assignment
from tests.test_strategy import build_setup, small_config

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
           "--strategies", "aligned,flex,greedy,random,full,dense", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["quick"]) == {"aligned", "flex", "greedy", "random", "full", "dense"}
    for strategy, r in results["quick"].items():
        assert r["final_accuracy"]["values"][0] > 0.2, strategy
    assert results["quick"]["aligned"]["accuracy_auc_minus_random"]["values"][0] is not None
    assert (tmp_path / "quick_accuracy_vs_round.png").stat().st_size > 0


# ---------------------------------------------------------------------------- the peers of issue "capacity-bound"

WIDTH_BASELINES = ["heterofl", "fjord", "fedrolex", "dense-large-exclusive"]


def _width_messages(name, rnd=1, strat=None, arrays=None, grid=None):
    cfg, layout, g, s, a = build_setup(name)
    strat, arrays, grid = strat or s, arrays or a, grid or g
    msgs = list(strat.configure_train(rnd, arrays, ConfigRecord(), grid))
    return cfg, strat, arrays, grid, msgs


def _expected_ratio(name, capacity):
    if name == "dense-large-exclusive":
        return 1.0 if capacity >= 1.0 else None
    return W.width_level(capacity, [0.125, 0.25, 0.5, 1.0])


@pytest.mark.parametrize("name", WIDTH_BASELINES)
def test_width_baselines_slice_by_capacity(name):
    cfg, strat, arrays, grid, msgs = _width_messages(name)
    full = {n: a.numpy() for n, a in arrays.items()}
    layout = W.WidthLayout.from_shapes({n: a.shape for n, a in full.items()})
    assert msgs
    caps = set()
    for m in msgs:
        node = m.metadata.dst_node_id
        cap = strat.capacity[node]
        caps.add(cap)
        ratio = _expected_ratio(name, cap)
        assert ratio is not None, "only clients that can hold a sub-model are sampled"
        assert m.content[P.CONFIG][P.WIDTH] == ratio
        sent = {n: a.numpy() for n, a in m.content[P.ARRAYS].items()}
        for prefix, width in layout.widths.items():
            units = sent[f"{prefix}.fc1.weight"].shape[0]
            assert units == W.width_units(ratio, width)
            idx = strat._plan[node][prefix]
            if name == "fedrolex":
                assert np.array_equal(idx, (1 * strat.roll_step + np.arange(units)) % width)
            else:
                assert np.array_equal(idx, np.arange(units))
            assert np.array_equal(sent[f"{prefix}.fc1.weight"], full[f"{prefix}.fc1.weight"][idx])
            assert np.array_equal(sent[f"{prefix}.fc2.weight"], full[f"{prefix}.fc2.weight"][:, idx])
        levels = m.content[P.CONFIG].get(P.OD_LEVELS)
        if name == "fjord":
            assert levels is not None and max(levels) == ratio and all(l <= ratio for l in levels)
        else:
            assert levels is None
    # the small config's tiers hold 2/8, 4/8 and 8/8 experts
    assert caps <= {0.25, 0.5, 1.0}
    if name == "dense-large-exclusive":
        assert caps == {1.0}


def test_fedrolex_window_rolls_every_round():
    cfg, strat, arrays, grid, _ = _width_messages("fedrolex", rnd=1)
    first = {prefix: idx.copy() for prefix, idx in strat._plan_for(0.25, 1).items()}
    second = strat._plan_for(0.25, 2)
    for prefix, idx in first.items():
        assert second[prefix][0] == (idx[0] + strat.roll_step) % strat._layout.widths[prefix]


def test_dense_small_fits_the_smallest_device():
    cfg = small_config("dense-small")
    cfg, data, model, _ = experiment_for(cfg)
    moe = moe_layout(cfg)
    k_min = min(t.max_experts for t in cfg.fleet.tiers if t.max_experts >= 0)
    largest = max(moe.expert_nbytes(k) for k in moe.expert_keys)
    dense_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert dense_bytes <= moe.shared_nbytes + k_min * largest
    assert model.blocks[0].ffn.fc1.out_features == k_min * cfg.model.d_hidden  # one MoE layer: all k_min experts
    large = build(cfg, data, variant="dense-large")
    assert large.blocks[0].ffn.fc1.out_features == cfg.model.num_experts * cfg.model.d_hidden


@given(st.lists(st.integers(0, 8), min_size=1, max_size=12), st.integers(0, 100))
def test_rolling_covers_experts_evenly_each_round(k, rnd):
    E = 8
    x = rolling_assignment(np.array(k), E, rnd)
    assert (x.sum(1) == np.minimum(k, E)).all()
    load = x.sum(0)
    assert load.max() - load.min() <= 1 + sum(ki == E for ki in k)  # full clients add one to every expert


def test_rolling_gives_each_client_every_expert_over_e_rounds():
    k = np.array([2, 1, 3])
    held = np.zeros((3, 8), bool)
    for rnd in range(8):
        held |= rolling_assignment(k, 8, rnd)
    assert held.all()


def test_rolling_strategy_assigns_within_capacity_and_moves():
    strat, problem, x = _assignment("rolling")
    assert (x.sum(1) == problem.max_experts).all()
    nodes = sorted(strat.node_clients, key=strat.node_clients.get)
    later = strat.assign(strat._problem(2, nodes[: len(x)])).x
    assert not np.array_equal(later, strat.assign(strat._problem(1, nodes[: len(x)])).x)


@pytest.mark.parametrize("name", ["rolling", "dense-small", *WIDTH_BASELINES])
def test_each_peer_baseline_runs_end_to_end(name, tmp_path):
    from fedmoe_flwr.simulation import run

    cfg = small_config(name)
    cfg.backend, cfg.num_rounds, cfg.quiet, cfg.save_model, cfg.report, cfg.checkpoint_every = Backend.local, 2, True, False, False, 0
    cfg.strategy.fraction_evaluate = 0.5
    summary = run(cfg, tmp_path)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["round"] > 0]
    assert len(trained) == 2 and all(r["num_aggregated"] > 0 for r in trained)
    assert trained[-1]["bytes_total"] == sum(r["bytes_down"] + r["bytes_up"] for r in trained)
    assert summary["final_accuracy"] > 0.15  # digits: 10 classes, two short rounds
    assert trained[-1]["personal_clients"] > 0 and "personal_accuracy" in trained[-1]
