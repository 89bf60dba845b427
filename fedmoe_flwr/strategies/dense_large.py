"""``dense-large-exclusive``: FedAvg on the dense model of the MoE's total size, trained only by
the clients that can hold all of it (the others never take part)."""

from __future__ import annotations

from fedmoe_flwr.strategies.width import WidthFedAvg


class DenseLargeExclusive(WidthFedAvg):
    name = "dense-large-exclusive"

    def client_width(self, capacity: float) -> float | None:
        return 1.0 if capacity >= 1.0 - 1e-9 else None
