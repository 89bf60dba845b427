"""The server's batched paths equal their one-client-at-a-time definitions, bit for bit.

Rounds fold a whole cohort into the fitness arrays at once and evaluate every known
client's time model in one numpy pass (so a round costs O(known clients), not
O(cohort x known clients)); these properties pin them to the per-client functions.
"""

from dataclasses import replace

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmoe_flwr import core
from fedmoe_flwr.bench.scale import ServerRound, tiny_layout
from fedmoe_flwr.core.fitness import FitnessSettings
from fedmoe_flwr.core.profiles import ClientProfile, cohort_time_costs, expert_time_costs


def _state(num_clients: int, num_experts: int, seen: list[bool], rng) -> core.AlignmentState:
    state, _ = core.ensure_clients(core.init_state([f"L0.E{k}" for k in range(num_experts)]),
                                   [f"c{i}" for i in range(num_clients)])
    fitness = core.FitnessState(Q=rng.random((num_clients, num_experts)), n=rng.integers(0, 3, (num_clients, num_experts)),
                                seen=np.array(seen), t=2, q0=state.fitness.q0)
    return replace(state, fitness=fitness)


def _signal(rng, k: int, nan_share: float):
    v = rng.dirichlet(np.ones(k))
    v[rng.random(k) < nan_share] = np.nan
    return v


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), num_clients=st.integers(1, 12), num_experts=st.integers(1, 6),
       w_gate=st.sampled_from([0.0, 0.5]), w_loss=st.sampled_from([0.0, 1.0]), nan_share=st.sampled_from([0.0, 0.3]))
def test_folding_a_cohort_at_once_equals_folding_it_client_by_client(seed, num_clients, num_experts, w_gate, w_loss,
                                                                      nan_share):
    rng = np.random.default_rng(seed)
    state = _state(num_clients, num_experts, list(rng.random(num_clients) < 0.5), rng)
    cohort = [f"c{i}" for i in rng.permutation(num_clients)[: rng.integers(1, num_clients + 1)]]
    hists = [_signal(rng, num_experts, nan_share) for _ in cohort]
    gates = [_signal(rng, num_experts, nan_share) for _ in cohort]
    trained = [rng.random(num_experts) < 0.5 for _ in cohort]
    losses = [np.where(t, rng.random(num_experts) * 3, np.nan) for t in trained]
    fs = FitnessSettings(w_gate=w_gate, w_loss=w_loss, beta=0.3)
    one_by_one = state
    for cid, h, g, l, t in zip(cohort, hists, gates, losses, trained):
        one_by_one = core.observe_fitness(one_by_one, cid, h, g, l, t, fs)
    batched = core.observe_fitness_batch(state, cohort, hists, gates, losses, trained, fs)
    for name in ("Q", "n", "seen"):
        assert np.array_equal(getattr(batched.fitness, name), getattr(one_by_one.fitness, name)), name
    assert core.observe_fitness_batch(state, [], [], [], [], [], fs) is state


profiles = st.builds(
    ClientProfile,
    declared_samples_per_s=st.one_of(st.none(), st.floats(1.0, 1e4)),
    declared_uplink_Bps=st.one_of(st.none(), st.floats(1e3, 1e8)),
    declared_downlink_Bps=st.one_of(st.none(), st.floats(1e3, 1e8)),
    samples_per_s=st.one_of(st.none(), st.floats(1.0, 1e4)),
    uplink_Bps=st.one_of(st.none(), st.floats(1e3, 1e8)),
)


@settings(max_examples=40, deadline=None)
@given(ps=st.lists(profiles, min_size=0, max_size=8), expert_bytes=st.lists(st.floats(1.0, 1e7), min_size=1, max_size=5),
       shared=st.floats(0.0, 1e7), samples=st.integers(0, 1000), epochs=st.integers(1, 3), frac=st.sampled_from([0.0, 0.1]))
