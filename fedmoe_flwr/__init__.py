"""fedmoe_flwr: federated Mixture-of-Experts training with client-expert alignment, on Flower.

Subpackages: ``models`` (MoE layers, model zoo, slicing by expert), ``core`` (the alignment
core: pure functions), ``client`` (ClientApp and helper), ``data`` (offline datasets and
partitioners), ``sim`` (simulation backends). Strategies live in ``fedmoe_flwr.strategies`` (the
top-level ``strategies`` package re-exports them). Nothing is imported eagerly: importing this package is cheap.
"""

__version__ = "0.1.0"
