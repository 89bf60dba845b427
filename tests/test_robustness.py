"""Lying clients and bad input: no reply can crash a run, capture an expert or be weighted by
its own claims. One test per finding of the adversarial probe, and a fuzz test of the hooks."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from fedmoe_flwr import core
from fedmoe_flwr import protocol as P
from fedmoe_flwr.config import to_config
from fedmoe_flwr.core.robust import direction_scores
from fedmoe_flwr.layout import ParamLayout
from fedmoe_flwr.tracking import round_details
from fedmoe_flwr.bench.attackers import AttackPlan, attacked_client_app, choose_malicious, choose_victims
from fedmoe_flwr.client.app import make_client_app
from fedmoe_flwr.config import flatten
from fedmoe_flwr.experiment import experiment_for
from fedmoe_flwr.sim import LocalGrid
from tests.test_strategy import _with_id, build_setup, small_config

K = 4
LAYOUT = ParamLayout(
    expert_params={f"L0.E{e}": (f"e{e}",) for e in range(K)},
    shared_params=("w", "router"),
    router_params={"router": 0},
    nbytes={"w": 24, "router": 4 * K * 2, **{f"e{e}": 24 for e in range(K)}},
    num_experts={0: K},
)
GLOBAL = {"w": np.zeros(3, np.float64), "router": np.zeros((K, 2)), **{f"e{e}": np.zeros(3) for e in range(K)}}


def _reply(target: float, experts, n=100, tokens=None, hist=None) -> core.Received:
    held = [f"L0.E{e}" for e in experts]
    params = {n_: np.full_like(GLOBAL[n_], target) for n_ in LAYOUT.param_names(held)}
    tok = np.zeros(K)
    tok[list(experts)] = n if tokens is None else tokens
    report = core.ClientReport(num_examples=n, train_loss=1.0, down_s=0, train_s=1, up_s=0,
                               hist=np.full(K, 1 / K) if hist is None else np.asarray(hist, float),
                               gate=np.full(K, np.nan), tokens=tok, expert_loss=np.full(K, np.nan))
    return core.Received(params, report, bytes_up=100)


def _round(replies: dict, registered=None, **robust):
    state, _ = core.ensure_clients(core.init_state(LAYOUT.expert_keys), list(replies))
    sent = {c: core.Sent(c, tuple(f"L0.E{e}" for e in ex), 100) for c, (r, ex) in replies.items()}
    inputs = core.RoundInputs(1, sent, {c: r for c, (r, _) in replies.items()},
                              registered=registered or {c: 100 for c in replies})
    settings_ = core.RoundSettings(robust=core.RobustSettings(**robust))
    return core.apply_round(state, GLOBAL, LAYOUT, inputs, settings_)


def test_inflated_sample_and_token_claims_cannot_move_an_expert_to_the_attackers_target():
    """Finding: tokens = num-examples = 1e12 moved an expert and the shared weights 100% to the target."""
    honest = {f"h{i}": (_reply(0.1, [0, 1]), [0, 1]) for i in range(4)}
    attack = {"evil": (_reply(50.0, [0, 1], n=10**12, tokens=10**12), [0, 1])}
    _, new, stats = _round({**honest, **attack})
    assert "evil" in stats.accepted
    for name in ("e0", "w"):  # clipped to the median norm and capped at 2/5 of the weight
        assert np.abs(new[name]).max() < 0.1 * 1.5, name
    _, naive, _ = _round({**honest, **attack}, clip="none", max_share=0, sample_drift=1e30, max_capture=0)
    assert naive["e0"].max() > 49, "without the defaults the attack wins (the finding)"


def test_share_cap_and_sample_cap_are_exact():
    w = core.robust.cap_shares(np.array([1000.0, 1.0, 1.0, 1.0]), 2.0)
    assert w[0] / w.sum() == pytest.approx(0.5) and (w[1:] == 1.0).all()
    assert core.robust.trusted_samples(1e12, 100, 0.5) == 150.0
    assert core.robust.trusted_samples(80, 100, 0.5) == 80.0


@given(st.lists(st.floats(0, 1e9), min_size=1, max_size=30), st.floats(1.0, 10.0))
@example([1.0, 5e-324, 5e-324, 5e-324], 2.0)  # the water level rounds up among subnormals
def test_cap_shares_property(weights, max_share):
    w = np.array(weights)
    out = core.robust.cap_shares(w, max_share)
    m = int((w > 0).sum())
    assert (out <= w + 1e-9 * (1 + w)).all() and (out >= 0).all()
    if m > 1 and out.sum() > 0:
        assert (out / out.sum() <= min(1.0, max_share / m) + 1e-9).all()
    assert np.array_equal(np.argsort(-w, kind="stable")[: m], np.argsort(-out, kind="stable")[: m]) or len(set(out)) < len(out)


@pytest.mark.parametrize("hist", [[1e9, 0, 0, 0], [-50, 1, 0, 0], [0.5, 0.5, 0.5, 0.5], [np.inf, 0, 0, 0]])
def test_a_histogram_that_is_not_a_distribution_is_rejected_with_its_reason(hist):
    """Finding: 1e9 or -50 histogram entries captured an expert."""
    _, _, stats = _round({"h": (_reply(0.1, [0]), [0]), "liar": (_reply(0.1, [0], hist=hist), [0])})
    assert "liar" in stats.rejected and "histogram" in stats.rejected["liar"]


def test_a_one_hot_histogram_that_contradicts_the_tokens_gets_no_fitness_update():
    """Finding: a one-hot histogram won the target expert every round."""
    liar = _reply(0.1, [0, 1], tokens=50, hist=[0, 1, 0, 0])  # claims expert 1, routed evenly over 0 and 1
    liar.report.tokens[:] = [95, 5, 0, 0]
    state, _, stats = _round({"liar": (liar, [0, 1]), "h": (_reply(0.1, [0, 1]), [0, 1])})
    assert "liar" in stats.accepted
    assert not state.fitness.seen[state.client_index["liar"]], "no say in fitness"
    assert state.fitness.seen[state.client_index["h"]]


def test_a_reply_delivered_twice_is_aggregated_once_and_unsent_nodes_are_ignored():
    """Finding: the same reply delivered twice was aggregated twice (7 of 6 sent)."""
    cfg, layout, grid, strat, arrays = build_setup("aligned")
    msgs = list(strat.configure_train(1, arrays, ConfigRecord(), grid))
    replies = [r for r in grid.send_and_receive(msgs) if not r.has_error()]
    stranger = copy.deepcopy(replies[0])
    stranger.metadata.__dict__["_src_node_id"] = 987654321
    strat.aggregate_train(1, replies + [replies[0], stranger])
    assert strat.last.metrics["num_aggregated"] == len(replies) <= strat.last.metrics["num_sent"]


def test_a_second_node_claiming_a_connected_clients_id_is_refused_that_id_and_trains_under_a_fresh_one():
    """Finding: node 9 claiming client-id 5 with memory 0 locked the real client 5 out."""
    cfg, layout, grid, strat, arrays = build_setup("aligned")
    list(strat.configure_train(1, arrays, ConfigRecord(), grid))
    victim_node, victim = next(iter(strat.node_clients.items()))
    before = strat.state.profiles[victim]
    claim = Message(RecordDict({P.PROFILE: P.NodeProfile(victim, expert_memory_bytes=0).encode()}),
                    reply_to=_with_id(Message(RecordDict(), dst_node_id=999, message_type=MessageType.QUERY)))
    claim.metadata.__dict__["_src_node_id"] = 999
    strat._register([claim], live=set(strat.node_clients) | {999})
    assert strat.node_clients[victim_node] == victim and strat.state.profiles[victim] == before
    assert strat.node_clients[999] == f"{victim}#2" and strat.node_claims[999] == victim
    assert strat.state.profiles[f"{victim}#2"].memory_bytes == 0
    row = round_details(strat.last, strat.state, 1)
    assert row["refused_claims"] == {"999": [victim, f"{victim}#2"]}, "the refusal is on the record"


def test_in_a_real_run_a_thief_and_its_victim_both_train_and_the_fresh_ids_probes_count():
    """The real ClientApp with the benchmark's takeover attack, every client sampled, reprobe
    on: the victims are not locked out, and a node under a fresh id has its probes folded."""
    cfg = small_config()
    cfg.strategy.fraction_train, cfg.strategy.reprobe = 1.0, True
    cfg, _, _, layout = experiment_for(cfg)
    n = cfg.dataset.num_clients
    malicious = choose_malicious(n, 0.3, cfg.seed)
    plan = AttackPlan("takeover", malicious, tuple(layout.expert_keys), cohort_size=n, seed=cfg.seed,
                      victims=choose_victims(n, malicious, cfg.seed))
    grid = LocalGrid(attacked_client_app(make_client_app(flatten(cfg)), plan), n, seed=cfg.seed)
    _, _, _, strat, arrays = build_setup(cfg=cfg)
    for rnd in (1, 2):
        msgs = list(strat.configure_train(rnd, arrays, ConfigRecord(), grid))
        arrays, _ = strat.aggregate_train(rnd, grid.send_and_receive(msgs))
        if rnd == 1:
            refused = dict(strat.last.refused_claims)
    assert len(refused) == len(malicious), "one of each thief/victim pair holds the id, the other a fresh one"
    assert len(strat.node_clients) == n and len(set(strat.node_clients.values())) == n, "nobody locked out"
    fresh = [cid for _, cid in refused.values()]
    assert all(strat.state.profiles[c].rounds_completed == 2 for c in fresh), "the fresh ids trained both rounds"
    assert all(strat.state.fitness.seen[strat.state.client_index[c]] for c in fresh), "their probes were folded"


def _claim(node: int, cid: str, digest: str = "") -> core.Claim:
    return core.Claim(node, cid, digest or str(node))


def test_new_nodes_claiming_one_free_id_in_a_batch_are_bound_by_digest_not_arrival_order():
    claims = [_claim(7, "a", "ff"), _claim(3, "a", "00"), _claim(5, "b")]
    ids = core.bind_client_ids(claims, bound={}, live={3, 5, 7})
    assert ids == {3: "a", 5: "b", 7: "a#2"}
    assert core.bind_client_ids(claims[::-1], bound={}, live={3, 5, 7}) == ids
    assert list(ids) == [3, 5, 7], "claims given their own id keep the claims' order"


def test_a_client_back_under_a_new_node_id_takes_its_id_over_unless_the_holder_is_connected():
    assert core.bind_client_ids([_claim(8, "a")], bound={"a": 1}, live={8}) == {8: "a"}
    assert core.bind_client_ids([_claim(8, "a")], bound={"a": 1, "a#2": 4}, live={1, 4, 8}) == {8: "a#3"}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.sampled_from(["a", "b", "a#2"]), st.text("01", max_size=2)),
                unique_by=lambda t: t[0], max_size=6),
       st.dictionaries(st.sampled_from(["a", "b", "a#2", "c"]), st.integers(10, 13), max_size=3),
       st.sets(st.integers(0, 13)))
def test_every_claim_gets_an_id_and_no_connected_node_shares_one_or_loses_its_own(raw, bound, live):
    claims = [_claim(n, cid, d) for n, cid, d in raw]
    live = live | {c.node_id for c in claims}
    ids = core.bind_client_ids(claims, bound, live)
    assert set(ids) == {c.node_id for c in claims}
    held = {cid: n for cid, n in bound.items() if n in live and n not in ids}
    assert not set(held) & set(ids.values()), "an id bound to a connected node stays with it"
    assert len(set(ids.values())) == len(ids)
    for c in claims:
        assert ids[c.node_id] == c.client_id or ids[c.node_id].startswith(c.client_id + "#")


@pytest.mark.parametrize("override", [
    {"train": {"lr": -1.0}}, {"train": {"lr": float("nan")}}, {"train": {"batch_size": 0}},
    {"fleet": {"deadline_s": -5.0}}, {"fleet": {"tiers": [{"name": "z", "max_experts": 0}]}},
    {"strategy": {"norm_bound": float("nan")}}, {"strategy": {"beta": float("nan")}}, {"eval_every": 0},
    {"num_rounds": 0}, {"strategy": {"server_opt": "bogus"}}, {"strategy": {"foo": 1}},
    {"strategy": {"aggregator": "krumm"}}, {"strategy": {"max_capture": 2.0}}, {"strategy": {"trust_samples": -1}},
    {"strategy": {"sit_out_after": -1}},
    {"strategy": {"trust_quorum": 1.5}},
])
def test_configs_that_would_train_nothing_are_refused(override):
    """Finding: lr=-1, batch_size=0, every tier with 0 experts, ... exited 0."""
    with pytest.raises(Exception) as info:
        to_config(OmegaConf.create(override))
    leaf, node = next(iter(override.items()))
    while isinstance(node, dict):
        leaf, node = next(iter(node.items()))
    assert leaf in str(info.value) or "bogus" in str(info.value), "the error names the setting"


# ---------------------------------------------------------------------------- fuzz
VALUES = st.one_of(st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
                   st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=12),
                   st.lists(st.integers(-5, 10**9), max_size=12))
REPORT_KEYS = sorted(P.REPORT_KEYS)


@st.composite
def mutations(draw):
    """A list of (reply index, what to do) edits to a round's real replies."""
    edits = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["drop_key", "set_key", "drop_record", "arrays", "nan_array", "config_report"]))
        edits.append((draw(st.integers(0, 5)), kind, draw(st.sampled_from(REPORT_KEYS)), draw(VALUES)))
    return edits


