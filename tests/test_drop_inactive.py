"""``drop_inactive``: a client routes as the global model does; tokens routed to an expert it
does not hold skip the layer, and only held experts count tokens."""

import numpy as np
import pytest
import torch

from fedmoe_flwr.client.local_update import train_local
from fedmoe_flwr.models import MoELayer, build_model, set_active_experts
from fedmoe_flwr.models.moe import dropping_inactive

D, H, E = 12, 16, 6


def _layer(k=1, seed=0):
    torch.manual_seed(seed)
    return MoELayer(D, H, E, top_k=k)


@pytest.mark.parametrize("k", [1, 2])
def test_with_every_expert_active_dropping_changes_nothing(k):
    layer, x = _layer(k), torch.randn(40, D)
    y = layer(x)
    layer.drop_inactive = True
    assert torch.equal(layer(x), y)


@pytest.mark.parametrize("k", [1, 2])
def test_kept_tokens_match_the_global_model_and_dropped_ones_skip(k):
    layer, x = _layer(k), torch.randn(200, D)
    with torch.no_grad():
        full = layer(x)
        top = layer.router(x).topk(k, dim=-1).indices  # [N, k] the global routing
        held = torch.tensor([True, False, True, False, False, False])
        layer.set_active(held)
        layer.drop_inactive = True
        y = layer(x)
    every = held[top].all(dim=1)  # all of the token's experts held: exactly the global output
    none = ~held[top].any(dim=1)  # none held: the layer adds nothing
    assert every.any() and none.any()
    torch.testing.assert_close(y[every], full[every])
    assert torch.equal(y[none], torch.zeros_like(y[none]))
    top1 = layer.last.top1
    assert bool((top1[held[top[:, 0]]] == top[held[top[:, 0]], 0]).all())
    assert bool((top1[~held[top[:, 0]]] == -1).all())
    assert layer.last.tokens_per_expert[~held].sum() == 0
    assert layer.last.tokens_per_expert.sum() == int(held[top[:, 0]].sum())


def test_the_router_keeps_its_gradient_with_one_held_expert():
    """Masked to one expert, the top-1 gate is constant and the router learns nothing;
    dropping keeps the global softmax, so it does."""
    grads = {}
    for drop in (False, True):
        layer, x = _layer(), torch.randn(64, D)
        layer.set_active(torch.tensor([True] + [False] * (E - 1)))
        layer.drop_inactive = drop
        layer(x).pow(2).sum().backward()
        grads[drop] = layer.router.weight.grad.abs().sum().item()
    assert grads[False] == 0.0 and grads[True] > 0.0


def test_local_training_reports_tokens_only_for_held_experts():
    torch.manual_seed(0)
    model = build_model("moe_mlp", in_dim=16, num_classes=3, num_experts=4, d_model=8, d_hidden=8, num_moe_layers=2)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(120, 16)).astype(np.float32), rng.integers(0, 3, 120)
    set_active_experts(model, ["L0.E1", "L1.E2"])
    with dropping_inactive(model):
        r = train_local(model, x, y, epochs=1, batch_size=20, lr=0.1, rng=np.random.default_rng(1))
    held = np.zeros(8, bool)
    held[[1, 4 + 2]] = True
    assert r.tokens[~held].sum() == 0
    assert 0 < r.tokens[held].sum() < 2 * 120, "some tokens were dropped, the rest counted once per layer"
    assert not any(m.drop_inactive for m in model.modules() if isinstance(m, MoELayer)), "the setting is restored"


@pytest.mark.parametrize("drop", [False, True])
def test_the_client_app_drops_only_when_the_config_says_so(drop, one_torch_thread):
    """train.drop_inactive reaches the ClientApp: clients holding some experts report fewer
    routed tokens than samples; without it every sample routes to a held expert."""
    from flwr.app import ConfigRecord

    from fedmoe_flwr import protocol as P
    from tests.test_strategy import build_setup, small_config

    cfg = small_config()
    cfg.train.drop_inactive = drop
    cfg, layout, grid, strat, arrays = build_setup(cfg=cfg)
    msgs = list(strat.configure_train(1, arrays, ConfigRecord(), grid))
    partial = {m.metadata.dst_node_id for m in msgs if len(m.content[P.CONFIG]["experts"]) < len(layout.expert_keys)}
    reports = [P.decode_report(r.content, len(layout.expert_keys)) for r in grid.send_and_receive(msgs)
               if not r.has_error() and r.metadata.src_node_id in partial]
    assert reports
    short = [rep.tokens.sum() < rep.num_examples for rep in reports]
    assert any(short) if drop else not any(short)
