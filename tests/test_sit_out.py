"""Sitting out (docs/robustness.md#sitting-out): a client the trust check refuses more often
than it passes stops taking places in the training cohorts, for 2, 4, 8, ... rounds."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord
from hypothesis import given
from hypothesis import strategies as st

from fedmoe_flwr import core
from fedmoe_flwr.bench.attackers import AttackPlan, attacked_client_app, choose_malicious
from fedmoe_flwr.client.app import make_client_app
from fedmoe_flwr.config import flatten
from fedmoe_flwr.core.robust import MAX_SIT_OUT_ROUNDS, sits_out
from fedmoe_flwr.experiment import experiment_for
from fedmoe_flwr.sim import LocalGrid
from tests.test_robustness import GLOBAL, LAYOUT, _reply
from tests.test_strategy import build_setup, small_config


@given(st.integers(0, 50), st.integers(0, 50), st.integers(1, 100), st.integers(0, 60), st.integers(0, 5))
def test_sits_out_only_with_more_refusals_than_passes_and_for_a_bounded_time(refused, passed, last, gap, after):
    completed = refused + passed
    out = sits_out(refused, completed, last, last + gap, after)
    if after == 0 or refused < after or refused <= passed:
        assert not out, "off, too few refusals, or passed at least as often as refused"
        return
    span = min(2 ** (refused - passed - 1), MAX_SIT_OUT_ROUNDS)
    assert out == (gap <= span)
    # one more refusal never shortens it, one more pass never lengthens it
    assert sits_out(refused + 1, completed + 1, last, last + gap, after) or not out
    assert not sits_out(refused, completed + 1, last, last + gap, after) or out


def test_a_client_refused_every_time_sits_out_2_then_4_rounds():
    assert [r for r in range(2, 12) if sits_out(2, 2, 1, r, 2)] == [2, 3], "refused twice (last in round 1)"
    assert [r for r in range(6, 15) if sits_out(3, 3, 5, r, 2)] == [6, 7, 8, 9]
    assert not sits_out(1, 1, 1, 2, 2), "one refusal is not enough"
    assert not sits_out(2, 4, 1, 2, 2), "passed as often as refused"


def test_apply_round_counts_the_trust_checks_refusals_in_the_profiles():
    ref = {n: np.ones_like(a) for n, a in GLOBAL.items()}
    replies = {**{f"h{i}": _reply(0.1, [0, 1]) for i in range(4)}, "evil": _reply(-0.1, [0, 1])}
    state, _ = core.ensure_clients(core.init_state(LAYOUT.expert_keys), list(replies))
    sent = {c: core.Sent(c, ("L0.E0", "L0.E1"), 100) for c in replies}
    for rnd in (1, 2):
        inputs = core.RoundInputs(rnd, sent, dict(replies), registered={c: 100 for c in replies}, reference=ref)
        state, _, stats = core.apply_round(state, GLOBAL, LAYOUT, inputs, core.RoundSettings())
        assert "evil" in stats.rejected
    evil, honest = state.profiles["evil"], state.profiles["h0"]
    assert (evil.rounds_refused, evil.last_refused, evil.rounds_completed) == (2, 2, 2)
    assert honest.rounds_refused == 0 and honest.rounds_completed == 2
    assert core.sitting_out(state.profiles, list(replies), 3, 2) == {"evil"}
    assert core.sitting_out(state.profiles, list(replies), 3, 0) == set(), "sit_out_after=0 switches it off"
    back = core.state_from_dict(*core.state_to_dict(state))
    assert back.profiles["evil"] == evil, "checkpointed"
    old = core.ClientProfile.from_dict({k: v for k, v in evil.to_dict().items() if k not in ("rounds_refused", "last_refused")})
    assert old.rounds_refused == 0, "a profile from an older checkpoint loads"


def _attacked_rounds(sit_out_after: int, rounds: int):
    cfg = small_config()
    cfg.strategy.fraction_train = 1.0
    cfg.strategy.trust_samples = 100
    cfg.strategy.sit_out_after = sit_out_after
    cfg, _, _, layout = experiment_for(cfg)
    malicious = choose_malicious(cfg.dataset.num_clients, 0.3, cfg.seed)
    plan = AttackPlan("sign_flip", malicious, tuple(layout.expert_keys), cohort_size=cfg.dataset.num_clients, seed=cfg.seed)
    grid = LocalGrid(attacked_client_app(make_client_app(flatten(cfg)), plan), cfg.dataset.num_clients, seed=cfg.seed)
    _, _, _, strat, arrays = build_setup(cfg=cfg)
    sent, out = [], []
    for rnd in range(1, rounds + 1):
        msgs = list(strat.configure_train(rnd, arrays, ConfigRecord(), grid))
        sent.append({strat.node_clients[m.metadata.dst_node_id] for m in msgs})
        out.append(strat.last.metrics.get("sitting_out", 0.0))
        arrays, _ = strat.aggregate_train(rnd, grid.send_and_receive(msgs))
    return {str(m) for m in malicious}, strat, sent, out


def test_refused_attackers_leave_the_cohort_in_a_real_run_and_honest_clients_stay():
    """The real strategy and ClientApp, every client sampled each round: sign-flipping clients
    are refused in rounds 1 and 2, sit out rounds 3 and 4, and are sent the model again in
    round 5; with sit_out_after=0 they are sent it every round."""
    bad, strat, sent, out = _attacked_rounds(2, 5)
    assert all(bad <= s for s in sent[:2]), "everyone is sampled in rounds 1-2"
    refused_twice = {c for c in bad if strat.state.profiles[c].rounds_refused >= 2}
    assert refused_twice, "the flipped updates were refused"
    assert not refused_twice & (sent[2] | sent[3]), "refused twice: not sent the model in rounds 3-4"
    assert out[2] == pytest.approx(len(refused_twice))
    honest = {c for c in strat.node_clients.values() if c not in bad}
    assert honest <= sent[2], "no honest client sits out"
    assert refused_twice <= sent[4], "back in round 5"
    _, _, always, none = _attacked_rounds(0, 4)
    assert all(bad <= s for s in always) and not any(none)


def test_excluded_nodes_the_benchmarks_ceiling_are_never_registered_nor_sampled():
    """The attack benchmark's `excluded` rows: the federation without the malicious nodes."""
    cfg = small_config()
    cfg.strategy.fraction_train = 1.0
    cfg, _, _, layout = experiment_for(cfg)
    malicious = choose_malicious(cfg.dataset.num_clients, 0.3, cfg.seed)
    plan = AttackPlan("excluded", malicious, tuple(layout.expert_keys), seed=cfg.seed)
    grid = LocalGrid(attacked_client_app(make_client_app(flatten(cfg)), plan), cfg.dataset.num_clients, seed=cfg.seed)
    _, _, _, strat, arrays = build_setup(cfg=cfg)
    for rnd in (1, 2):
        msgs = list(strat.configure_train(rnd, arrays, ConfigRecord(), grid))
        arrays, _ = strat.aggregate_train(rnd, grid.send_and_receive(msgs))
        sent = {strat.node_clients[m.metadata.dst_node_id] for m in msgs}
        assert sent == {str(i) for i in range(cfg.dataset.num_clients) if i not in malicious}
    assert not {str(m) for m in malicious} & set(strat.node_clients.values())


@given(st.integers(1, 40), st.floats(0.05, 1.0), st.integers(1, 5), st.sets(st.integers(0, 39)), st.integers(0, 99))
def test_a_client_sitting_out_gives_its_place_to_another(n, fraction, minimum, out, rnd):
    from fedmoe_flwr.seeding import sample_cohort

    nodes = list(range(n))
    plain = sample_cohort(nodes, 7, "train", rnd, fraction, minimum)
    assert sample_cohort(nodes, 7, "train", rnd, fraction, minimum, set()) == plain, "nobody out: the same draw"
    cohort = sample_cohort(nodes, 7, "train", rnd, fraction, minimum, out)
    assert not set(cohort) & out and cohort == sorted(cohort)
    assert len(cohort) == min(len(plain), n - len(out & set(nodes))), "the cohort keeps its size while others remain"
