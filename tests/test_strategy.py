"""Strategy hooks driven directly, with the real ClientApp behind an in-process grid."""

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, RecordDict

from fedmoe_flwr import protocol as P
from fedmoe_flwr.client.app import make_client_app
from fedmoe_flwr.config import Config, TierConfig, flatten
from fedmoe_flwr.experiment import build_for_strategy, experiment_for
from fedmoe_flwr.models.slicing import to_array_record
from fedmoe_flwr.server_app import build_strategy
from fedmoe_flwr.sim import LocalGrid


def small_config(strategy="aligned", **over) -> Config:
    cfg = Config()
    cfg.dataset.num_clients = 10
    cfg.model.num_experts = 8
    cfg.strategy.name = strategy
    cfg.strategy.fraction_train = 0.6
    # tests of other mechanisms count exact aggregations; the trust check (which refuses honest
    # updates that point away from the server's root update) has tests/test_trust.py
    cfg.strategy.trust_samples = 0
    cfg.fleet.deadline_s = None
    cfg.fleet.tiers = [
        TierConfig(name="small", fraction=0.4, max_experts=2, samples_per_s=100, uplink_mbps=1, downlink_mbps=4),
        TierConfig(name="mid", fraction=0.4, max_experts=4, samples_per_s=400, uplink_mbps=5, downlink_mbps=20),
        TierConfig(name="large", fraction=0.2, max_experts=-1, samples_per_s=2000, uplink_mbps=50, downlink_mbps=200),
    ]
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def build_setup(strategy="aligned", cfg: Config | None = None, **over):
    """A strategy, its in-process grid and the initial arrays for ``cfg`` (default: small_config)."""
    cfg = cfg or small_config(strategy, **over)
    cfg, data, _, layout = experiment_for(cfg)
    grid = LocalGrid(make_client_app(flatten(cfg)), cfg.dataset.num_clients, seed=cfg.seed)
    strat = build_strategy(cfg, layout)
    arrays = to_array_record(build_for_strategy(cfg, data).state_dict())
    return cfg, layout, grid, strat, arrays


def budgets(grid, strat):
    """Expert budget each node declared (bytes), by node id."""
    return {n: strat.state.profiles[c].memory_bytes for n, c in strat.node_clients.items()}


@pytest.mark.parametrize("name", ["aligned", "flex", "greedy", "random"])
def test_each_message_holds_exactly_its_experts_within_budget(name):
    cfg, layout, grid, strat, arrays = build_setup(name)
    msgs = list(strat.configure_train(1, arrays, ConfigRecord(), grid))
    assert len(msgs) == 6
    budget = budgets(grid, strat)
    for m in msgs:
        keys = list(m.content[P.CONFIG]["experts"])
        assert keys, "every client that can hold an expert gets one"
        assert set(m.content[P.ARRAYS].keys()) == set(layout.param_names(keys))
        expert_bytes = sum(layout.expert_nbytes(k) for k in keys)
        assert expert_bytes <= budget[m.metadata.dst_node_id]


def test_full_sends_every_expert():
    cfg, layout, grid, strat, arrays = build_setup("full")
    msgs = list(strat.configure_train(1, arrays, ConfigRecord(), grid))
    for m in msgs:
        assert sorted(m.content[P.CONFIG]["experts"]) == sorted(layout.expert_keys)


def test_round_aggregates_per_expert_and_keeps_untrained_experts():
    cfg, layout, grid, strat, arrays = build_setup("aligned")
    msgs = list(strat.configure_train(1, arrays, ConfigRecord(), grid))
    trained = {k for m in msgs for k in m.content[P.CONFIG]["experts"]}
    replies = grid.send_and_receive(msgs)
    new, _ = strat.aggregate_train(1, replies)
    metrics = strat.last.metrics
    assert new is not None and set(new.keys()) == set(arrays.keys())
    assert metrics["num_aggregated"] + metrics["num_dropped"] == len(msgs)
    assert metrics["bytes_down"] > 0 and metrics["bytes_up"] > 0
    for key in set(layout.expert_keys) - trained:
        for n in layout.expert_params[key]:
            assert np.array_equal(new[n].numpy(), arrays[n].numpy())
    moved = [n for k in trained for n in layout.expert_params[k] if not np.array_equal(new[n].numpy(), arrays[n].numpy())]
    assert moved, "trained experts change"
    # fitness rows of the cohort came from the clients' histograms
    assert strat.state.fitness.seen.sum() >= len(msgs)


def _corrupt(reply: Message, how: str) -> Message:
    content = reply.content
    arrs = {n: a.numpy().copy() for n, a in content[P.ARRAYS].items()}
    name = next(n for n in arrs if "experts" in n)
    if how == "nan":
        arrs[name][...] = np.nan
    elif how == "shape":
        arrs[name] = arrs[name][:1]
    elif how == "extra":
        arrs["moe.unknown.weight"] = np.zeros(3, np.float32)
    elif how == "missing":
        arrs.pop(name)
    elif how == "dtype":
        arrs[name] = arrs[name].astype(np.float64)
    content[P.ARRAYS] = ArrayRecord({n: Array(np.ascontiguousarray(a)) for n, a in arrs.items()})
    return reply


