"""MoELayer: masking, sparse dispatch, gates, auxiliary losses, gradients, helpers."""

import math

import pytest
import torch
from torch import nn

from fedmoe_flwr.models import (
    MoELayer,
    UnknownExpertError,
    active_expert_keys,
    aux_loss,
    build_model,
    expert_keys,
    moe_layers,
    set_active_experts,
)

D, H = 12, 16


def _layer(E=6, k=1, shared=False, gate="straight_through", seed=0):
    torch.manual_seed(seed)
    return MoELayer(D, H, E, top_k=k, shared_expert=shared, gate=gate)


def _small_copy(big: MoELayer, held: list[int]) -> MoELayer:
    """A layer with only experts ``held`` of ``big`` (same weights, same router rows)."""
    small = MoELayer(D, H, len(held), top_k=big.top_k, shared_expert=big.shared is not None, gate=big.gate)
    with torch.no_grad():
        small.router.weight.copy_(big.router.weight[held])
        small.router.bias.copy_(big.router.bias[held])
        for i, e in enumerate(held):
            small.experts[i].load_state_dict(big.experts[e].state_dict())
        if big.shared is not None:
            small.shared.load_state_dict(big.shared.state_dict())
    return small


def _reference(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Dense reference: every expert on every token, combined with the gate weights."""
    x = x.reshape(-1, D)
    logits = layer.router(x).masked_fill(~layer.active, float("-inf"))
    probs = logits.softmax(-1)
    k = min(layer.top_k, int(layer.active.sum()))
    idx = logits.topk(k, dim=-1).indices
    p = probs.gather(1, idx)
    if k == 1:
        w = p / p.detach() if layer.gate == "straight_through" else p
    else:
        w = p / p.sum(-1, keepdim=True)
    W = torch.zeros_like(probs).scatter(1, idx, w)  # [N, E]
    outs = torch.stack([ex(x) for ex in layer.experts], dim=1)  # [N, E, d]
    y = torch.einsum("ne,ned->nd", W, outs)
    return y + layer.shared(x) if layer.shared is not None else y


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("held", [[0, 2, 5], [3], [1, 4]])
def test_masked_forward_equals_model_with_only_held_experts(k, shared, held):
    big = _layer(E=6, k=k, shared=shared)
    small = _small_copy(big, held)
    mask = torch.zeros(6, dtype=torch.bool)
    mask[held] = True
    big.set_active(mask)
    x = torch.randn(5, 7, D)
    y_big, y_small = big(x), small(x)
    assert y_big.shape == x.shape
    assert torch.allclose(y_big, y_small, atol=1e-6)
    held_t = torch.tensor(held)
    assert torch.equal(big.last.top1, held_t[small.last.top1])
    assert torch.equal(big.last.tokens_per_expert[held_t], small.last.tokens_per_expert)
    assert big.last.tokens_per_expert.sum() == 35 and big.last.tokens_per_expert[~mask].sum() == 0
    assert torch.allclose(big.last.gate_mass[held_t], small.last.gate_mass, atol=1e-5)
    assert torch.allclose(big.last.balance_loss, small.last.balance_loss, atol=1e-6)
    assert torch.allclose(big.last.z_loss, small.last.z_loss, atol=1e-5)


def test_masked_model_matches_via_set_active_experts():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(D, D), _layer(E=4, k=2, shared=True), _layer(E=3, k=1))
    ref = nn.Sequential(model[0], _small_copy(model[1], [1, 3]), _small_copy(model[2], [2]))
    set_active_experts(model, ["L0.E1", "L0.E3", "L1.E2"])
    assert active_expert_keys(model) == ["L0.E1", "L0.E3", "L1.E2"]
    x = torch.randn(20, D)
    assert torch.allclose(model(x), ref(x), atol=1e-6)
    set_active_experts(model, None)
    assert active_expert_keys(model) == expert_keys(model)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("gate", ["straight_through", "softmax"])
@pytest.mark.parametrize("shared", [False, True])
def test_sparse_dispatch_equals_dense_reference(k, gate, shared):
    layer = _layer(E=5, k=k, shared=shared, gate=gate, seed=3)
    x = torch.randn(3, 11, D)
    y = layer(x)
    y_ref = _reference(layer, x).reshape(x.shape)
    assert torch.allclose(y, y_ref, atol=1e-6)
    # same gradients to router and experts
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), list(layer.parameters()))
    grads_ref = torch.autograd.grad((y_ref * g).sum(), list(layer.parameters()), allow_unused=True)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b if b is not None else torch.zeros_like(a), atol=1e-5)
    # with a mask too
    layer.set_active(torch.tensor([True, False, True, True, False]))
    assert torch.allclose(layer(x), _reference(layer, x).reshape(x.shape), atol=1e-6)


def test_straight_through_top1_output_is_unscaled_expert_output():
    layer = _layer(E=4, k=1)
    x = torch.randn(30, D)
    y = layer(x)
    for e in range(4):
        sel = layer.last.top1 == e
        if sel.any():
            assert torch.allclose(y[sel], layer.experts[e](x[sel]), atol=1e-6)
    soft = _layer(E=4, k=1, gate="softmax")
    ys = soft(x)
    p = soft.router(x).softmax(-1).max(-1).values
    e0 = soft.last.top1
    expect = torch.stack([soft.experts[int(e)](x[i : i + 1])[0] for i, e in enumerate(e0)]) * p[:, None]
    assert torch.allclose(ys, expect, atol=1e-6)


def test_top2_uses_two_distinct_experts_and_normalised_weights():
    layer = _layer(E=4, k=2)
    x = torch.randn(16, D)
    layer.force_uniform_routing = True
    y = layer(x)
    # round robin over 4 experts: token i -> experts (2i % 4, 2i+1 % 4)
    assert torch.equal(layer.last.top1, (torch.arange(16) * 2) % 4)
    assert torch.equal(layer.last.tokens_per_expert, torch.tensor([8.0, 0.0, 8.0, 0.0]))
    assert torch.allclose(y, _uniform_reference(layer, x), atol=1e-6)


def _uniform_reference(layer, x):
    probs = layer.router(x).softmax(-1)
    out = []
    for i in range(x.shape[0]):
        a, b = (2 * i) % 4, (2 * i + 1) % 4
        pa, pb = probs[i, a], probs[i, b]
        out.append((pa * layer.experts[a](x[i]) + pb * layer.experts[b](x[i])) / (pa + pb))
    return torch.stack(out)


@pytest.mark.parametrize("mask", [None, [True, False, True, True, False, True]])
def test_balance_loss_is_one_at_perfect_balance(mask):
    layer = _layer(E=6, k=1)
    if mask is not None:
        layer.set_active(torch.tensor(mask))
    n_act = int(layer.active.sum())
    layer.force_uniform_routing = True
    layer(torch.randn(n_act * 7, D))
    tpe = layer.last.tokens_per_expert
    assert torch.equal(tpe[layer.active], torch.full((n_act,), 7.0))
    assert tpe[~layer.active].sum() == 0
    assert torch.allclose(layer.last.balance_loss, torch.tensor(1.0), atol=1e-6)


@pytest.mark.parametrize("mask", [None, [False, True, True, False, True, False]])
def test_z_loss_with_equal_logits_is_log_e_squared(mask):
    layer = _layer(E=6)
    nn.init.zeros_(layer.router.weight)
    nn.init.zeros_(layer.router.bias)
    if mask is not None:
        layer.set_active(torch.tensor(mask))
    n_act = int(layer.active.sum())
    layer(torch.randn(10, D))
    assert torch.allclose(layer.last.z_loss, torch.tensor(math.log(n_act) ** 2), atol=1e-6)
    # uniform probabilities: balance = E * sum_e f_e / E = 1 whatever the ties chose
    assert torch.allclose(layer.last.balance_loss, torch.tensor(1.0), atol=1e-6)
    assert torch.allclose(layer.last.gate_mass[layer.active], torch.full((n_act,), 10 / n_act))


def test_aux_losses_hand_computed():
    layer = MoELayer(D, H, 2)
    nn.init.zeros_(layer.router.weight)
    with torch.no_grad():
        layer.router.bias.copy_(torch.tensor([math.log(3.0), 0.0]))  # probs [0.75, 0.25]
    layer(torch.randn(8, D))
    # every token -> expert 0: f = [1, 0], P = [0.75, 0.25]; balance = 2 * 0.75
    assert torch.allclose(layer.last.balance_loss, torch.tensor(1.5))
    assert torch.allclose(layer.last.z_loss, torch.tensor(math.log(4.0) ** 2))
    assert torch.equal(layer.last.tokens_per_expert, torch.tensor([8.0, 0.0]))
    model = nn.Sequential(layer)
    assert aux_loss(model, 0.1, 1e-3).item() == pytest.approx(0.1 * 1.5 + 1e-3 * math.log(4.0) ** 2)


def test_gradients_reach_router_and_held_experts_only():
    torch.manual_seed(0)
    layer = _layer(E=4, k=1)
    layer.set_active(torch.tensor([True, False, True, False]))
    x = torch.randn(64, D)
    y = layer(x)
    assert (layer.last.tokens_per_expert[[0, 2]] > 0).all()
    (y.square().mean() + aux_loss(nn.Sequential(layer))).backward()
    w = layer.router.weight.grad
    assert w[[0, 2]].abs().sum() > 0 and w[[1, 3]].abs().sum() == 0
    assert layer.router.bias.grad[[1, 3]].abs().sum() == 0
    for e in (0, 2):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.experts[e].parameters())
    for e in (1, 3):
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in layer.experts[e].parameters())


@pytest.mark.parametrize("gate", ["straight_through", "softmax"])
def test_router_gets_gradient_from_the_task_loss_alone(gate):
    layer = _layer(E=4, k=1, gate=gate)
    layer(torch.randn(32, D)).square().mean().backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_top1_unmasked_ignores_mask():
    layer = _layer(E=5, k=1)
    x = torch.randn(40, D)
    layer.set_active(torch.tensor([False, True, False, False, True]))
    layer(x)
    assert torch.equal(layer.last.top1_unmasked, layer.router(x).argmax(-1))
    assert set(layer.last.top1.tolist()) <= {1, 4}
    assert layer.last.num_tokens == 40


def test_fewer_active_than_k_uses_all_active():
    layer = _layer(E=4, k=2)
    layer.set_active(torch.tensor([False, False, True, False]))
    x = torch.randn(9, D)
    assert torch.allclose(layer(x), layer.experts[2](x), atol=1e-6)


def test_empty_input():
    layer = _layer(E=3, k=2, shared=True)
    y = layer(torch.randn(0, 4, D))
    assert y.shape == (0, 4, D) and layer.last.num_tokens == 0
    assert layer.last.balance_loss.item() == 0.0


def test_set_active_experts_errors_and_is_atomic():
    torch.manual_seed(0)
    model = build_model("moe_lm", n_layer=2, num_experts=4)
    set_active_experts(model, ["L0.E1", "L1.E0"])
    before = active_expert_keys(model)
    for bad in (["L0.E4", "L1.E0"], ["L2.E0", "L0.E0"]):
        with pytest.raises(ValueError, match="unknown expert key"):
            set_active_experts(model, bad)
    with pytest.raises(UnknownExpertError):
        set_active_experts(model, ["L0.E9", "L1.E0"])
    with pytest.raises(ValueError, match="not an expert key"):
        set_active_experts(model, ["expert0"])
    with pytest.raises(ValueError, match=r"layer\(s\) \[1\] would have no active expert"):
        set_active_experts(model, ["L0.E0", "L0.E2"])
    with pytest.raises(TypeError):
        set_active_experts(model, "L0.E0")
    assert active_expert_keys(model) == before
    with pytest.raises(ValueError):
        moe_layers(model)[0].set_active(torch.zeros(4, dtype=torch.bool))


def test_active_mask_is_not_in_state_dict_and_helpers_on_dense():
    layer = _layer(E=3)
    assert not any("active" in n for n in layer.state_dict())
    dense = build_model("dense_mlp")
    dense(torch.randn(2, 64))
    assert moe_layers(dense) == [] and expert_keys(dense) == []
    loss = aux_loss(dense)
    assert loss.shape == () and float(loss) == 0.0
    set_active_experts(dense, None)
    set_active_experts(dense, [])
    with pytest.raises(ValueError):
        set_active_experts(dense, ["L0.E0"])


def test_constructor_validation():
    with pytest.raises(ValueError, match="top_k"):
        MoELayer(D, H, 4, top_k=3)
    with pytest.raises(ValueError, match="gate"):
        MoELayer(D, H, 4, gate="noisy")
    with pytest.raises(ValueError, match="activation"):
        MoELayer(D, H, 4, activation="tanh")
