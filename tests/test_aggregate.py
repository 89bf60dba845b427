"""Per-expert aggregation and server optimizers, with hand-computed numbers."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmoe_flwr.core.aggregate import ClientUpdate, ServerOptState, aggregate_experts, server_step
from fedmoe_flwr.layout import ParamLayout

EXPERTS = {f"L0.E{i}": (f"moe.e{i}.w",) for i in range(3)}
LAYOUT = ParamLayout(
    expert_params=EXPERTS,
    shared_params=("emb.w", "router.w"),
    router_params={"router.w": 0},
    nbytes={"emb.w": 24, "router.w": 24, **{f"moe.e{i}.w": 16 for i in range(3)}},
    num_experts={0: 3},
)


def _global():
    rng = np.random.default_rng(0)
    return {
        "emb.w": np.zeros((2, 3), np.float32),
        "router.w": rng.standard_normal((3, 2)).astype(np.float32),
        **{f"moe.e{i}.w": np.zeros((2, 2), np.float32) for i in range(3)},
    }


def _upd(cid, held, n, tokens, g, **vals):
    """An update holding ``held`` experts: tensors given by ``vals`` (name with '.' -> '_')."""
    params = {n_: g[n_].copy() for n_ in ["emb.w", "router.w"] + [EXPERTS[k][0] for k in held]}
    for k, v in vals.items():
        name = k.replace("_", ".")
        params[name] = np.broadcast_to(np.asarray(v, np.float32), g[name].shape).copy()
    return ClientUpdate(cid, params, frozenset(held), n, tokens)


def test_expert_token_mix_shared_by_samples_untrained_identical():
    g = _global()
    a = _upd("a", ["L0.E0", "L0.E1"], 1, {"L0.E0": 3, "L0.E1": 2}, g, moe_e0_w=4.0, moe_e1_w=1.0, emb_w=1.0)
    b = _upd("b", ["L0.E0"], 3, {"L0.E0": 1}, g, moe_e0_w=8.0, emb_w=5.0)
    new, delta, stats = aggregate_experts(g, [a, b], LAYOUT)
    assert np.all(new["moe.e0.w"] == 5.0)  # (3*4 + 1*8) / 4: the 3:1 mix
    assert np.all(new["moe.e1.w"] == 1.0)  # only a trained it
    assert np.all(new["emb.w"] == 4.0)  # (1*1 + 3*5) / 4 by samples
    assert new["moe.e2.w"] is g["moe.e2.w"]  # untrained: the same array
    assert new["moe.e2.w"].tobytes() == g["moe.e2.w"].tobytes()
    assert "moe.e2.w" not in delta and stats["untrained_experts"] == ["L0.E2"]
    assert stats["expert_clients"] == {"L0.E0": 2, "L0.E1": 1, "L0.E2": 0}
    assert stats["expert_weight"]["L0.E0"] == 4.0
    assert all(v.dtype == g[k].dtype for k, v in new.items())


def test_router_rows_by_holders():
    g = _global()
    ra = g["router.w"] + np.array([[1.0], [2.0], [9.0]], np.float32)
    rb = g["router.w"] + np.array([[5.0], [7.0], [9.0]], np.float32)
    a = _upd("a", ["L0.E0", "L0.E1"], 1, {}, g)
    b = _upd("b", ["L0.E0"], 3, {}, g)
    a.params["router.w"], b.params["router.w"] = ra, rb
    new, delta, stats = aggregate_experts(g, [a, b], LAYOUT)
    np.testing.assert_allclose(new["router.w"][0], g["router.w"][0] + 4.0, rtol=1e-6)  # (1*1+3*5)/4
    np.testing.assert_allclose(new["router.w"][1], g["router.w"][1] + 2.0, rtol=1e-6)  # a only
    assert new["router.w"][2].tobytes() == g["router.w"][2].tobytes()  # nobody held E2
    assert stats["row_masks"]["router.w"].tolist() == [True, True, False]
    assert np.all(delta["router.w"][2] == 0)


def test_zero_tokens_fall_back_to_equal_and_other_weightings():
    g = _global()
    a = _upd("a", ["L0.E0"], 1, {"L0.E0": 0}, g, moe_e0_w=2.0)
    b = _upd("b", ["L0.E0"], 3, {}, g, moe_e0_w=6.0)
    assert np.all(aggregate_experts(g, [a, b], LAYOUT)[0]["moe.e0.w"] == 4.0)
    assert np.all(aggregate_experts(g, [a, b], LAYOUT, weighting="samples")[0]["moe.e0.w"] == 5.0)
    assert np.all(aggregate_experts(g, [a, b], LAYOUT, weighting="uniform")[0]["moe.e0.w"] == 4.0)


def test_unheld_expert_tensors_ignored_and_unknown_rejected():
    g = _global()
    a = _upd("a", ["L0.E0"], 1, {"L0.E0": 1}, g)
    a.params["moe.e2.w"] = np.ones((2, 2), np.float32)  # not held: carries no information
    new, _, _ = aggregate_experts(g, [a], LAYOUT)
    assert new["moe.e2.w"] is g["moe.e2.w"]
    a.params["bogus"] = np.ones(1, np.float32)
    with pytest.raises(ValueError, match="bogus"):
        aggregate_experts(g, [a], LAYOUT)


def test_clip_norm():
    g = _global()
    a = _upd("a", ["L0.E0"], 1, {"L0.E0": 1}, g, moe_e0_w=np.array([[3.0, 4.0], [0.0, 0.0]]))
    new, _, stats = aggregate_experts(g, [a], LAYOUT, clip_norm=2.5)  # delta norm 5 -> halved
    np.testing.assert_allclose(new["moe.e0.w"], [[1.5, 2.0], [0, 0]])
    assert stats["clipped"] == 1


def test_median_and_trimmed_mean():
    g = _global()
    ups = [_upd(c, ["L0.E0"], 1, {"L0.E0": t}, g, moe_e0_w=v, emb_w=v)
           for c, t, v in [("a", 1, 1.0), ("b", 1, 2.0), ("c", 100, 100.0)]]
    assert np.all(aggregate_experts(g, ups, LAYOUT, method="median")[0]["moe.e0.w"] == 2.0)
    tm = aggregate_experts(g, ups, LAYOUT, method="trimmed_mean", trim_ratio=0.34)[0]
    assert np.all(tm["moe.e0.w"] == 2.0) and np.all(tm["emb.w"] == 2.0)
    assert np.all(aggregate_experts(g, ups, LAYOUT, method="trimmed_mean", trim_ratio=0.0)[0]
                  ["emb.w"] == np.float32(103 / 3))
    # router median over holders only
    ups[0].params["router.w"] = g["router.w"] + 1
    new = aggregate_experts(g, ups[:1] + [_upd("d", ["L0.E1"], 1, {}, g)], LAYOUT, method="median")[0]
    np.testing.assert_allclose(new["router.w"][0], g["router.w"][0] + 1, rtol=1e-6)
    assert new["router.w"][2].tobytes() == g["router.w"][2].tobytes()


floats = st.floats(-10, 10, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(st.lists(floats, min_size=4, max_size=4), st.integers(1, 4), st.integers(1, 50))
def test_identical_updates_give_that_update(vals, copies, tokens):
    g = _global()
    u = _upd("a", ["L0.E0", "L0.E2"], 7, {"L0.E0": tokens, "L0.E2": 0}, g,
             moe_e0_w=np.array(vals).reshape(2, 2), emb_w=vals[0], moe_e2_w=vals[1])
    u.params["router.w"] = g["router.w"] + vals[2]
    new, _, _ = aggregate_experts(g, [u] * copies, LAYOUT)
    for n in u.params:
        rows = [0, 2] if n == "router.w" else slice(None)  # row 1: E1 not held, unchanged
        np.testing.assert_allclose(new[n][rows], u.params[n][rows], rtol=1e-5, atol=1e-5)
    assert new["router.w"][1].tobytes() == g["router.w"][1].tobytes()


@settings(max_examples=40, deadline=None)
@given(st.lists(floats, min_size=3, max_size=3), st.lists(st.integers(1, 20), min_size=3, max_size=3),
       st.integers(2, 7))
def test_weights_invariant_to_scaling(vals, weights, c):
    g = _global()

    def ups(scale):
        return [_upd(f"c{i}", ["L0.E0", "L0.E1"], w * scale, {"L0.E0": w * scale}, g, moe_e0_w=v, emb_w=v)
                for i, (v, w) in enumerate(zip(vals, weights))]

    a, _, _ = aggregate_experts(g, ups(1), LAYOUT)
    b, _, _ = aggregate_experts(g, ups(c), LAYOUT)
    for n in a:
        np.testing.assert_allclose(a[n], b[n], rtol=1e-6, atol=1e-6)


def test_server_avg_matches_aggregate():
    g = _global()
    a = _upd("a", ["L0.E0"], 2, {"L0.E0": 1}, g, moe_e0_w=3.0, emb_w=1.0)
    new, delta, stats = aggregate_experts(g, [a], LAYOUT)
    p, st0 = server_step(g, delta, None, row_masks=stats["row_masks"])
    for n in g:
        assert p[n].tobytes() == new[n].tobytes()
    assert st0.step == 1
    p, _ = server_step(g, delta, None, lr=0.5)
    assert np.all(p["moe.e0.w"] == 1.5)


def test_fedadam_hand_computed_and_untouched_frozen():
    g = {"a": np.zeros(2), "b": np.ones(2), "r": np.zeros((2, 1))}
    d = {"a": np.array([0.5, -0.5]), "b": np.array([1.0, 1.0]), "r": np.ones((2, 1))}
    p1, s1 = server_step(g, d, None, kind="fedadam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3,
                         row_masks={"r": np.array([True, False])})
    m = 0.1 * 0.5
    v = 0.99 * 1e-6 + 0.01 * 0.25
    np.testing.assert_allclose(p1["a"], [0.1 * m / (np.sqrt(v) + 1e-3), -0.1 * m / (np.sqrt(v) + 1e-3)])
    assert p1["r"][1, 0] == 0.0 and p1["r"][0, 0] > 0 and s1.m["r"][1, 0] == 0.0
    p2, s2 = server_step(p1, {"a": d["a"]}, s1, kind="fedadam", lr=0.1)
    assert p2["b"] is p1["b"] and p2["r"] is p1["r"]  # untouched: no moment-driven drift
    assert s2.m["b"].tobytes() == s1.m["b"].tobytes() and s2.v["b"].tobytes() == s1.v["b"].tobytes()
    p3, _ = server_step(p1, d, s1, kind="fedadam", lr=0.1, touched={"a"})
    assert p3["b"] is p1["b"]


def test_fedyogi_and_state_arrays():
    g = {"a": np.zeros(1)}
    d = {"a": np.array([0.2])}
    _, s = server_step(g, d, None, kind="fedyogi", beta2=0.99, tau=1e-3)
    v0 = 1e-6
    assert s.v["a"][0] == pytest.approx(v0 - 0.01 * 0.04 * np.sign(v0 - 0.04))
    r = ServerOptState.from_arrays(s.to_arrays(), s.step)
    assert r.step == 1 and r.m["a"].tobytes() == s.m["a"].tobytes()
    with pytest.raises(ValueError):
        server_step(g, d, None, kind="sgd")


def test_no_updates_changes_nothing():
    g = _global()
    new, delta, stats = aggregate_experts(g, [], LAYOUT)
    assert all(new[n] is g[n] for n in g) and delta == {} and stats["num_updates"] == 0
