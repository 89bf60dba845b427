"""Expert adapters on non-HF models: a user's own MoE (MoESpec), fedmoe's MoELayer, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedmoe_flwr.core.aggregate import ClientUpdate, aggregate_experts
from fedmoe_flwr.layout import expert_key
from fedmoe_flwr.models import build_model, param_layout
from fedmoe_flwr.models.adapters import (
    MoESpec,
    NoMoELayerError,
    count_tokens,
    load_wire,
    mask_experts,
    model_experts,
    router_logits,
    to_wire,
)
from fedmoe_flwr.models.slicing import from_array_record, sub_state, to_array_record

D, H, E = 8, 12, 4


class UserMoE(nn.Module):
    """A user's MoE block: router Linear + ModuleList of experts, top-1 softmax gating."""

    def __init__(self, num_experts=E):
        super().__init__()
        self.router = nn.Linear(D, num_experts)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, D)) for _ in range(num_experts))

    def forward(self, x):
        probs = self.router(x).softmax(-1)  # [N, E]; the mask hook makes absent rows 0
        p, idx = probs.max(-1)
        out = torch.stack([ex(x) for ex in self.experts], 1)  # dense for brevity: [N, E, D]
        return x + p[:, None] * out[torch.arange(len(x)), idx]


class FusedMoE(nn.Module):
    """A user's MoE with fused expert weights [E, D, H] and [E, H, D]."""

    def __init__(self, num_experts=E):
        super().__init__()
        self.router = nn.Linear(D, num_experts, bias=False)
        self.experts = nn.Module()
        self.experts.w_in = nn.Parameter(torch.randn(num_experts, D, H) / D**0.5)
        self.experts.w_out = nn.Parameter(torch.randn(num_experts, H, D) / H**0.5)

    def forward(self, x):
        probs = self.router(x).softmax(-1)
        p, idx = probs.max(-1)
        h = torch.relu(torch.einsum("nd,ndh->nh", x, self.experts.w_in[idx]))
        return x + p[:, None] * torch.einsum("nh,nhd->nd", h, self.experts.w_out[idx])


class UserNet(nn.Module):
    moe_spec = MoESpec(router="blocks.*.router", experts="blocks.*.experts")

    def __init__(self, fused=False):
        super().__init__()
        self.inp = nn.Linear(5, D)
        self.blocks = nn.ModuleList([FusedMoE() if fused else UserMoE(), FusedMoE() if fused else UserMoE(3)])
        self.out = nn.Linear(D, 2)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.out(h)


def _net(fused, seed=0):
    torch.manual_seed(seed)
    return UserNet(fused)


def test_a_user_moe_described_by_one_spec_has_every_expert():
    layout = param_layout(_net(False))
    assert layout.num_experts == {0: 4, 1: 3}
    assert layout.expert_params["L1.E2"] == tuple(f"blocks.1.experts.2.{n}" for n in ("0.weight", "0.bias", "2.weight", "2.bias"))
    assert layout.router_params == {"blocks.0.router.weight": 0, "blocks.0.router.bias": 0, "blocks.1.router.weight": 1, "blocks.1.router.bias": 1}
    fused = param_layout(_net(True))
    assert fused.expert_params["L0.E3"] == ("blocks.0.experts.w_in/E3", "blocks.0.experts.w_out/E3")
    assert fused.nbytes["blocks.0.experts.w_in/E3"] == D * H * 4
    assert "blocks.0.experts.w_in" not in fused.nbytes, "the fused tensor travels only as rows"


@pytest.mark.parametrize("fused", [False, True])
def test_wire_round_trip_is_exact_through_an_array_record(fused):
    src, dst = _net(fused, 0), _net(fused, 1)
    wire = from_array_record(to_array_record(to_wire(src)))
    assert list(wire) == list(param_layout(src).nbytes)
    load_wire(dst, wire)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


@settings(max_examples=20, deadline=None)
@given(st.sets(st.integers(0, 3), min_size=1), st.sets(st.integers(0, 3), min_size=1), st.booleans())
def test_loading_a_sub_state_changes_exactly_its_tensors(held0, held1, fused):
    src, dst = _net(fused, 0), _net(fused, 1)
    layout = param_layout(src)
    keys = [expert_key(0, e) for e in held0] + [expert_key(1, e) for e in held1 if e < layout.num_experts[1]]
    before = {n: t.clone() for n, t in to_wire(dst).items()}
    load_wire(dst, sub_state(to_wire(src), layout, keys))
    after, want = to_wire(dst), to_wire(src)
    sent = set(layout.param_names(keys))
    for n in after:
        assert torch.equal(after[n], want[n] if n in sent else before[n]), n


@pytest.mark.parametrize("fused", [False, True])
def test_masked_experts_get_no_tokens_and_the_forward_ignores_them(fused):
    model = _net(fused)
    x = torch.randn(64, 5)
    keys = ["L0.E1", "L0.E2", "L1.E0"]
    mask_experts(model, keys)
    with count_tokens(model) as tokens:
        model.train()
        y = model(x)
    t = tokens()
    held = np.array([k in keys for k in param_layout(model).expert_keys])
    assert (t[~held] == 0).all() and t[:4].sum() == t[4:].sum() == 64
    # Absent experts' weights do not matter: scrambling them leaves the output unchanged.
    with torch.no_grad():
        for n, p in to_wire(model).items():
            if any(n in param_layout(model).expert_params[k] for k in ("L0.E0", "L0.E3", "L1.E1")):
                p.normal_()
    assert torch.equal(model(x), y)
    mask_experts(model, None)
    with router_logits(model) as captured:
        model(x)
    assert [c[0].shape for c in captured] == [(64, 4), (64, 4 if fused else 3)]


