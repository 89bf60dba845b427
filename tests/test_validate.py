"""Validation rejects each kind of bad reply, naming it, and accepts a good one."""

import numpy as np
import pytest

from fedmoe_flwr.core.validate import expected_names, validate_report, validate_update
from fedmoe_flwr.layout import ParamLayout

LAYOUT = ParamLayout(
    expert_params={"L0.E0": ("moe.e0.w",), "L0.E1": ("moe.e1.w",)},
    shared_params=("emb.w", "router.w"),
    router_params={"router.w": 0},
    nbytes={"emb.w": 24, "router.w": 16, "moe.e0.w": 16, "moe.e1.w": 16},
    num_experts={0: 2},
)
REF = {
    "emb.w": np.zeros((2, 3), np.float32),
    "router.w": np.zeros((2, 2), np.float32),
    "moe.e0.w": np.zeros((2, 2), np.float32),
    "moe.e1.w": np.zeros((2, 2), np.float32),
}
EXPECTED = expected_names(LAYOUT, ["L0.E0"])


def _good():
    return {n: REF[n] + 0.1 for n in EXPECTED}


def _check(params, norm_bound=None):
    return validate_update(params, expected_names=EXPECTED, reference=REF, norm_bound=norm_bound,
                           layout=LAYOUT)


def test_expected_names():
    assert EXPECTED == {"emb.w", "router.w", "moe.e0.w"}


def test_accepts_good_update():
    assert _check(_good(), norm_bound=10.0) == (True, "ok")


def _bad(mutate):
    p = _good()
    mutate(p)
    return p


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda p: p.pop("moe.e0.w"), "missing tensor 'moe.e0.w'"),
        (lambda p: p.update({"moe.e1.w": REF["moe.e1.w"]}), "expert L0.E1 not assigned"),
        (lambda p: p.update({"evil.w": np.zeros(1, np.float32)}), "unknown tensor 'evil.w'"),
        (lambda p: p.update({"emb.w": np.zeros((3, 2), np.float32)}), "shape mismatch for 'emb.w'"),
        (lambda p: p.update({"emb.w": np.zeros((2, 3), np.float64)}), "dtype mismatch for 'emb.w'"),
        (lambda p: p["router.w"].__setitem__((0, 0), np.nan), "non-finite values (NaN) in 'router.w'"),
        (lambda p: p["moe.e0.w"].__setitem__((1, 1), np.inf), "non-finite values (Inf) in 'moe.e0.w'"),
        (lambda p: p.update({"emb.w": [[0.0] * 3] * 2}), "not a numpy array"),
    ],
)
def test_rejects_each_kind(mutate, needle):
    ok, reason = _check(_bad(mutate))
    assert not ok and needle in reason, reason


def test_rejects_norm_over_bound():
    p = _good()
    p["emb.w"] = REF["emb.w"] + 3.0  # sqrt(6 * 9) = 7.35, plus small parts
    ok, reason = _check(p, norm_bound=5.0)
    assert not ok and "delta norm" in reason and "> bound 5" in reason
    assert _check(p, norm_bound=100.0)[0]


def test_validate_report():
    held = {"L0.E0"}
    assert validate_report({"L0.E0": 3}, held, 10) == (True, "ok")
    assert validate_report({}, held, 1, hist={"L0.E1": 0.5}, expert_keys=["L0.E0", "L0.E1"])[0]
    bad = [
        (({"L0.E1": 3}, held, 10), "not held"),
        (({"L0.E0": -1}, held, 10), "finite and >= 0"),
        (({"L0.E0": float("nan")}, held, 10), "finite and >= 0"),
        (({"L0.E0": "x"}, held, 10), "finite and >= 0"),
        (({}, held, 0), "num_samples"),
        (({}, held, float("inf")), "num_samples"),
        (({}, held, None), "num_samples"),
    ]
    for args, needle in bad:
        ok, reason = validate_report(*args)
        assert not ok and needle in reason, (args, reason)
    ok, reason = validate_report({}, held, 1, hist={"L9.E9": 0.1}, expert_keys=["L0.E0"])
    assert not ok and "unknown expert" in reason
    ok, reason = validate_report({}, held, 1, hist={"L0.E0": np.inf})
    assert not ok and "histogram" in reason