@pytest.fixture(scope="module")
def round_one():
    cfg, layout, grid, strat, arrays = build_setup("aligned")
    msgs = list(strat.configure_train(1, arrays, ConfigRecord(), grid))
    replies = [r for r in grid.send_and_receive(msgs) if not r.has_error()]
    return strat, replies


def _apply(reply: Message, kind: str, key: str, value) -> Message:
    content = copy.deepcopy(reply.content)
    if kind in ("drop_key", "set_key") and P.REPORT not in content:
        return reply
    if kind == "drop_key" and key in content[P.REPORT]:
        del content[P.REPORT][key]
    elif kind == "set_key":
        try:
            content[P.REPORT][key] = value
        except Exception:  # noqa: BLE001 - a value Flower itself cannot carry never reaches the server
            pass
    elif kind == "drop_record":
        record = P.REPORT if key < "n" else P.ARRAYS
        if record in content:
            del content[record]
    elif kind == "arrays":
        content[P.ARRAYS] = ArrayRecord({"moe.experts.0.fc1.weight": Array(np.zeros((2, 3), np.float32)),
                                          "junk": Array(np.ones(4, np.int64))})
    elif kind == "nan_array" and P.ARRAYS in content and len(content[P.ARRAYS]):
        name = next(iter(content[P.ARRAYS]))
        a = content[P.ARRAYS][name].numpy().copy()
        a.flat[0] = np.nan
        content[P.ARRAYS][name] = Array(a)
    elif kind == "config_report":
        content[P.REPORT] = MetricRecord({P.NUM_EXAMPLES: 1})
        content[P.PROFILE] = ConfigRecord({"client-id": "x"})
    out = copy.deepcopy(reply)
    out.content = content
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations())
def test_fuzzed_replies_never_escape_the_hooks_and_nothing_invalid_is_aggregated(round_one, edits):
    strat, replies = round_one
    strat = copy.deepcopy(strat)
    replies = list(replies)
    for i, kind, key, value in edits:
        replies[i % len(replies)] = _apply(replies[i % len(replies)], kind, key, value)
    new, metrics = strat.aggregate_train(1, replies)
    m = strat.last.metrics
    assert m["num_aggregated"] + m["num_rejected"] + m["num_dropped"] == m["num_sent"]
    if new is not None:
        assert all(np.isfinite(a.numpy()).all() for a in new.values())
    evaluated = [_apply(r, kind, key, value) for r, (_, kind, key, value) in zip(replies, edits)]
    for r in evaluated:  # an EVALUATE reply shaped like anything
        r.content[P.METRICS] = MetricRecord({P.NUM_EXAMPLES: value if isinstance(value, (int, float)) else -1, "accuracy": 0.5})
    strat.aggregate_evaluate(1, evaluated)
    for r in evaluated:  # and a QUERY reply
        strat._register([r], live=set())


