"""``dense-small``: Flower's FedAvg on the dense model that fits the smallest device, trained
by every client ("train what fits"; the model is ``dense-small`` of :mod:`fedmoe_flwr.variants`)."""

from __future__ import annotations

from fedmoe_flwr.strategies.dense import DenseFedAvg


class DenseSmallFedAvg(DenseFedAvg):
    name = "dense-small"
