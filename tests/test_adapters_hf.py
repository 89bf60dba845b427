"""Expert adapters on tiny random-init Hugging Face MoE models (offline, no hub)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from fedmoe_flwr.core.aggregate import ClientUpdate, aggregate_experts  # noqa: E402
from fedmoe_flwr.layout import expert_key  # noqa: E402
from fedmoe_flwr.models import param_layout  # noqa: E402
from fedmoe_flwr.models.adapters import count_tokens, load_wire, mask_experts, model_experts, to_wire  # noqa: E402
from fedmoe_flwr.models.adapters.layer import parse_wire_name  # noqa: E402
from fedmoe_flwr.models.hf_tiny import FAMILIES, hf_forward, hf_model_class, hf_tiny_config, hf_tiny_model  # noqa: E402
from fedmoe_flwr.models.slicing import from_array_record, sub_state, to_array_record  # noqa: E402

E, HELD = 5, [0, 2, 3]
N_LAYERS = {"switch": 4}  # encoder + decoder blocks; the others have 2 decoder layers


def _ids(seed=0):
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(seed))


def _pruned(family: str, model) -> torch.nn.Module:
    """The same model built with only experts HELD (router rows and experts cut out)."""
    layers = model_experts(model).layers
    top_k = 1 if family == "switch" else 2
    small = hf_model_class(family)(hf_tiny_config(family, len(HELD), min(top_k, len(HELD)))).eval()
    big = model.state_dict()
    rows = {n for layer in layers for n in layer.router_tensors + layer.fused}
    state = {}
    for n in small.state_dict():
        if n in rows:
            state[n] = big[n][HELD]
        elif ".experts.expert_" in n:  # Switch: expert_<i> of the small model is expert_<HELD[i]>
            head, tail = n.split(".experts.expert_")
            i, rest = tail.split(".", 1)
            state[n] = big[f"{head}.experts.expert_{HELD[int(i)]}.{rest}"]
        else:
            state[n] = big[n]
    small.load_state_dict(state)
    return small


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_finds_every_expert_of_every_layer(family):
    model = hf_tiny_model(family, E)
    layout = param_layout(model)
    n_layers = N_LAYERS.get(family, 2)
    assert layout.num_experts == {l: E for l in range(n_layers)} and len(layout.expert_keys) == n_layers * E
    state = model.state_dict()
    for key in layout.expert_keys:
        for name in layout.expert_params[key]:
            fused = parse_wire_name(name)
            assert (fused is not None) == (family != "switch"), "transformers 5.x fuses all but Switch"
            if fused:
                assert fused[1] == int(key.split(".E")[1]) and state[fused[0]].shape[0] == E
    for name, l in layout.router_params.items():
        assert state[name].shape[0] == E
    if family == "qwen2_moe":
        assert any("shared_expert." in n for n in layout.shared_params), "Qwen2-MoE's shared expert is shared"
    wire_bytes = sum(layout.nbytes.values())
    assert wire_bytes == sum(t.numel() * t.element_size() for t in state.values()), "rows add up to the fused tensors"


@pytest.mark.parametrize("family", FAMILIES)
def test_wire_round_trip_is_exact(family):
    src, dst = hf_tiny_model(family, E, seed=0), hf_tiny_model(family, E, seed=1)
    load_wire(dst, from_array_record(to_array_record(to_wire(src))))
    a, b = src.state_dict(), dst.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert torch.equal(hf_forward(src, _ids()), hf_forward(dst, _ids()))


@pytest.mark.parametrize("family", FAMILIES)
def test_masking_equals_the_model_built_without_the_absent_experts(family):
    model = hf_tiny_model(family, E)
    layout = param_layout(model)
    keys = [expert_key(l, e) for l in layout.num_experts for e in HELD]
    mask_experts(model, keys)
    ids = _ids()
    assert torch.allclose(hf_forward(model, ids), hf_forward(_pruned(family, model), ids), atol=1e-5)
    model.train()
    with count_tokens(model) as tokens:
        hf_forward(model, ids)
    t = tokens().reshape(len(layout.num_experts), E)
    assert (t[:, [1, 4]] == 0).all() and (t.sum(1) == ids.numel()).all(), "absent experts get no token"
    mask_experts(model, None)
    model.eval()
    assert not torch.allclose(hf_forward(model, ids), hf_forward(_pruned(family, model), ids), atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "switch"])
def test_per_expert_aggregation_touches_only_held_rows(family):
    model = hf_tiny_model(family, E)
    layout = param_layout(model)
    glob = {n: t.detach().numpy().copy() for n, t in to_wire(model).items()}

    def update(cid, keys, shift):
        sent = sub_state(to_wire(model), layout, keys)
        return ClientUpdate(cid, {n: t.numpy() + shift for n, t in sent.items()}, frozenset(keys), 4, {k: 3.0 for k in keys})

    a, b = ["L0.E1", "L1.E0"], ["L0.E1", "L0.E2", "L1.E0"]
    new, _, stats = aggregate_experts(glob, [update("a", a, 1.0), update("b", b, 3.0)], layout)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    load_wire(model, {n: torch.from_numpy(v) for n, v in new.items()})
    held = set(a) | set(b)
    for key in layout.expert_keys:
        for name in layout.expert_params[key]:
            fused = parse_wire_name(name)
            now = model.state_dict()[fused[0]][fused[1]] if fused else model.state_dict()[name]
            old = before[fused[0]][fused[1]] if fused else before[name]
            if key in held:
                want = 2.0 if key == "L0.E1" or key == "L1.E0" else 3.0  # mean of +1 and +3, or +3 alone
                assert torch.allclose(now, old + want), name
            else:
                assert torch.equal(now, old), f"{name}: an expert nobody held must stay bit-identical"
    assert set(stats["untrained_experts"]) == set(layout.expert_keys) - held
