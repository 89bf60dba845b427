"""Offline datasets, flwr-datasets partitioning and the per-client view.

Start with :func:`load_federated`::

    from fedmoe_flwr.data import load_federated
    fd = load_federated("fashion_mnist", num_clients=100, partitioner="dirichlet", alpha=0.1,
                        seed=0, max_train_samples=20_000)
    x, y = fd.client_train(3)        # float32 [n, 1, 28, 28], int64 [n]
    x_test, y_test = fd.test         # the global test set

Heavy imports (``datasets``, ``flwr_datasets``, ``sklearn``) happen only when a function needs them.
"""

from fedmoe_flwr.data.federated import (
    DATASETS,
    PARTITIONERS,
    TASKS,
    ArrayPool,
    FederatedData,
    WindowPool,
    load_federated,
    split_holdout,
)
from fedmoe_flwr.data.online import ONLINE_DATASETS, hf_to_numpy, load_online
from fedmoe_flwr.data.partition import (
    DOMAIN_KINDS,
    SCHEMES,
    DomainTransform,
    domain_partition_indices,
    partition_indices,
)
from fedmoe_flwr.data.shakespeare import LEAF_CHARS, VOCAB_SIZE, ShakespeareData, load_shakespeare
from fedmoe_flwr.data.sources import (
    ArraySplits,
    DeviceArrays,
    load_digits,
    load_fashion_mnist,
    load_mnist5k,
    read_idx,
    synthetic,
)

__all__ = [
    "DATASETS",
    "DOMAIN_KINDS",
    "LEAF_CHARS",
    "ONLINE_DATASETS",
    "PARTITIONERS",
    "SCHEMES",
    "TASKS",
    "VOCAB_SIZE",
    "ArrayPool",
    "ArraySplits",
    "DeviceArrays",
    "DomainTransform",
    "FederatedData",
    "ShakespeareData",
    "WindowPool",
    "domain_partition_indices",
    "hf_to_numpy",
    "load_digits",
    "load_fashion_mnist",
    "load_federated",
    "load_mnist5k",
    "load_online",
    "load_shakespeare",
    "partition_indices",
    "read_idx",
    "split_holdout",
    "synthetic",
]