def test_per_expert_aggregation_touches_only_held_fused_rows():
    model = _net(True)
    layout = param_layout(model)
    glob = {n: t.detach().numpy().copy() for n, t in to_wire(model).items()}

    def update(cid, keys):
        params = {n: v + 1.0 for n, v in glob.items() if n in set(layout.param_names(keys))}
        return ClientUpdate(cid, params, frozenset(keys), 10, {k: 5.0 for k in keys})

    new, _, _ = aggregate_experts(glob, [update("a", ["L0.E1", "L1.E0"]), update("b", ["L0.E1", "L1.E2"])], layout)
    load_wire(model, {n: torch.from_numpy(v) for n, v in new.items()})
    w_in = model.blocks[0].experts.w_in.detach().numpy()
    assert np.allclose(w_in[1], glob["blocks.0.experts.w_in/E1"] + 1.0)
    for e in (0, 2, 3):
        assert np.array_equal(w_in[e], glob[f"blocks.0.experts.w_in/E{e}"]), "rows nobody held stay bit-identical"
    router = model.blocks[0].router.weight.detach().numpy()
    assert np.array_equal(router[0], glob["blocks.0.router.weight"][0]) and not np.array_equal(router[1], glob["blocks.0.router.weight"][1])


def test_fedmoe_models_keep_their_layout_names_and_masking():
    model = build_model("moe_lm", n_layer=2, num_experts=3, d_model=8, d_hidden=8, n_head=2, vocab_size=7)
    assert to_wire(model).keys() == model.state_dict().keys(), "no fused tensors: the wire state is the state_dict"
    mask_experts(model, ["L0.E2", "L1.E0"])
    assert [m.active.tolist() for m in model.modules() if hasattr(m, "active")] == [[False, False, True], [True, False, False]]
    assert [type(layer).__name__ for layer in model_experts(model).layers] == ["FedMoELayer", "FedMoELayer"]


def test_a_model_without_moe_layers_is_an_error_not_a_silent_fedavg():
    with pytest.raises(NoMoELayerError, match=r"Sequential.*docs/models.md#adapters"):
        param_layout(nn.Sequential(nn.Linear(3, 3)))
    dense = nn.Sequential(nn.Linear(3, 3))
    dense.fedmoe_dense = True
    assert param_layout(dense).expert_params == {}
    assert param_layout(build_model("dense_mlp")).expert_params == {}, "the zoo's dense twins declare themselves"


def test_bad_specs_and_keys_are_clear_errors():
    class Wrong(UserNet):
        moe_spec = MoESpec(router="blocks.*.router", experts="blocks.*.nothing")

    with pytest.raises(ValueError, match="each router needs its experts"):
        param_layout(Wrong())
    model = _net(False)
    with pytest.raises(KeyError, match="unknown expert key 'L0.E9'"):
        mask_experts(model, ["L0.E9", "L1.E0"])
    with pytest.raises(ValueError, match=r"layer\(s\) \[1\] would have no active expert"):
        mask_experts(model, ["L0.E0"])
    with pytest.raises(ValueError, match="does not have"):
        load_wire(model, {"blocks.0.experts.w_in/E0": torch.zeros(D, H)})
    with pytest.raises(ValueError, match="received shape"):
        load_wire(model, {"inp.weight": torch.zeros(2, 2)})


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sets(st.integers(0, E - 1), min_size=1), st.floats(0.5, 50.0)), min_size=1, max_size=4),
       st.integers(0, 2**16))
def test_aggregating_fused_rows_equals_the_per_expert_mean_of_separate_tensors(clients, seed):
    """Row e of a fused tensor aggregates exactly as expert e's own tensor would: the
    token-weighted mean of the deltas of the clients that held e, others bit-identical."""
    model = _net(True)
    layout = param_layout(model)
    glob = {n: t.detach().numpy().astype(np.float64) for n, t in to_wire(model).items()}
    rng = np.random.default_rng(seed)
    updates, fused = [], np.array(model.blocks[0].experts.w_in.detach().numpy(), dtype=np.float64)
    for i, (held, tokens) in enumerate(clients):
        keys = [f"L0.E{e}" for e in sorted(held)] + ["L1.E0"]
        params = {n: glob[n] + rng.normal(size=glob[n].shape) for n in layout.param_names(keys)}
        updates.append((held, tokens, params, ClientUpdate(f"c{i}", params, frozenset(keys), 10, {k: tokens for k in keys})))
    new, _, _ = aggregate_experts(glob, [u for *_, u in updates], layout)
    for e in range(E):
        name = f"blocks.0.experts.w_in/E{e}"
        holders = [(t, p[name]) for held, t, p, _ in updates if e in held]
        if not holders:
            assert np.array_equal(new[name], glob[name]), "a row nobody held stays bit-identical"
            continue
        expected = fused[e] + sum(t * (p - fused[e]) for t, p in holders) / sum(t for t, _ in holders)
        assert np.allclose(new[name], expected, atol=1e-9)
