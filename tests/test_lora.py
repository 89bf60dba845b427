"""LoRA on experts: only adapters (and routers) travel, per expert (aggregation: test_lora_merge)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrize

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
