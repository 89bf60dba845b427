"""The server's reference update for the trust check (docs/robustness.md#trust).

FLTrust (Cao et al., NDSS 2021) lets the server train the round's global model on a small
clean root set of its own and weigh each client by how well its update agrees with that
reference. :func:`root_reference` builds the ``reference_fn`` of
:class:`~fedmoe_flwr.strategies.ExpertStrategy` for the shipped models and data: the whole
MoE (every expert active), the clients' local training settings, a root sample of
``strategy.trust_samples`` drawn from the clients' pooled training data.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from fedmoe_flwr.client.local_update import train_local
from fedmoe_flwr.config import Config
from fedmoe_flwr.experiment import build
from fedmoe_flwr.models import load_wire, set_active_experts, to_wire
from fedmoe_flwr.seeding import rng_for


def root_reference(cfg: Config, data) -> Callable[[dict[str, np.ndarray], int], dict[str, np.ndarray]]:
    """``(global_params, server_round) -> trained_params``: one local update of the MoE on the
    server's root sample, as a client would train it; seeded by ``(seed, round)``."""
    model = build(cfg, data, variant="moe")
    x, y = data.root_sample(cfg.strategy.trust_samples, cfg.seed)
    t = cfg.train

    def reference(params: dict[str, np.ndarray], server_round: int) -> dict[str, np.ndarray]:
        load_wire(model, {n: torch.from_numpy(np.asarray(a)) for n, a in params.items()})
        set_active_experts(model, None)
        torch.manual_seed(int(rng_for(cfg.seed, "root-torch", server_round).integers(2**31)))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the ClientApps: the same bits in every backend's server process
        try:
            train_local(model, x, y, epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr,
                        rng=rng_for(cfg.seed, "root-batches", server_round), momentum=t.momentum,
                        balance_weight=t.balance_weight, z_weight=t.z_weight, max_batches=t.max_batches,
                        all_positions=t.all_positions, optimizer=t.optimizer)
        finally:
            torch.set_num_threads(threads)
        return {n: v.numpy().copy() for n, v in to_wire(model).items()}

    return reference