@pytest.mark.parametrize("profile", [
    {}, {"client-id": ""}, {"client-id": "a", "expert-memory-bytes": "lots"}, {"client-id": "a", "reliability": 7.0},
])
def test_a_malformed_query_reply_is_refused_not_raised(profile):
    """Finding: a QUERY reply without client-id, or with memory "lots", aborted the run."""
    strat = build_setup("aligned")[3]
    reply = Message(RecordDict({P.PROFILE: ConfigRecord(profile)}),
                    reply_to=_with_id(Message(RecordDict(), dst_node_id=5, message_type=MessageType.QUERY)))
    strat._register([reply], live=set())
    assert not strat.node_clients


def test_an_invalid_timing_is_rejected_with_a_reason_that_is_not_ok():
    cfg, layout, grid, strat, arrays = build_setup("aligned")
    msgs = list(strat.configure_train(1, arrays, ConfigRecord(), grid))
    replies = [r for r in grid.send_and_receive(msgs) if not r.has_error()]
    replies[0].content[P.REPORT][P.TRAIN_TIME] = -3.0
    strat.aggregate_train(1, replies)
    (why,) = strat.last.rejected.values()
    assert why != "ok" and "times" in why


def test_direction_check_rejects_a_sign_flipped_update_and_only_when_asked():
    """Finding of the attack benchmark: sign-flipped updates have ordinary norms, so clipping
    and share caps let them through; min_agreement compares directions with the median delta."""
    honest = {f"h{i}": (_reply(0.1 * (i + 1), [0, 1]), [0, 1]) for i in range(4)}
    flipped = {"evil": (_reply(-0.25, [0, 1]), [0, 1])}
    _, new, stats = _round({**honest, **flipped}, min_agreement=0.5)
    assert "evil" in stats.rejected and "cosine" in stats.rejected["evil"]
    assert set(stats.accepted) == set(honest)
    assert new["w"].min() > 0
    _, _, off = _round({**honest, **flipped})
    assert "evil" in off.accepted, "off by default"
    _, _, two = _round({"h0": honest["h0"], "evil": flipped["evil"]}, min_agreement=0.5)
    assert set(two.accepted) == {"h0", "evil"}, "no median to compare with below 3 clients"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(honest=st.integers(3, 12), liars=st.integers(0, 2), dim=st.integers(5, 200), seed=st.integers(0, 2**31),
       scale=st.floats(0.01, 100))
