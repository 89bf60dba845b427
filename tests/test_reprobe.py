"""``strategy.reprobe``: the cohort's routing histograms under the current model, every round,
with its bytes and time in the round's cost; bad probe replies are refused, never folded."""

import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedmoe_flwr import core
from fedmoe_flwr import protocol as P
from fedmoe_flwr.core.accounting import RoundCost, probe_cost, round_cost
from tests.test_strategy import build_setup, small_config


def _round(strat, grid, arrays, rnd):
    msgs = list(strat.configure_train(rnd, arrays, ConfigRecord(), grid))
    new, _ = strat.aggregate_train(rnd, grid.send_and_receive(msgs))
    return new, msgs


def test_probe_phase_adds_its_bytes_and_its_slowest_answer_to_the_round():
    probe = probe_cost([100, 100, 100], [0.5, 2.0, 1.0])
    assert probe == RoundCost(bytes_down=300, bytes_up=0, sim_time_s=2.0)
    plain = round_cost([10, 20], [(3.0, 5), (4.0, 7)], None, incomplete=False)
    both = round_cost([10, 20], [(3.0, 5), (4.0, 7)], None, incomplete=False, before=probe)
    assert both == RoundCost(plain.bytes_down + 300, plain.bytes_up, plain.sim_time_s + 2.0)
    assert probe_cost([], []) == RoundCost(0, 0, 0.0)


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf, [1.0]])
def test_a_bad_probe_time_is_a_protocol_error(value):
    content = RecordDict({P.REPORT: MetricRecord({P.PROBE_TIME: value})})
    with pytest.raises(P.ProtocolError, match=P.PROBE_TIME):
        P.decode_probe_time(content)


def test_probe_time_absent_is_zero():
    assert P.decode_probe_time(RecordDict({})) == 0.0
    assert P.decode_probe_time(RecordDict({P.REPORT: MetricRecord({P.PROBE_TIME: 1.5})})) == 1.5


def test_reprobe_refreshes_the_cohorts_fitness_and_pays_for_it(one_torch_thread):
    runs = {}
    for reprobe in (False, True):
        cfg = small_config()
        cfg.strategy.reprobe = reprobe
        cfg, layout, grid, strat, arrays = build_setup("aligned", cfg=cfg)
        new, _ = _round(strat, grid, arrays, 1)
        q_before = strat.state.fitness.Q.copy()
        msgs = list(strat.configure_train(2, new, ConfigRecord(), grid))
        cohort = [strat.node_clients[m.metadata.dst_node_id] for m in msgs]
        q_after = strat.state.fitness.Q.copy()
        strat.aggregate_train(2, grid.send_and_receive(msgs))
        runs[reprobe] = (q_before, q_after, cohort, dict(strat.last.metrics), strat)
    q0, q1, cohort, plain, _ = runs[False]
    assert np.array_equal(q0, q1), "without reprobe, assigning does not touch fitness"
    q0, q1, cohort, probed, strat = runs[True]
    rows = [strat.state.client_index[c] for c in cohort]
    changed = [r for r in rows if not np.allclose(q0[r], q1[r])]
    assert changed, "the cohort's rows moved to the histograms under the round-1 model"
    others = sorted(set(range(len(q0))) - set(rows))
    assert np.array_equal(q0[others], q1[others]), "only the cohort is probed"
    shared = sum(layout.nbytes[n] for n in layout.param_names([]))
    assert probed["bytes_down"] >= plain["bytes_down"] + shared, "the probe's download is counted"


def test_reprobe_is_deterministic_whatever_experts_the_process_last_held(one_torch_thread):
    """The probe zeroes experts, so the histogram does not depend on the shared skeleton's
    leftover expert weights (Ray workers and the in-process grid hold different ones)."""
    from fedmoe_flwr.experiment import experiment_for

    cfg = small_config()
    cfg.model.num_moe_layers = 2  # the second router reads the first layer's experts' output
    cfg.strategy.reprobe = True
    cfg, layout, grid, strat, arrays = build_setup("aligned", cfg=cfg)
    new, _ = _round(strat, grid, arrays, 1)
    after_round_1 = strat.state
    strat.configure_train(2, new, ConfigRecord(), grid)
    clean = strat.state.fitness.Q.copy()
    strat.state = after_round_1
    with torch.no_grad():  # another client's experts left in the process-wide skeleton
        for n, p in experiment_for(cfg)[2].named_parameters():
            if "experts" in n:
                p.normal_(0, 3.0)
    strat.configure_train(2, new, ConfigRecord(), grid)
    assert not np.array_equal(clean, after_round_1.fitness.Q), "the probe moved fitness"
    assert np.array_equal(clean, strat.state.fitness.Q)


def test_a_probe_reply_off_the_simplex_or_for_another_client_is_not_folded(one_torch_thread):
    cfg, layout, grid, strat, arrays = build_setup("aligned", cfg=small_config())
    new, _ = _round(strat, grid, arrays, 1)
    strat.reprobe = True
    real = grid.send_and_receive

    def lying(msgs, timeout=None):
        replies = list(real(msgs, timeout=timeout))
        for i, r in enumerate(replies):
            if r.metadata.message_type == "query":
                if i % 2:
                    r.content[P.REPORT] = MetricRecord({P.HIST: [1e9] * len(layout.expert_keys),
                                                        P.GATE_SHARE: [0.0] * len(layout.expert_keys)})
                else:
                    r.content[P.PROFILE]["client-id"] = "someone-else"
        return replies

    grid.send_and_receive = lying
    q0 = strat.state.fitness.Q.copy()
    strat.configure_train(2, new, ConfigRecord(), grid)
    assert np.array_equal(q0, strat.state.fitness.Q), "no lying probe reached the fitness"
    assert core.signal_problem(np.full(len(layout.expert_keys), 1e9), layout.layer_of, "h") is not None
