"""The trust check (docs/robustness.md#trust): the server's reference update on its root
sample weighs every client by how well its delta agrees with it (FLTrust)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmoe_flwr import core
from fedmoe_flwr.bench.attackers import AttackPlan, attacked_client_app, choose_malicious
from fedmoe_flwr.client.app import make_client_app
from fedmoe_flwr.config import flatten
from fedmoe_flwr.core.robust import reference_cosine, trust_factors
from fedmoe_flwr.experiment import experiment_for
from fedmoe_flwr.server_reference import root_reference
from fedmoe_flwr.sim import LocalGrid
from tests.test_robustness import GLOBAL, LAYOUT, _reply
from tests.test_strategy import build_setup, small_config


def _round(replies: dict, reference, **robust):
    state, _ = core.ensure_clients(core.init_state(LAYOUT.expert_keys), list(replies))
    sent = {c: core.Sent(c, tuple(f"L0.E{e}" for e in ex), 100) for c, (r, ex) in replies.items()}
    inputs = core.RoundInputs(1, sent, {c: r for c, (r, _) in replies.items()}, registered={c: 100 for c in replies},
                              reference=reference)
    return core.apply_round(state, GLOBAL, LAYOUT, inputs, core.RoundSettings(robust=core.RobustSettings(**robust)))


def test_a_sign_flipped_update_is_rejected_and_a_weak_one_damped():
    ref = {n: np.ones_like(a) for n, a in GLOBAL.items()}
    honest = {f"h{i}": (_reply(0.1, [0, 1]), [0, 1]) for i in range(4)}
    weak = _reply(0.1, [0, 1])  # agrees on the expert, not on the shared tensors
    weak.params["w"][:] = [0.1, -0.1, -0.1]
    replies = {**honest, "weak": (weak, [0, 1]), "evil": (_reply(-0.1, [0, 1]), [0, 1])}
    _, new, stats = _round(replies, ref)
    assert "evil" in stats.rejected and "reference" in stats.rejected["evil"]
    assert stats.trust["evil"] == pytest.approx(-1.0) and stats.trust["h0"] == pytest.approx(1.0)
    assert 0 < stats.trust["weak"] < 1 and "weak" in stats.accepted
    assert stats.weights["weak"]["shared"] == pytest.approx(100 * stats.trust["weak"])
    assert stats.weights["h0"]["shared"] == pytest.approx(100)
    assert new["w"].min() > 0 and new["e0"].min() > 0
    _, _, off = _round(replies, ref, trust_samples=0)
    assert "evil" in off.accepted and not off.trust, "trust_samples=0 switches the check off"
    _, _, none = _round(replies, None)
    assert "evil" in none.accepted, "no reference, no check"


def test_the_clip_bound_is_the_cohorts_median_when_scalers_outnumber_the_trusted_honest():
    """x10 scaling keeps an honest direction, so the trust check keeps it; where it refuses
    many honest clients of a round (label skew), the scalers can be most of those left and
    the survivors' median norm is theirs. The median over every checked reply is honest."""
    ref = {n: np.full_like(a, 0.1) for n, a in GLOBAL.items()}
    honest = {f"h{i}": (_reply(0.1, [0, 1]), [0, 1]) for i in range(2)}
    scaled = {f"x{i}": (_reply(1.0, [0, 1]), [0, 1]) for i in range(3)}
    away = {f"a{i}": (_reply(-0.1, [0, 1]), [0, 1]) for i in range(4)}  # honest norms, refused
    _, new, stats = _round({**honest, **scaled, **away}, ref)
    assert set(stats.accepted) == set(honest) | set(scaled), "an honest direction passes the trust check"
    assert set(away) <= set(stats.rejected)
    for name in ("w", "e0", "e1"):
        np.testing.assert_allclose(new[name], 0.1, rtol=1e-9)
    _, survivors_only, _ = _round({**honest, **scaled}, ref)
    assert survivors_only["w"].min() > 0.5, "the survivors' median alone is the scalers' norm"


