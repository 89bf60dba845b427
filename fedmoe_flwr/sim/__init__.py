"""Execution backends for simulation runs (the round loop is always Flower's ``Strategy.start``)."""

from fedmoe_flwr.sim.local_grid import LocalGrid

__all__ = ["LocalGrid"]
