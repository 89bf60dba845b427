"""Client-level differential privacy: the noise has the documented scale per aggregation
group, it is reproducible from (seed, round), the accountant agrees with dp-accounting, and
a run reports its epsilon (docs/architecture.md#differential-privacy)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from dp_accounting import dp_event, rdp
from flwr.app import ConfigRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmoe_flwr import core
from fedmoe_flwr.config import check_config
from fedmoe_flwr.core.privacy import SHARED, add_group_noise, noise_std
from fedmoe_flwr.privacy import ORDERS, PrivacyLedger, sampling_rates
from fedmoe_flwr.seeding import rng_for
from tests.test_robustness import GLOBAL, LAYOUT, _reply
from tests.test_strategy import build_setup, small_config

K = 4


def _zeros(experts=3):
    """A zero delta with many coordinates per group, so sample stds are within a few %."""
    return {"w": np.zeros((300, 50)), "router": np.zeros((K, 2000)), **{f"e{e}": np.zeros((200, 50)) for e in range(experts)}}


def test_noise_std_per_group_is_z_clip_over_contributors():
    """Empirical std over many draws: shared z*C/m, expert k z*C/m_k, router row e its expert's; rows nobody held stay."""
    z, clip = 1.3, 0.7
    contributors = {SHARED: 10, "L0.E0": 2, "L0.E1": 5, "L0.E2": 1}
    rows = {"router": np.array([True, True, True, False])}
    noisy, stds = add_group_noise(_zeros(), LAYOUT, contributors, rows, z, clip, rng_for(0, "dp-noise", 1))
    assert stds[SHARED] == pytest.approx(z * clip / 10)
    for name, group in (("w", SHARED), ("e0", "L0.E0"), ("e1", "L0.E1"), ("e2", "L0.E2")):
        assert np.std(noisy[name]) == pytest.approx(z * clip / contributors[group], rel=0.03), name
        assert abs(np.mean(noisy[name])) < 0.03 * z * clip / contributors[group] * 3
    for e, group in enumerate(("L0.E0", "L0.E1", "L0.E2")):
        assert np.std(noisy["router"][e]) == pytest.approx(z * clip / contributors[group], rel=0.05)
    assert not noisy["router"][3].any(), "a router row nobody held must not move"


def test_an_expert_without_contributors_in_delta_is_an_error_not_silent_noise():
    delta = {"e3": np.zeros(3)}
    with pytest.raises(KeyError):
        add_group_noise(delta, LAYOUT, {SHARED: 3}, {}, 1.0, 1.0, rng_for(0, "dp-noise", 1))


@settings(max_examples=30, deadline=None)
@given(z=st.floats(0.1, 5), clip=st.floats(0.01, 10), m=st.integers(1, 50), seed=st.integers(0, 2**31), rnd=st.integers(1, 10**6))
def test_noise_is_reproducible_from_seed_and_round_and_scales_linearly(z, clip, m, seed, rnd):
    delta = {"w": np.ones((4, 3)), "e0": np.zeros(5)}
    groups = {SHARED: m, "L0.E0": m}
    a, _ = add_group_noise(delta, LAYOUT, groups, {}, z, clip, rng_for(seed, "dp-noise", rnd))
    b, _ = add_group_noise(delta, LAYOUT, groups, {}, z, clip, rng_for(seed, "dp-noise", rnd))
    c, _ = add_group_noise(delta, LAYOUT, groups, {}, 2 * z, clip, rng_for(seed, "dp-noise", rnd))
    d, _ = add_group_noise(delta, LAYOUT, groups, {}, z, clip, rng_for(seed, "dp-noise", rnd + 1))
    for name in delta:
        assert np.array_equal(a[name], b[name])
        np.testing.assert_allclose(c[name] - delta[name], 2 * (a[name] - delta[name]), rtol=1e-9, atol=1e-12)
        assert not np.array_equal(a[name], d[name])
    assert noise_std(z, clip, m) == pytest.approx(z * clip / m)


def _dp_round(rnd=1, **robust):
    replies = {f"h{i}": (_reply(0.1 * (i + 1), [0, 1], n=100 * (i + 1)), [0, 1]) for i in range(4)}
    replies["big"] = (_reply(5.0, [0, 1], n=10**9, tokens=10**9), [0, 1])
    state, _ = core.ensure_clients(core.init_state(LAYOUT.expert_keys), list(replies))
    sent = {c: core.Sent(c, tuple(f"L0.E{e}" for e in ex), 100) for c, (r, ex) in replies.items()}
    inputs = core.RoundInputs(rnd, sent, {c: r for c, (r, _) in replies.items()},
                              registered={c: 10**9 for c in replies}, noise_rng=rng_for(0, "dp-noise", rnd))
    dp = core.DPSettings(dp_noise_multiplier=robust.pop("z", 1.0))
    settings_ = core.RoundSettings(robust=core.RobustSettings(clip="fixed", clip_norm=1.0, **robust), dp=dp)
    return core.apply_round(state, GLOBAL, LAYOUT, inputs, settings_)


def test_apply_round_under_dp_weights_everyone_equally_and_reports_the_noise():
    _, new, stats = _dp_round()
    assert {w["shared"] for w in stats.weights.values()} == {1.0}, "DP calibrates to an unweighted mean"
    assert {w["L0.E0"] for w in stats.weights.values()} == {1.0}
    assert stats.noise_std == {SHARED: pytest.approx(0.2), "L0.E0": pytest.approx(0.2), "L0.E1": pytest.approx(0.2)}
    metrics = stats.metrics(core.init_state(LAYOUT.expert_keys))
    assert metrics["dp_noise_std_shared"] == pytest.approx(0.2)
    _, again, _ = _dp_round()
    assert all(np.array_equal(new[n], again[n]) for n in new), "same (seed, round): same noise"
    _, other, _ = _dp_round(rnd=2)
    assert not np.array_equal(new["w"], other["w"])
    assert np.array_equal(new["e2"], GLOBAL["e2"]), "an expert nobody held gets no noise"