def test_a_round_the_trust_check_mostly_refuses_takes_a_smaller_step_with_a_quorum():
    """Seed 1 of the quickstart: the trust check kept 1 of 9 honest replies in round 28, and
    that label-skewed client alone moved the model from 91 % to 52 %."""
    ref = {n: np.full_like(a, 0.1) for n, a in GLOBAL.items()}
    replies = {"kept": (_reply(0.1, [0, 1]), [0, 1]), **{f"a{i}": (_reply(-0.1, [0, 1]), [0, 1]) for i in range(4)}}
    _, full, stats = _round(replies, ref, trust_quorum=0.0)
    assert stats.accepted == ("kept",)
    np.testing.assert_allclose(full["w"], 0.1, rtol=1e-9)
    _, default, _ = _round(replies, ref)
    np.testing.assert_allclose(default["w"], 0.1 * 1 / (0.3 * 5), rtol=1e-9, err_msg="on by default at 0.3")
    _, damped, _ = _round(replies, ref, trust_quorum=0.5)
    np.testing.assert_allclose(damped["w"], 0.1 * 1 / (0.5 * 5), rtol=1e-9)
    np.testing.assert_allclose(damped["e0"], 0.1 * 1 / (0.5 * 5), rtol=1e-9)
    _, plain, _ = _round(replies, None)
    _, no_reference, _ = _round(replies, None, trust_quorum=0.5)
    assert all(np.array_equal(plain[n], no_reference[n]) for n in plain), "nothing refused: the full step"


@given(st.integers(0, 50), st.integers(0, 50), st.floats(0, 1))
def test_quorum_scale_is_one_at_the_quorum_and_proportional_below(kept, extra, quorum):
    checked = kept + extra
    s = core.robust.quorum_scale(kept, checked, quorum)
    assert 0.0 <= s <= 1.0
    if quorum <= 0 or checked == 0 or kept >= quorum * checked:
        assert s == 1.0
    else:
        assert s == pytest.approx(kept / (quorum * checked))
    assert core.robust.quorum_scale(min(kept + 1, checked), checked, quorum) >= s


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=4), st.floats(-1, 1), min_size=1, max_size=20))
def test_trust_factors_are_in_unit_range_zero_when_pointing_away_and_monotone(cosines):
    f = trust_factors(cosines)
    assert set(f) == set(cosines)
    assert all(0.0 <= v <= 1.0 for v in f.values())
    assert all(f[c] == 0.0 for c, v in cosines.items() if v <= 0)
    median = float(np.median(list(cosines.values())))
    assert all(f[c] == 1.0 for c, v in cosines.items() if v >= median and v > 0)
    order = sorted(cosines, key=cosines.get)
    assert all(f[a] <= f[b] for a, b in zip(order, order[1:]))


@given(st.integers(0, 2**31), st.floats(0.01, 100))
def test_reference_cosine_is_a_cosine_over_the_common_tensors(seed, scale):
    rng = np.random.default_rng(seed)
    ref = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=5), "only-ref": rng.normal(size=2)}
    delta = {"a": ref["a"] * scale, "b": ref["b"] * scale, "only-client": rng.normal(size=7)}
    assert reference_cosine(delta, ref) == pytest.approx(1.0)
    assert reference_cosine({k: -v for k, v in delta.items()}, ref) == pytest.approx(-1.0)
    assert reference_cosine({"x": np.ones(3)}, ref) == 0.0


def test_root_sample_is_seeded_and_drawn_from_the_clients_training_data():
    cfg, data, _, _ = experiment_for(small_config())
    x, y = data.root_sample(50, seed=3)
    x2, y2 = data.root_sample(50, seed=3)
    assert x.shape[0] == 50 and np.array_equal(x, x2) and np.array_equal(y, y2)
    assert not np.array_equal(x, data.root_sample(50, seed=4)[0])
    rows = {r.tobytes() for i in range(data.num_clients) for r in data.client_train(i)[0]}
    assert all(r.tobytes() in rows for r in x)
    assert len(data.root_sample(10**9, seed=0)[0]) == int(data.train_sizes.sum())


