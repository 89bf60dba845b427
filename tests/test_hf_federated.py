"""A federated round of a Hugging Face Mixtral (fused experts) with compact clients.

The strategy, the in-process grid and the client helper are the real ones; the model's
experts travel as wire rows and each client allocates only the experts it is assigned.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from flwr.app import ConfigRecord  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from fedmoe_flwr import protocol as P  # noqa: E402
from fedmoe_flwr.client import expert_probe, expert_train, node_profile  # noqa: E402
from fedmoe_flwr.client.compact import model_for_message  # noqa: E402
from fedmoe_flwr.models import param_layout, to_wire  # noqa: E402
from fedmoe_flwr.models.adapters import model_experts  # noqa: E402
from fedmoe_flwr.models.hf_tiny import hf_model_class, hf_tiny_config  # noqa: E402
from fedmoe_flwr.models.slicing import to_array_record  # noqa: E402
from fedmoe_flwr.sim import LocalGrid  # noqa: E402
from fedmoe_flwr.strategies import AlignedStrategy  # noqa: E402

E, NODES = 4, 3
CONFIG = hf_tiny_config("mixtral", E, top_k=2)


def factory():
    return hf_model_class("mixtral")(CONFIG)


def tokens(pid: int) -> torch.Tensor:
    return torch.randint(0, 64, (8, 6), generator=torch.Generator().manual_seed(pid))


def build_app(expert_bytes: int, seen: dict) -> ClientApp:
    app = ClientApp()

    def profile(context, model):
        pid = int(context.node_config["partition-id"])
        budget = (2 if pid % 2 else 3) * expert_bytes  # at most 3 of 8 experts (1-2 per layer)
        return node_profile(context, model, expert_memory_bytes=budget)

    @app.train()
    def train(msg, context):
        model = model_for_message(msg, factory)
        pid = int(context.node_config["partition-id"])
        seen[pid] = [layer.held for layer in model_experts(model).layers]
        seen.setdefault("keys", set()).update(str(k) for k in msg.content[P.CONFIG]["experts"])
        ids = tokens(pid)

        def fit(m):
            opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad and not p.is_meta], lr=0.1)
            m.train()
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            return {P.NUM_EXAMPLES: len(ids), P.TRAIN_LOSS: float(loss.detach())}

        return expert_train(msg, model, fit, profile=profile(context, model), stats_inputs=ids.numpy())

    @app.query()
    def query(msg, context):
        model = factory()
        return expert_probe(msg, model, profile=profile(context, model), stats_inputs=tokens(0).numpy())

    return app


def test_a_round_updates_only_the_rows_of_experts_someone_held():
    torch.manual_seed(0)
    model = factory()
    layout = param_layout(model)
    expert_bytes = layout.expert_nbytes("L0.E0")
    seen: dict[int, list] = {}
    grid = LocalGrid(build_app(expert_bytes, seen), NODES, seed=0)
    strategy = AlignedStrategy(layout, fraction_train=1.0, min_train_nodes=NODES, use_deadline=False)
    initial = {n: t.clone() for n, t in to_wire(model).items()}
    result = strategy.start(grid=grid, initial_arrays=to_array_record(initial), train_config=ConfigRecord({}), num_rounds=1)

    assigned = seen.pop("keys")
    assert strategy.last.rejected == {} and len(seen) == NODES
    assert all(sum(len(h) for h in held) <= 3 for held in seen.values()), "nodes allocated only their experts"
    assert set(layout.expert_keys) - assigned, "some experts nobody held"
    final = {n: a.numpy() for n, a in result.arrays.items()}
    assert set(final) == set(initial), "the global state keeps the wire names"
    for key in layout.expert_keys:
        moved = any(not np.array_equal(final[n], initial[n].numpy()) for n in layout.expert_params[key])
        if key not in assigned:
            assert not moved, f"{key}: nobody held it, its rows must stay bit-identical"
    assert any(
        not np.array_equal(final[n], initial[n].numpy()) for k in assigned for n in layout.expert_params[k]
    ), "held experts trained"
