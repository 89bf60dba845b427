"""Slicing by expert: layout, split/sub/merge round trips, ArrayRecord round trips."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedmoe_flwr.layout import ParamLayout
from fedmoe_flwr.models import MODEL_NAMES, MoELayer, build_model, from_array_record, held_expert_keys, merge_sub_state, param_layout, split_state, state_nbytes, sub_state, sub_state_names, to_array_record  # noqa: E501

torch.manual_seed(0)
LM = build_model("moe_lm", n_layer=2, num_experts=4, d_model=16, d_hidden=8, n_head=2, vocab_size=11)
LM_STATE = LM.state_dict()
LM_LAYOUT = param_layout(LM)
KEYS = LM_LAYOUT.expert_keys


def _same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(
        a[n].dtype == b[n].dtype and a[n].shape == b[n].shape and torch.equal(a[n], b[n]) for n in a
    )


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_layout_partitions_the_state(name):
    model = build_model(name, num_experts=3)
    state, layout = model.state_dict(), param_layout(model)
    expert_names = [n for names in layout.expert_params.values() for n in names]
    assert len(expert_names) == len(set(expert_names))
    assert sorted(expert_names + list(layout.shared_params)) == sorted(state)
    assert set(layout.router_params) <= set(layout.shared_params)
    assert layout.nbytes == {n: t.numel() * t.element_size() for n, t in state.items()}
    n_layers = 2 if name.endswith("lm") else 1
    if name.startswith("dense"):
        assert layout.expert_params == {} and layout.router_params == {}
    else:
        assert layout.num_experts == {l: 3 for l in range(n_layers)}
        assert len(layout.router_params) == 2 * n_layers
        for rname in layout.router_params:
            assert state[rname].shape[0] == 3
    assert ParamLayout.from_dict(layout.to_dict()) == layout


def test_layout_names_and_buffers():
    torch.manual_seed(0)
    root = MoELayer(4, 5, 3)
    layout = param_layout(root)
    assert layout.expert_params["L0.E2"] == (
        "experts.2.fc1.weight", "experts.2.fc1.bias", "experts.2.fc2.weight", "experts.2.fc2.bias"
    )
    assert layout.router_params == {"router.weight": 0, "router.bias": 0}
    assert layout.expert_nbytes("L0.E1") == (4 * 5 + 5 + 5 * 4 + 4) * 4
    model = nn.Sequential(nn.BatchNorm1d(4), MoELayer(4, 5, 2))
    layout = param_layout(model)
    assert "0.num_batches_tracked" in layout.shared_params and "0.running_mean" in layout.shared_params
    assert layout.nbytes["0.num_batches_tracked"] == 8
    assert layout.expert_params["L0.E1"][0] == "1.experts.1.fc1.weight"


@settings(max_examples=40, deadline=None)
@given(keys=st.sets(st.sampled_from(KEYS)), seed=st.integers(0, 2**16))
def test_split_sub_merge_round_trip(keys, seed):
    sub = sub_state(LM_STATE, LM_LAYOUT, keys)
    names = set(LM_LAYOUT.shared_params).union(*(LM_LAYOUT.expert_params[k] for k in keys))
    assert set(sub) == names and list(sub) == [n for n in LM_STATE if n in names]
    assert set(sub_state_names(LM_LAYOUT, keys)) == names
    assert held_expert_keys(sub, LM_LAYOUT) == sorted(keys, key=KEYS.index)
    shared, experts = split_state(sub, LM_LAYOUT)
    assert list(shared) == list(LM_LAYOUT.shared_params) and set(experts) == set(keys)
    parts = dict(shared)
    for d in experts.values():
        parts.update(d)
    rebuilt = merge_sub_state(LM_STATE, parts, LM_LAYOUT)
    assert _same(rebuilt, LM_STATE)
    # a trained sub-state replaces exactly its tensors
    g = torch.Generator().manual_seed(seed)
    trained = {n: t + torch.randn(t.shape, generator=g).to(t.dtype) for n, t in sub.items()}
    merged = merge_sub_state(LM_STATE, trained, LM_LAYOUT)
    assert list(merged) == list(LM_STATE)
    for n, t in merged.items():
        assert torch.equal(t, trained[n] if n in trained else LM_STATE[n])
    assert _same(sub_state(merged, LM_LAYOUT, keys), trained)
    # and through the wire
    assert _same(from_array_record(to_array_record(trained)), trained)
    # the full split puts everything back
    full_shared, full_experts = split_state(LM_STATE, LM_LAYOUT)
    assert list(full_experts) == KEYS
    assert _same(merge_sub_state(LM_STATE, full_shared, LM_LAYOUT), LM_STATE)
    assert state_nbytes(sub) == LM_LAYOUT.shared_nbytes + sum(LM_LAYOUT.expert_nbytes(k) for k in keys)


def test_array_record_round_trip_mixed_dtypes():
    state = {
        "w": torch.randn(3, 4),
        "t": torch.randn(4, 3).t(),  # non-contiguous
        "d": torch.randn(2, dtype=torch.float64),
        "h": torch.randn(5).half(),
        "i": torch.arange(6).reshape(2, 3),
        "b": torch.tensor([True, False]),
        "s": torch.tensor(3.5),  # 0-dim
        "e": torch.zeros(0, 4),
        "p": nn.Parameter(torch.randn(2)),
    }
    record = to_array_record(state)
    back = from_array_record(record)
    expect = {n: t.detach() for n, t in state.items()}
    assert _same(back, expect)
    assert list(record) == list(state)
    assert sum(a.numpy().nbytes for a in record.values()) == state_nbytes(state)
    assert len(to_array_record({})) == 0 and from_array_record(to_array_record({})) == {}


@pytest.mark.parametrize("name", ["moe_lm", "moe_cnn", "dense_mlp"])
def test_model_state_round_trip_and_nbytes(name):
    torch.manual_seed(0)
    model = build_model(name)
    state = model.state_dict()
    record = to_array_record(state)
    back = from_array_record(record)
    assert _same(back, state)
    layout = param_layout(model)
    assert sum(layout.nbytes.values()) == sum(a.numpy().nbytes for a in record.values()) == state_nbytes(state)
    fresh = build_model(name)
    fresh.load_state_dict(back)
    assert _same(fresh.state_dict(), state)


def test_merge_rejects_bad_sub_states():
    sub = sub_state(LM_STATE, LM_LAYOUT, ["L0.E1"])
    with pytest.raises(ValueError, match="unknown"):
        merge_sub_state(LM_STATE, {**sub, "nope.weight": torch.zeros(1)}, LM_LAYOUT)
    name = "blocks.0.ffn.experts.1.fc1.weight"
    with pytest.raises(ValueError, match=name):
        merge_sub_state(LM_STATE, {**sub, name: torch.zeros(3, 3)}, LM_LAYOUT)
    with pytest.raises(ValueError, match="float64"):
        merge_sub_state(LM_STATE, {**sub, name: sub[name].double()}, LM_LAYOUT)
    with pytest.raises(ValueError, match="only some tensors"):
        merge_sub_state(LM_STATE, {name: sub[name]}, LM_LAYOUT)
    with pytest.raises(ValueError, match="does not know"):
        split_state({"nope": torch.zeros(1)}, LM_LAYOUT)


def test_sub_state_rejects_unknown_keys():
    for exc in (KeyError, ValueError):
        with pytest.raises(exc, match=r"unknown expert key\(s\) \['L0.E7'\]"):
            sub_state(LM_STATE, LM_LAYOUT, ["L0.E1", "L0.E7"])
    with pytest.raises(ValueError, match="not an expert key"):
        sub_state(LM_STATE, LM_LAYOUT, ["E1"])
    with pytest.raises(TypeError):
        sub_state(LM_STATE, LM_LAYOUT, "L0.E1")
    partial = sub_state(LM_STATE, LM_LAYOUT, ["L0.E1"])
    with pytest.raises(KeyError, match="lacks"):
        sub_state(partial, LM_LAYOUT, ["L0.E2"])
    assert _same(sub_state(partial, LM_LAYOUT, ["L0.E1"]), partial)