def test_trust_is_on_by_default_for_the_shipped_models():
    from fedmoe_flwr.config import Config, StrategyName
    from fedmoe_flwr.server_app import build_strategy

    cfg = Config()
    assert cfg.strategy.trust_samples == 100
    for name in ("aligned", "random", "full"):
        cfg.strategy.name = StrategyName(name)
        assert build_strategy(cfg, experiment_for(cfg)[3]).reference_fn is not None, name
    cfg.strategy.trust_samples = 0
    assert build_strategy(cfg, experiment_for(cfg)[3]).reference_fn is None


def test_root_reference_is_reproducible_and_leaves_its_input_alone():
    cfg = small_config()
    cfg.strategy.trust_samples = 100
    cfg, data, model, _ = experiment_for(cfg)
    params = {n: v.numpy().copy() for n, v in model.state_dict().items()}
    before = {n: a.copy() for n, a in params.items()}
    ref = root_reference(cfg, data)
    a, b = ref(params, 3), ref(params, 3)
    assert all(np.array_equal(a[n], b[n]) for n in a)
    assert all(np.array_equal(params[n], before[n]) for n in params)
    assert any(not np.array_equal(a[n], params[n]) for n in a), "the reference update trains"


def test_sign_flipping_clients_are_rejected_by_the_strategy_in_a_real_round():
    """The real ClientApp and strategy: the malicious nodes' flipped updates are refused by the
    trust check while honest ones are aggregated."""
    cfg = small_config(fraction_train=1.0)
    cfg.strategy.trust_samples = 100  # the default
    cfg, _, _, layout = experiment_for(cfg)
    malicious = choose_malicious(cfg.dataset.num_clients, 0.3, cfg.seed)
    plan = AttackPlan("sign_flip", malicious, tuple(layout.expert_keys), cohort_size=cfg.dataset.num_clients,
                      seed=cfg.seed)
    grid = LocalGrid(attacked_client_app(make_client_app(flatten(cfg)), plan), cfg.dataset.num_clients, seed=cfg.seed)
    _, _, _, strat, arrays = build_setup(cfg=cfg)
    assert strat.reference_fn is not None
    refused = 0
    for rnd in (1, 2):
        msgs = list(strat.configure_train(rnd, arrays, ConfigRecord(), grid))
        arrays, _ = strat.aggregate_train(rnd, grid.send_and_receive(msgs))
        bad = {c for c in strat.last.trust if int(c) in malicious}
        assert bad, "malicious clients were in the cohort"
        assert all(strat.last.trust[c] < 0 for c in bad)
        refused += sum("reference" in strat.last.rejected.get(c, "") for c in bad)
        honest = [c for c in strat.last.trust if int(c) not in malicious]
        assert sum(strat.last.trust[c] > 0 for c in honest) > len(honest) / 2
    assert refused >= 2


@settings(max_examples=80, deadline=None)
@given(st.lists(st.floats(1e-6, 1e6), min_size=1, max_size=12), st.data(), st.integers(0, 50), st.floats(0.05, 1.0))
def test_cap_capture_keeps_every_cumulative_share_within_the_cap(weights, data, rounds, cap):
    from fedmoe_flwr.core.robust import CAPTURE_WARMUP_ROUNDS, cap_capture

    w = np.array(weights)
    past = np.array(data.draw(st.lists(st.floats(0, max(rounds, 0) * cap), min_size=len(w), max_size=len(w))))
    out = cap_capture(w, past, rounds, cap)
    assert (out <= w * (1 + 1e-9)).all() and (out >= 0).all(), "weights are only lowered"
    allowed = np.clip(cap * max(rounds + 1, CAPTURE_WARMUP_ROUNDS) - past, 0, 1)
    if len(w) > 1 and not np.array_equal(out, w):  # capped: every share within its allowance
        assert (out / out.sum() <= allowed + 1e-9).all()
    elif len(w) > 1 and allowed[w > 0].sum() >= 1 + 1e-9:  # feasible caps never leave an excess
        assert (w / w.sum() <= allowed + 1e-9).all()