@pytest.mark.parametrize("how", ["nan", "shape", "extra", "missing", "dtype"])
def test_bad_update_is_rejected_with_reason_and_round_goes_on(how):
    cfg, layout, grid, strat, arrays = build_setup("aligned")
    msgs = list(strat.configure_train(1, arrays, ConfigRecord(), grid))
    replies = [r for r in grid.send_and_receive(msgs) if not r.has_error()]
    bad = _corrupt(replies[0], how)
    bad_client = strat._sent[bad.metadata.src_node_id].client_id
    new, _ = strat.aggregate_train(1, replies)
    metrics = strat.last.metrics
    assert metrics["num_rejected"] == 1
    assert bad_client in strat.last.rejected and strat.last.rejected[bad_client]
    assert new is not None  # the others were aggregated
    for n, a in new.items():
        assert np.isfinite(a.numpy()).all()


def test_every_node_failing_leaves_model_unchanged():
    cfg, layout, grid, strat, arrays = build_setup("aligned")
    msgs = list(strat.configure_train(1, arrays, ConfigRecord(), grid))
    errors = [Message(Error(code=1, reason="boom"), reply_to=_with_id(m)) for m in msgs]
    new, _ = strat.aggregate_train(1, errors)
    metrics = strat.last.metrics
    assert new is None and metrics["num_dropped"] == len(msgs) and metrics["num_aggregated"] == 0


def _with_id(m: Message) -> Message:
    m.metadata.__dict__["_message_id"] = "x" + str(m.metadata.dst_node_id)
    return m


def test_strategy_state_is_json_serialisable_and_round_trips():
    cfg, layout, grid, strat, arrays = build_setup("aligned")
    msgs = list(strat.configure_train(1, arrays, ConfigRecord(), grid))
    strat.aggregate_train(1, grid.send_and_receive(msgs))
    d = json.loads(json.dumps(strat.state_dict()))
    _, _, _, other, _ = build_setup("aligned")
    other.load_state_dict(d)
    assert np.array_equal(other.state.fitness.Q, strat.state.fitness.Q)
    assert np.array_equal(other.state.load.clients_total, strat.state.load.clients_total)
    assert other.state.profiles == strat.state.profiles


def test_deadline_drops_slow_replies_and_aligned_plans_within_it():
    cfg = small_config("random")
    cfg.fleet.deadline_s = 0.5
    cfg, layout, grid, strat, arrays = build_setup(cfg=cfg)
    msgs = list(strat.configure_train(1, arrays, ConfigRecord(), grid))
    strat.aggregate_train(1, grid.send_and_receive(msgs))
    metrics = strat.last.metrics
    assert metrics["num_dropped"] >= 1
    assert all("deadline" in why or "dropout" in why for why in strat.last.dropped.values())
    assert metrics["sim_round_time_s"] == 0.5


@pytest.mark.parametrize("name", ["aligned", "random", "greedy", "flex"])
def test_two_moe_layers_every_client_gets_an_expert_in_each_layer(name):
    cfg = small_config(name)
    cfg.model.num_moe_layers = 2
    cfg, layout, grid, strat, arrays = build_setup(cfg=cfg)
    msgs = list(strat.configure_train(1, arrays, ConfigRecord(), grid))
    budget = budgets(grid, strat)
    for m in msgs:
        keys = list(m.content[P.CONFIG]["experts"])
        assert {k.split(".")[0] for k in keys} == {"L0", "L1"}
        assert sum(layout.expert_nbytes(k) for k in keys) <= budget[m.metadata.dst_node_id]
    strat.aggregate_train(1, grid.send_and_receive(msgs))
    metrics = strat.last.metrics
    assert metrics["num_aggregated"] >= 1


def test_aligned_plans_within_the_deadline_and_closes_at_the_predicted_pace():
    cfg = small_config("aligned")
    cfg.fleet.deadline_s = 3.0
    cfg.fleet.jitter = 0.0
    cfg, layout, grid, strat, arrays = build_setup(cfg=cfg)
    msgs = list(strat.configure_train(1, arrays, ConfigRecord(), grid))
    problem = strat._problem(1, [m.metadata.dst_node_id for m in msgs])
    x = np.array([[k in m.content[P.CONFIG]["experts"] for k in layout.expert_keys] for m in msgs])
    predicted = problem.time_fixed + (problem.time_per_expert * x).sum(1)
    fits = problem.time_fixed + problem.time_per_expert.min(1) <= 0.9 * 3.0
    assert (predicted[fits] <= 0.9 * 3.0 + 1e-9).all()
    assert strat._close == pytest.approx(min(3.0, 1.2 * predicted.max()))
    strat.aggregate_train(1, grid.send_and_receive(msgs))
    metrics = strat.last.metrics
    assert metrics["sim_round_time_s"] <= 3.0


def test_aligned_leaves_out_clients_that_cannot_finish_in_time():
    cfg = small_config("aligned")
    cfg.fleet.deadline_s = 0.5  # small devices need > 0.5 s for their compute alone
    cfg.fleet.jitter = 0.0
    cfg, layout, grid, strat, arrays = build_setup(cfg=cfg)
    msgs = list(strat.configure_train(1, arrays, ConfigRecord(), grid))
    tiers = {strat.node_clients[m.metadata.dst_node_id]: strat.state.profiles[strat.node_clients[m.metadata.dst_node_id]].compute_tier for m in msgs}
    assert msgs and "small" not in tiers.values()
    strat.aggregate_train(1, grid.send_and_receive(msgs))
    metrics = strat.last.metrics
    assert metrics["num_dropped"] == 0
