"""Krum, Multi-Krum and Bulyan per aggregation group (fedmoe_flwr/core/selection.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmoe_flwr import core
from fedmoe_flwr.core.aggregate import aggregate_experts
from fedmoe_flwr.core.selection import assumed_byzantine, enough, krum_scores, select
from tests.test_robustness import GLOBAL, LAYOUT, _reply


def _attacked(seed: int, honest: int, liars: int, dim: int, offset: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    good = rng.normal(size=(honest, dim))
    bad = offset + rng.normal(size=(liars, dim))
    return np.vstack([good, bad])


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 3), st.integers(2, 40), st.floats(20, 1e4))
def test_every_rule_picks_only_honest_rows_when_the_group_is_large_enough(seed, f, dim, offset):
    for method in ("krum", "multikrum", "bulyan"):
        m = 4 * f + 3 if method == "bulyan" else 2 * f + 3
        assert enough(method, m, f) and not enough(method, m - 1, f)
        stack = _attacked(seed, m - f, f, dim, offset)
        picked = select(stack, method, f)
        assert len(picked) == {"krum": 1, "multikrum": m - f, "bulyan": m - 2 * f}[method]
        if method != "bulyan":
            assert all(i < m - f for i in picked), (method, picked)
            continue
        # Bulyan may pick liars; its coordinate-wise trim of f at each end keeps the result
        # inside the honest values' range
        kept = np.sort(stack[picked], axis=0)[f: len(picked) - f].mean(axis=0)
        honest = stack[: m - f]
        assert (honest.min(axis=0) - 1e-9 <= kept).all() and (kept <= honest.max(axis=0) + 1e-9).all()


def test_krum_scores_sum_the_nearest_squared_distances():
    v = np.array([[0.0], [1.0], [3.0], [10.0], [11.0]])
    # f = 1: each row sums its m - f - 2 = 2 nearest squared distances
    assert krum_scores(v, 1).tolist() == [1 + 9, 1 + 4, 4 + 9, 1 + 49, 1 + 64]
    assert assumed_byzantine(5, 0.2) == 1 and assumed_byzantine(3, 0.2) == 1 and assumed_byzantine(10, 0.3) == 3


def _updates(values: dict[str, float], experts=(0, 1)):
    out = []
    for cid, v in values.items():
        r = _reply(v, list(experts))
        out.append(core.ClientUpdate(cid, r.params, frozenset(f"L0.E{e}" for e in experts), 100,
                                     {f"L0.E{e}": 100.0 for e in experts}))
    return out


def test_krum_in_aggregation_keeps_one_honest_delta_and_small_groups_fall_back_to_the_median():
    updates = _updates({"a": 0.10, "b": 0.11, "c": 0.12, "d": 0.13, "evil": 50.0})
    new, delta, stats = aggregate_experts(dict(GLOBAL), updates, LAYOUT, method="krum")
    assert 0.10 <= new["e0"].max() <= 0.13 and 0.10 <= new["w"].max() <= 0.13
    assert stats["fallbacks"] == []
    three = _updates({"a": 0.1, "b": 0.2, "evil": 50.0})
    new, _, stats = aggregate_experts(dict(GLOBAL), three, LAYOUT, method="multikrum")
    assert new["e0"].max() == pytest.approx(0.2), "3 holders < 2f + 3: the median"
    assert set(stats["fallbacks"]) == {"shared", "L0.E0", "L0.E1"}


def test_bulyan_and_multikrum_through_apply_round():
    replies = {f"h{i}": (_reply(0.1 + 0.01 * i, [0, 1]), [0, 1]) for i in range(6)}
    replies["evil"] = (_reply(-40.0, [0, 1]), [0, 1])
    for method in ("multikrum", "bulyan"):
        state, _ = core.ensure_clients(core.init_state(LAYOUT.expert_keys), list(replies))
        sent = {c: core.Sent(c, ("L0.E0", "L0.E1"), 100) for c in replies}
        inputs = core.RoundInputs(1, sent, {c: r for c, (r, _) in replies.items()}, registered={c: 100 for c in replies})
        robust = core.RobustSettings(aggregator=method, clip="none", max_share=0, max_capture=0)
        _, new, stats = core.apply_round(state, GLOBAL, LAYOUT, inputs, core.RoundSettings(robust=robust))
        assert 0.1 <= new["e0"].min() and new["e0"].max() <= 0.16, method
        assert "aggregator_fallbacks" not in stats.metrics(state), "7 contributors, f = 1: enough for both"


def test_an_unknown_aggregator_is_refused():
    with pytest.raises(ValueError, match="aggregator"):
        core.RobustSettings(aggregator="krumm")
    with pytest.raises(ValueError, match="byzantine_fraction"):
        core.RobustSettings(byzantine_fraction=0.5)