def test_a_client_cannot_capture_an_expert_over_rounds():
    """Finding (capture): honest-looking replies that win the same expert round after round.
    The per-round share cap alone lets one big client hold 1/2 of it every round; the capture
    cap keeps its share summed over rounds at max_capture (counting at least the warm-up's
    rounds)."""
    from fedmoe_flwr.core.robust import CAPTURE_WARMUP_ROUNDS

    state, _ = core.ensure_clients(core.init_state(LAYOUT.expert_keys), ["big", "a", "b"])
    k = LAYOUT.expert_keys.index("L0.E0")
    settings_ = core.RoundSettings(robust=core.RobustSettings(max_capture=0.4))
    for rnd in range(1, 31):
        replies = {"big": (_reply(0.1, [0], n=100, tokens=1000), [0]), "a": (_reply(0.1, [0], n=50), [0]),
                   "b": (_reply(0.1, [0], n=50), [0])}
        sent = {c: core.Sent(c, ("L0.E0",), 100) for c in replies}
        inputs = core.RoundInputs(rnd, sent, {c: r for c, (r, _) in replies.items()},
                                  registered={"big": 100, "a": 50, "b": 50})
        state, _, stats = core.apply_round(state, GLOBAL, LAYOUT, inputs, settings_)
        big = state.fitness.influence[state.client_index["big"], k]
        assert big / max(rnd, CAPTURE_WARMUP_ROUNDS) <= 0.4 + 1e-9
    assert state.fitness.influence[:, k].sum() == pytest.approx(30)
    assert big / 30 == pytest.approx(0.4)
    assert stats.metrics(state)["capture_max"] == pytest.approx(0.4)
    _, _, free = core.apply_round(*_first_round(), core.RoundSettings(robust=core.RobustSettings(max_capture=0)))
    assert free.weights["big"]["L0.E0"] / sum(v["L0.E0"] for v in free.weights.values()) == pytest.approx(0.5)


def _first_round():
    state, _ = core.ensure_clients(core.init_state(LAYOUT.expert_keys), ["big", "a", "b"])
    replies = {"big": _reply(0.1, [0], n=100, tokens=1000), "a": _reply(0.1, [0], n=50), "b": _reply(0.1, [0], n=50)}
    sent = {c: core.Sent(c, ("L0.E0",), 100) for c in replies}
    return state, GLOBAL, LAYOUT, core.RoundInputs(1, sent, replies, registered={"big": 100, "a": 50, "b": 50})


@pytest.mark.parametrize("scenario", sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "benchmark").glob("*.yaml")))
def test_benchmark_scenarios_compare_strategies_without_the_trust_check(scenario):
    """The dense and width baselines have no trust check, so the strategy comparisons run without it."""
    from fedmoe_flwr.deploy.app_config import quickstart_config

    assert quickstart_config([f"+benchmark={scenario}"]).strategy.trust_samples == 0
    assert quickstart_config([]).strategy.trust_samples == 100


@settings(max_examples=80, deadline=None)
@given(st.lists(st.floats(1e-3, 1e6), min_size=2, max_size=12), st.data(), st.integers(0, 40))
def test_both_caps_together_keep_the_per_round_share_cap_exact(weights, data, rounds):
    """Finding of the attack benchmark: the capture cap lowered one holder after the share cap,
    lifting another to 2.21x its fair share; the two now alternate, the share cap last."""
    from fedmoe_flwr.core.defences import _cap_expert

    w = np.array(weights)
    past = np.array(data.draw(st.lists(st.floats(0, rounds * 0.5 + 0.5), min_size=len(w), max_size=len(w))))
    out = _cap_expert(w, past, rounds, core.RoundSettings())
    m = int((out > 0).sum())
    assert (out <= w * (1 + 1e-9)).all()
    if m > 1:
        assert (out / out.sum() <= min(1.0, 2.0 / m) + 1e-9).all()
