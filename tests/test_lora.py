"""LoRA on experts: only adapters (and routers) travel; product-averaged aggregation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils import parametrize

from fedmoe_flwr.models.adapters.lora_merge import factorise, mean_product, merge_lora, merge_pair

pytest.importorskip("transformers")

from fedmoe_flwr.models import param_layout  # noqa: E402
from fedmoe_flwr.models.adapters import load_wire, mask_experts, to_wire  # noqa: E402
from fedmoe_flwr.models.adapters.compact import build_compact  # noqa: E402
from fedmoe_flwr.models.adapters.lora import apply_lora, lora_pairs  # noqa: E402
from fedmoe_flwr.models.hf_tiny import hf_forward, hf_model_class, hf_tiny_config, hf_tiny_model  # noqa: E402
from fedmoe_flwr.models.slicing import sub_state  # noqa: E402

IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "switch"])
def test_only_adapters_and_routers_travel_per_expert(family):
    model = hf_tiny_model(family, 4)
    before = hf_forward(model, IDS)
    full_bytes = sum(param_layout(model).nbytes.values())
    apply_lora(model, rank=2)
    assert torch.allclose(hf_forward(model, IDS), before, atol=1e-6), "B = 0: the model is unchanged"
    layout = param_layout(model)
    assert all(".lora_" in n for names in layout.expert_params.values() for n in names)
    assert all(".lora_" in n or n in layout.router_params for n in layout.shared_params)
    assert len(layout.expert_keys) == 4 * (4 if family == "switch" else 2) and all(layout.expert_params.values())
    assert sum(layout.nbytes.values()) < full_bytes / 3
    a_names = [n for n in layout.expert_params["L1.E2"] if ".lora_A" in n]
    assert a_names and all(lora_pairs(layout.expert_params["L1.E2"])[a] in layout.expert_params["L1.E2"] for a in a_names)


def test_training_a_masked_lora_model_moves_only_held_expert_adapters():
    model = apply_lora(hf_tiny_model("mixtral", 4), rank=2)
    layout = param_layout(model)
    keys = ["L0.E1", "L1.E0", "L1.E3"]
    mask_experts(model, keys)
    before = {n: t.clone() for n, t in to_wire(model).items()}
    base = {n: t.clone() for n, t in model.state_dict().items() if n.endswith(".original")}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(2):
        with parametrize.cached():
            hf_forward(model, IDS).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    after = to_wire(model)
    for key in layout.expert_keys:
        changed = any(not torch.equal(after[n], before[n]) for n in layout.expert_params[key])
        assert changed == (key in keys), key
    assert all(torch.equal(model.state_dict()[n], t) for n, t in base.items()), "base weights are frozen"


def test_lora_on_a_compact_model_has_the_full_layout():
    def factory():
        return hf_model_class("mixtral")(hf_tiny_config("mixtral", 4, 2))

    torch.manual_seed(0)
    full = apply_lora(factory(), rank=2)
    layout = param_layout(full)
    keys = ["L0.E1", "L1.E2"]
    compact = apply_lora(build_compact(factory, keys), rank=2)
    assert param_layout(compact) == layout
    load_wire(compact, sub_state(to_wire(full), layout, keys))
    assert set(to_wire(compact)) == set(layout.param_names(keys))


# --- aggregation ---------------------------------------------------------------------

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