def test_the_cohort_time_model_equals_the_per_client_one_bit_for_bit(ps, expert_bytes, shared, samples, epochs, frac):
    eb = np.array(expert_bytes)
    n = np.array([samples + i for i in range(len(ps))], dtype=float)
    fixed, per = cohort_time_costs(ps, eb, shared, n, epochs, expert_compute_frac=frac)
    assert fixed.shape == (len(ps),) and per.shape == (len(ps), len(eb))
    for i, p in enumerate(ps):
        f1, p1 = expert_time_costs(p, eb, shared, n[i], epochs, expert_compute_frac=frac)
        assert fixed[i] == f1 and np.array_equal(per[i], p1)


def test_registering_a_fleet_at_once_gives_the_one_by_one_state():
    batched, one_by_one = ServerRound(300, 8, 50), ServerRound(300, 8, 50)
    batched.register()
    one_by_one.register_one_by_one()
    assert batched.state.client_index == one_by_one.state.client_index
    assert batched.state.profiles == one_by_one.state.profiles
    for name in ("Q", "n", "seen"):
        assert np.array_equal(getattr(batched.state.fitness, name), getattr(one_by_one.state.fitness, name))


def test_a_synthetic_round_aggregates_the_cohort_and_updates_only_its_rows():
    server = ServerRound(2000, 16, 100)
    server.register()
    before = server.state.fitness.n.copy()
    times = server.round(1)
    assert set(times) >= {"eligible", "sample", "problem", "solve", "apply"}
    trained_rows = np.flatnonzero((server.state.fitness.n != before).any(axis=1))
    assert 0 < len(trained_rows) <= 100, "only the cohort's rows count trained pairs"
    assert server.state.round == 1 and server.state.load.clients_last.sum() == (server.state.fitness.n - before).sum()


def test_layout_expert_keys_are_a_fresh_list_in_layer_order():
    layout, _ = tiny_layout(12)
    keys = layout.expert_keys
    assert keys == [f"L0.E{k}" for k in range(12)]
    keys.append("L9.E9")
    assert layout.expert_keys == [f"L0.E{k}" for k in range(12)], "a caller's edit does not reach the layout"


def test_the_fitness_arrays_travel_as_tensors_and_come_back_exact_even_through_lists():
    import json

    server = ServerRound(50, 8, 10)
    server.register()
    server.round(1)
    d, arrays = core.state_to_dict(server.state)
    assert {"fitness/Q", "fitness/n", "fitness/seen"} <= set(arrays) and "Q" not in d["fitness"]
    as_lists = json.loads(json.dumps({k: v.tolist() for k, v in arrays.items()}))  # ExpertStrategy.state_dict's form
    back = core.state_from_dict(json.loads(json.dumps(d)), {k: np.asarray(v) for k, v in as_lists.items()})
    for name in ("Q", "n", "seen"):
        a, b = getattr(back.fitness, name), getattr(server.state.fitness, name)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    empty = core.init_state(["L0.E0", "L0.E1"])
    d0, a0 = core.state_to_dict(empty)
    assert core.state_from_dict(d0, {k: np.asarray(v.tolist()) for k, v in a0.items()}).fitness.Q.shape == (0, 2)
    bad = {**arrays, "fitness/n": arrays["fitness/n"].astype(np.float64)}
    with np.testing.assert_raises(ValueError):
        core.state_from_dict(d, bad)


def test_a_schema_1_state_with_json_fitness_still_loads():
    state, _ = core.ensure_clients(core.init_state(["L0.E0", "L0.E1"]), ["a", "b"])
    d, arrays = core.state_to_dict(state)
    f = state.fitness
    d1 = {**d, "schema": 1, "fitness": {**d["fitness"], **{k: {"dtype": str(getattr(f, k).dtype),
          "shape": list(getattr(f, k).shape), "data": getattr(f, k).ravel().tolist()} for k in ("Q", "n", "seen")}}}
    back = core.state_from_dict(d1, {})
    assert np.array_equal(back.fitness.Q, f.Q) and back.fitness.n.dtype == np.int64 and back.client_index == {"a": 0, "b": 1}


def test_the_aligned_strategy_registers_a_fleet_in_one_step_and_aggregates_whole_cohorts():
    from fedmoe_flwr.bench.scale_strategy import measure

    r = measure(num_clients=60, num_experts=8, cohort=20, rounds=2)
    assert r["messages_sent"] == 60 + 2 * 20, "one profile query per node, then the cohorts"
    assert r["aggregated_last_round"] == 20