def test_apply_round_under_dp_without_a_noise_generator_is_an_error():
    state, _ = core.ensure_clients(core.init_state(LAYOUT.expert_keys), ["a"])
    inputs = core.RoundInputs(1, {"a": core.Sent("a", ("L0.E0",), 100)}, {"a": _reply(0.1, [0])})
    settings_ = core.RoundSettings(robust=core.RobustSettings(clip="fixed", clip_norm=1.0),
                                   dp=core.DPSettings(dp_noise_multiplier=1.0))
    with pytest.raises(ValueError, match="noise_rng"):
        core.apply_round(state, GLOBAL, LAYOUT, inputs, settings_)


@pytest.mark.parametrize("q,z,steps,delta", [(0.5, 1.0, 20, 1e-5), (0.1, 0.8, 100, 1e-5), (1.0, 4.0, 10, 1e-6),
                                             (0.01, 1.1, 1000, 1e-5)])
def test_ledger_epsilon_matches_dp_accounting_directly(q, z, steps, delta):
    ledger = PrivacyLedger(z, delta)
    for _ in range(steps):
        ledger.step({SHARED: q, "L0.E0": q / 2})
    direct = rdp.RdpAccountant(list(ORDERS))
    direct.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), steps)
    assert ledger.epsilon(SHARED) == pytest.approx(direct.get_epsilon(delta), rel=1e-9)
    half = rdp.RdpAccountant(list(ORDERS))
    half.compose(dp_event.PoissonSampledDpEvent(q / 2, dp_event.GaussianDpEvent(z)), steps)
    m = ledger.metrics()
    assert m["dp_epsilon_expert_max"] == pytest.approx(half.get_epsilon(delta), rel=1e-9)
    assert m["dp_epsilon_expert_max"] < m["dp_epsilon"] < m["dp_epsilon_composed"]


def test_ledger_rebuilds_from_its_state_and_refuses_bad_rates():
    ledger = PrivacyLedger(1.0, 1e-5)
    for r in range(5):
        ledger.step({SHARED: 0.3, "L0.E1": 0.1 + 0.01 * r})
    other = PrivacyLedger(1.0, 1e-5)
    other.load_state_dict(json.loads(json.dumps(ledger.state_dict())))
    assert other.metrics() == ledger.metrics()
    with pytest.raises(ValueError, match="sampling rates"):
        ledger.step({SHARED: 1.5})
    with pytest.raises(ValueError):
        PrivacyLedger(0.0, 1e-5)


def test_sampling_rates_count_the_clients_sent_each_group():
    rates = sampling_rates([("L0.E0",), ("L0.E0", "L0.E1"), ("L0.E2",)], LAYOUT.expert_keys, known=10)
    assert rates == {SHARED: 0.3, "L0.E0": 0.2, "L0.E1": 0.1, "L0.E2": 0.1}


def test_dp_settings_are_checked_in_config_and_strategy():
    cfg = small_config()
    cfg.strategy.dp_noise_multiplier = 1.0
    assert any("clip=fixed" in p for p in check_config(cfg))
    cfg.strategy.clip, cfg.strategy.clip_norm, cfg.strategy.aggregator = "fixed", 1.0, "median"
    assert any("aggregator=mean" in p for p in check_config(cfg))
    cfg.strategy.aggregator, cfg.strategy.dp_delta = "mean", 1.5
    assert any("dp_delta" in p for p in check_config(cfg))
    cfg.strategy.dp_delta = 1e-5
    assert check_config(cfg) == []
    _, layout, _, strat, _ = build_setup()
    with pytest.raises(ValueError, match="clip=fixed"):
        type(strat)(layout, dp=core.DPSettings(dp_noise_multiplier=1.0))


def test_a_short_run_reports_epsilon_every_round_and_keeps_it_across_a_checkpoint():
    cfg = small_config()
    cfg.strategy.clip, cfg.strategy.clip_norm, cfg.strategy.dp_noise_multiplier = "fixed", 1.0, 1.0
    cfg, layout, grid, strat, arrays = build_setup(cfg=cfg)
    eps = []
    for rnd in (1, 2, 3):
        msgs = list(strat.configure_train(rnd, arrays, ConfigRecord(), grid))
        new, _ = strat.aggregate_train(rnd, grid.send_and_receive(msgs))
        arrays = new if new is not None else arrays
        m = strat.last.metrics
        eps.append(m["dp_epsilon"])
        assert m["dp_noise_std_shared"] == pytest.approx(1.0 / m["num_aggregated"])
        assert 0 < m["dp_epsilon_expert_max"] <= m["dp_epsilon"] <= m["dp_epsilon_composed"]
    assert 0 < eps[0] < eps[1] < eps[2]
    assert [r[SHARED] for r in strat.privacy.rates] == [0.6] * 3, "the cohort: 6 of 10 clients"
    q = 0.6
    direct = rdp.RdpAccountant(list(ORDERS))
    direct.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(1.0)), 3)
    assert eps[2] == pytest.approx(direct.get_epsilon(1e-5), rel=1e-9), "every client is sent the shared tensors"
    restored = build_setup(cfg=cfg)[3]
    restored.load_state_dict(json.loads(json.dumps(strat.state_dict())))
    assert restored.privacy.metrics() == strat.privacy.metrics()
