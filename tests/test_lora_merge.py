"""LoRA aggregation: the product average re-factorised at rank r, against factor averaging."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmoe_flwr.models.adapters.lora_merge import factorise, mean_product, merge_lora, merge_pair


def test_averaging_factors_separately_is_biased_and_the_product_average_is_not():
    # Rank-2 adapters, each client using one direction: e1 e1^T and e2 e2^T.
    A1, B1 = np.array([[1.0, 0.0], [0.0, 0.0]]), np.array([[1.0, 0.0], [0.0, 0.0]])
    A2, B2 = np.array([[0.0, 1.0], [0.0, 0.0]]), np.array([[0.0, 0.0], [1.0, 0.0]])
    mean = mean_product([A1, A2], [B1, B2], [1, 1])
    assert np.allclose(mean, np.eye(2) / 2)
    assert np.allclose(((B1 + B2) / 2) @ ((A1 + A2) / 2), np.full((2, 2), 0.25)), "cross terms nobody trained"
    A, B = merge_pair([A1, A2], [B1, B2], [1, 1])
    assert A.shape == (2, 2) and B.shape == (2, 2)
    assert np.allclose(B @ A, mean), "the mean update fits in rank 2: recovered exactly"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10**6), st.floats(0.1, 5)), min_size=1, max_size=4), st.integers(1, 3))
def test_product_merge_is_never_worse_than_the_factor_average(clients, rank):
    rng = [np.random.default_rng(s) for s, _ in clients]
    As = [g.normal(size=(rank, 5)) for g in rng]
    Bs = [g.normal(size=(4, rank)) for g in rng]
    w = [wi for _, wi in clients]
    mean = mean_product(As, Bs, w)
    A, B = merge_pair(As, Bs, w)
    wn = np.asarray(w) / sum(w)
    naive = sum(x * b for x, b in zip(wn, Bs)) @ sum(x * a for x, a in zip(wn, As))
    assert np.linalg.norm(B @ A - mean) <= np.linalg.norm(naive - mean) + 1e-9
    if len(clients) == 1:
        assert np.allclose(B @ A, Bs[0] @ As[0]), "one client: its own update, re-factorised"


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10**6), st.integers(1, 4))
def test_factorise_is_exact_up_to_the_rank(seed, rank):
    g = np.random.default_rng(seed)
    delta = g.normal(size=(6, rank)) @ g.normal(size=(rank, 5))
    A, B = factorise(delta, rank)
    assert A.shape == (rank, 5) and B.shape == (6, rank) and np.allclose(B @ A, delta)
    A, B = factorise(delta, 6)  # asking for more rank than the matrix has pads with zeros
    assert A.shape == (6, 5) and B.shape == (6, 6) and np.allclose(B @ A, delta)


def test_merge_lora_uses_only_holders_and_their_weights():
    g = np.random.default_rng(0)
    pair = {"x.lora_A/E0": "x.lora_B/E0", "y.lora_A/E1": "y.lora_B/E1"}
    u1 = {"x.lora_A/E0": g.normal(size=(1, 3)), "x.lora_B/E0": g.normal(size=(2, 1))}
    u2 = {**{k: g.normal(size=v.shape) for k, v in u1.items()}}
    out = merge_lora([u1, u2], pair, lambda i, name: [3.0, 1.0][i])
    assert set(out) == {"x.lora_A/E0", "x.lora_B/E0"}, "nobody held y: nothing to merge"
    want = (3 * u1["x.lora_B/E0"] @ u1["x.lora_A/E0"] + u2["x.lora_B/E0"] @ u2["x.lora_A/E0"]) / 4
    got = out["x.lora_B/E0"] @ out["x.lora_A/E0"]
    U, S, Vt = np.linalg.svd(want)
    assert np.allclose(got, S[0] * np.outer(U[:, 0], Vt[0])), "the best rank-1 approximation of the weighted mean"
    with pytest.raises(ValueError, match="weights must be finite"):
        mean_product([u1["x.lora_A/E0"]], [u1["x.lora_B/E0"]], [-1.0])
