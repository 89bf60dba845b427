"""Fitness, exploration, load, prices and the alignment state, with hand-computed numbers."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmoe_flwr.core.aggregate import ServerOptState
from fedmoe_flwr.core.fitness import (
    exploration_bonus,
    fitness_signal,
    grow_fitness,
    init_fitness,
    solver_score,
    update_fitness,
)
from fedmoe_flwr.core.load import coverage_bounds, init_load, load_cv, staleness, update_load
from fedmoe_flwr.core.profiles import ClientProfile, update_profile
from fedmoe_flwr.core.state import (
    advance_round,
    client_rows,
    ensure_client,
    ensure_clients,
    init_state,
    state_from_dict,
    state_to_dict,
)

# ---- fitness -------------------------------------------------------------------------


def test_signal_hist_only_and_mixed():
    h = np.array([0.5, 0.3, 0.2])
    np.testing.assert_allclose(fitness_signal(h), h)
    g = np.array([0.3, 0.3, 0.4])
    np.testing.assert_allclose(fitness_signal(h, g, w_gate=1.0), [0.4, 0.3, 0.3])
    np.testing.assert_allclose(fitness_signal(h, g, w_hist=3.0, w_gate=1.0), [0.45, 0.3, 0.25])


def test_signal_loss_nan_is_missing():
    h = np.array([0.5, 0.3, 0.2])
    loss = np.array([0.0, np.nan, math.log(2.0)])
    s = fitness_signal(h, None, loss, w_loss=1.0)
    np.testing.assert_allclose(s, [0.75, np.nan, 0.35])
    s = fitness_signal(h, None, loss, w_loss=1.0, renormalise=True)
    np.testing.assert_allclose(s, [0.75, 0.3, 0.35])
    # a probed client has no loss: weights renormalise over the available signals
    np.testing.assert_allclose(fitness_signal(h, None, None, w_loss=1.0), h)
    np.testing.assert_allclose(fitness_signal(None, None, loss, w_hist=1.0, w_loss=2.0),
                               [1.0, np.nan, 0.5])
    assert fitness_signal(None, None, None).size == 0


def test_cold_client_init_then_ema_and_counts():
    st0 = init_fitness(2, 3)
    assert np.all(st0.Q == 1 / 3) and not st0.seen.any()
    st1 = update_fitness(st0, 0, np.array([0.5, 0.3, 0.2]), np.zeros(3, bool))
    np.testing.assert_array_equal(st1.Q[0], [0.5, 0.3, 0.2])
    assert st1.seen.tolist() == [True, False]
    assert np.array_equal(st1.Q[1], st0.Q[1]) and st1.n.sum() == 0
    st2 = update_fitness(st1, 0, np.array([0.1, np.nan, 0.4]), np.array([True, False, True]), beta=0.5)
    np.testing.assert_allclose(st2.Q[0], [0.3, 0.3, 0.3])  # middle entry unobserved: kept
    assert st2.n[0].tolist() == [1, 0, 1]
    assert st1.Q[0, 0] == 0.5  # pure: the input is untouched


def test_observed_mask_and_batch_rows():
    st0 = update_fitness(init_fitness(3, 2), [0, 2], np.array([[1.0, 0.0], [0.2, 0.8]]),
                         np.ones((2, 2), bool))
    np.testing.assert_array_equal(st0.Q, [[1.0, 0.0], [0.5, 0.5], [0.2, 0.8]])
    assert st0.n.tolist() == [[1, 1], [0, 0], [1, 1]]
    st1 = update_fitness(st0, 0, np.array([0.0, 1.0]), np.zeros(2, bool),
                         observed_mask=np.array([False, True]), beta=0.25)
    np.testing.assert_allclose(st1.Q[0], [1.0, 0.25])
    with pytest.raises(ValueError):
        update_fitness(st0, [1, 1], np.zeros((2, 2)), np.zeros((2, 2), bool))


def test_ucb_bonus_hand_computed_and_anneal():
    n = np.array([[0, 3]])
    b = exploration_bonus(n, t=3, kappa=2.0)
    np.testing.assert_allclose(b, [[2 * math.sqrt(math.log(4)), 2 * math.sqrt(math.log(4) / 4)]])
    np.testing.assert_allclose(exploration_bonus(n, 5, 2.0, anneal_rounds=10),
                               [[math.sqrt(math.log(6)), math.sqrt(math.log(6) / 4)]])
    assert not exploration_bonus(n, 10, 2.0, anneal_rounds=10).any()
    assert not exploration_bonus(n, 0, 2.0).any()  # ln(1) = 0


def test_solver_score_and_grow():
    st0 = grow_fitness(init_fitness(1, 2, q0=0.1), 3)
    assert st0.Q.shape == (3, 2) and st0.n.shape == (3, 2) and st0.seen.shape == (3,)
    s = solver_score(st0, np.array([2, 0]), np.array([0.5, -0.5]))
    np.testing.assert_allclose(s, [[0.6, -0.4], [0.6, -0.4]])
    assert grow_fitness(st0, 2) is st0


# ---- load ----------------------------------------------------------------------------


def test_dual_price_hand_computed():
    ld = init_load(4)
    ld = update_load(ld, np.array([10.0, 5, 5, 0]), np.array([2, 1, 1, 0]), round=0, price_step=0.1)
    # share [.5 .25 .25 0] vs target .25: (t - s) / t = [-1, 0, 0, 1]
    np.testing.assert_allclose(ld.price, [-0.1, 0, 0, 0.1])
    ld = update_load(ld, np.array([10.0, 5, 5, 0]), np.array([2, 1, 1, 0]), round=1,
                     price_step=0.1, price_bound=0.15)
    np.testing.assert_allclose(ld.price, [-0.15, 0, 0, 0.15])
    np.testing.assert_array_equal(ld.tokens_total, [20, 10, 10, 0])
    np.testing.assert_array_equal(ld.clients_total, [4, 2, 2, 0])
    np.testing.assert_array_equal(ld.clients_last, [2, 1, 1, 0])
    tok = update_load(init_load(2), np.array([3.0, 1.0]), np.array([1, 1]), 0, basis="tokens")
    np.testing.assert_allclose(tok.price, [0.1 * (0.5 - 0.75) / 0.5, 0.1 * (0.5 - 0.25) / 0.5])
    tgt = update_load(init_load(2), np.zeros(2), np.array([1, 1]), 0, target=np.array([3.0, 1.0]))
    np.testing.assert_allclose(tgt.price, [0.1 * (0.75 - 0.5) / 0.75, 0.1 * (0.25 - 0.5) / 0.25])


def test_zero_load_keeps_prices():
    ld = update_load(init_load(3), np.zeros(3), np.zeros(3, int), round=4)
    assert not ld.price.any() and (ld.last_trained_round == -1).all()


def test_staleness():
    ld = update_load(init_load(4), np.ones(4), np.array([1, 1, 0, 0]), round=0)
    ld = update_load(ld, np.ones(4), np.array([1, 0, 0, 0]), round=2)
    assert staleness(ld, 3).tolist() == [1, 3, 4, 4]


def test_load_cv():
    assert load_cv([1, 1, 1]) == 0.0
    assert load_cv([0, 0]) == 0.0 and load_cv([]) == 0.0
    assert load_cv([1, 3]) == pytest.approx(0.5)


@given(st.lists(st.floats(0, 1e6), min_size=1, max_size=20), st.floats(1e-3, 1e3))
def test_load_cv_scale_invariant(counts, c):
    assert load_cv(np.array(counts) * c) == pytest.approx(load_cv(counts), abs=1e-9)
    assert load_cv(counts) >= 0


def test_coverage_bounds():
    assert [a.tolist() for a in coverage_bounds(10, 4, 0.0)] == [[2] * 4, [3] * 4]
    assert [a.tolist() for a in coverage_bounds(8, 4, 0.0)] == [[2] * 4, [2] * 4]
    assert [a.tolist() for a in coverage_bounds(8, 4, 0.5)] == [[1] * 4, [3] * 4]
    assert [a.tolist() for a in coverage_bounds(12, 4, 0.5)] == [[1] * 4, [5] * 4]
    assert [a.tolist() for a in coverage_bounds(3, 2, 2.0)] == [[0] * 2, [5] * 2]


@settings(max_examples=50)
@given(st.lists(st.integers(0, 5), min_size=2, max_size=8), st.integers(0, 30))
def test_price_stays_bounded(clients, rounds):
    ld = init_load(len(clients))
    for r in range(rounds % 7):
        ld = update_load(ld, np.zeros(len(clients)), np.array(clients), r, price_step=0.4)
    assert np.all(np.abs(ld.price) <= 1.0)


# ---- state ---------------------------------------------------------------------------


def test_ensure_clients_grows_and_keeps_rows():
    s = init_state(["L0.E0", "L0.E1"])
    s, row = ensure_client(s, "a", ClientProfile(memory_bytes=10))
    assert row == 0
    s, rows = ensure_clients(s, ["b", "a", "c"])
    assert rows.tolist() == [1, 0, 2] and s.fitness.Q.shape == (3, 2)
    s2, rows = ensure_clients(s, ["a"], {"a": ClientProfile(memory_bytes=20)})
    assert s2.profiles["a"].memory_bytes == 20 and s.profiles["a"].memory_bytes == 10
    assert client_rows(s2, ["c", "a"]).tolist() == [2, 0]
    with pytest.raises(KeyError):
        client_rows(s2, ["zz"])
    assert advance_round(s2).fitness.t == 1 and advance_round(s2, 7).round == 7


def test_state_round_trip_exact():
    s = init_state(["L0.E0", "L0.E1", "L1.E0"])
    s, rows = ensure_clients(s, ["x", "y"], {"y": ClientProfile(memory_bytes=3e6, compute_tier="hi")})
    fit = update_fitness(s.fitness, rows, np.array([[0.1, 0.7, 0.2], [1 / 3, np.nan, 0.123456789]]),
                         np.array([[True, False, True], [False, False, True]]))
    load = update_load(s.load, np.array([1.5, 0, 2]), np.array([1, 0, 2]), 0)
    prof = update_profile(s.profiles["x"], completed=True, num_samples=3, train_time_s=7)
    opt = ServerOptState(m={"w": np.arange(4.0).reshape(2, 2)}, v={"w": np.full((2, 2), 0.3)}, step=2)
    s = replace(s, fitness=fit, load=load, profiles={**s.profiles, "x": prof}, opt_state=opt)
    s = advance_round(s)
    d, arrays = state_to_dict(s)
    d = json.loads(json.dumps(d))
    r = state_from_dict(d, arrays)
    assert r.expert_keys == s.expert_keys and r.client_index == s.client_index
    assert r.profiles == s.profiles and r.round == s.round == 1
    for a, b in [(r.fitness.Q, s.fitness.Q), (r.fitness.n, s.fitness.n), (r.fitness.seen, s.fitness.seen)]:
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    assert r.fitness.t == s.fitness.t and r.fitness.q0 == s.fitness.q0
    for k in ("tokens_total", "clients_total", "tokens_last", "clients_last", "last_trained_round", "price"):
        a, b = getattr(r.load, k), getattr(s.load, k)
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    assert r.opt_state.step == 2 and np.array_equal(r.opt_state.m["w"], opt.m["w"])
    assert np.array_equal(r.opt_state.v["w"], opt.v["w"])
    empty = state_from_dict(*state_to_dict(init_state(["L0.E0"])))
    assert empty.fitness.Q.shape == (0, 1) and empty.opt_state is None


def test_round_load_counts_tokens_and_clients_of_held_experts_only():
    from fedmoe_flwr.core import round_load

    tok, cli = round_load([{"L0.E0", "L0.E2"}, {"L0.E2"}], [{"L0.E0": 3.0, "L0.E2": 1.0}, {"L0.E2": 5.0}],
                          ["L0.E0", "L0.E1", "L0.E2"])
    assert tok.tolist() == [3.0, 0.0, 6.0] and cli.tolist() == [1.0, 0.0, 2.0]