def test_direction_scores_are_cosines_and_flag_flipped_minorities(honest, liars, dim, seed, scale):
    rng = np.random.default_rng(seed)
    common = rng.normal(size=dim)
    deltas = {f"h{i}": common + 0.3 * rng.normal(size=dim) for i in range(honest)}
    deltas.update({f"x{i}": -scale * deltas[f"h{i}"] for i in range(liars)})
    scores = direction_scores(deltas)
    assert all(-1 - 1e-9 <= s <= 1 + 1e-9 for s in scores.values())
    assert all(scores[f"h{i}"] > 0 for i in range(honest))
    assert all(scores[f"x{i}"] < 0 for i in range(liars))


def test_cap_shares_never_raises_a_weight_even_when_the_level_underflows():
    """Found by test_cap_shares_property: [1, 5e-324] at max_share=1 came back as [0.5, 0.5]."""
    out = core.robust.cap_shares(np.array([1.0, 5e-324]), 1.0)
    assert (out <= np.array([1.0, 5e-324])).all() and out[0] == out[1]
    np.testing.assert_allclose(core.robust.cap_shares(np.array([8.0, 1.0, 1.0]), 2.0), [4.0, 1.0, 1.0])  # 4/6 = 2/3


def test_a_pace_every_reply_missed_falls_back_to_the_deadline():
    """The drop-in finding: a predicted pace that no reply meets must not drop the round."""
    def inputs(times, paced=True):
        received = {f"c{i}": _reply(0.1, [0]) for i in range(len(times))}
        for r, t in zip(received.values(), times):
            object.__setattr__(r.report, "train_s", t)
        sent = {c: core.Sent(c, ("L0.E0",), 100) for c in received}
        return core.RoundInputs(1, sent, received, close_s=0.1, fallback_close_s=None, paced=paced)

    assert core.effective_close(inputs([3.0, 4.0])) is None, "all slower than the pace: wait for all"
    assert core.effective_close(inputs([0.05, 4.0])) == 0.1, "one met the pace: the pace holds"
    assert core.effective_close(inputs([3.0, 4.0], paced=False)) == 0.1, "a deadline is a deadline"
    state, _, stats = core.apply_round(core.ensure_clients(core.init_state(LAYOUT.expert_keys), ["c0", "c1"])[0],
                                       GLOBAL, LAYOUT, inputs([3.0, 4.0]), core.RoundSettings())
    assert stats.accepted == ("c0", "c1") and not stats.dropped
