"""A real device's data partition, kept in its Flower ``context.state`` between messages.

In a deployment every message starts a new ClientApp process, and building the whole
federated dataset to take one partition out of it costs ~2.5 CPU-seconds each time (about
half of what a ClientApp process costs here). :func:`node_experiment` does it once per node
and run: it stores the node's train and held-out arrays in ``context.state`` (which the
SuperNode keeps for the run and hands to the next ClientApp process) and later builds only
the model. The arrays are the ones :func:`fedmoe_flwr.experiment.experiment_for` gives, so
results are identical.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context

from fedmoe_flwr.config import Config, flatten

ARRAYS_KEY = "fedmoe-partition"
META_KEY = "fedmoe-partition-meta"


@dataclass
class NodeData:
    """The part of :class:`~fedmoe_flwr.data.FederatedData` a ClientApp uses, for one partition."""

    partition: int
    train: tuple[np.ndarray, np.ndarray]
    holdout: tuple[np.ndarray, np.ndarray]
    input_shape: tuple[int, ...]
    num_classes: int

    def client_train(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        self._check(i)
        return self.train

    def client_holdout(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        self._check(i)
        return self.holdout

    def _check(self, i: int) -> None:
        if int(i) != self.partition:
            raise ValueError(f"this node holds partition {self.partition}, not {i}")


def config_digest(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(flatten(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


@lru_cache(maxsize=4)
def _model(flat_items: tuple, input_shape: tuple, num_classes: int):
    from fedmoe_flwr.config import unflatten
    from fedmoe_flwr.experiment import build_for_strategy
    from fedmoe_flwr.models import param_layout

    cfg = unflatten(dict(flat_items))
    stub = NodeData(-1, (np.zeros(0), np.zeros(0)), (np.zeros(0), np.zeros(0)), input_shape, num_classes)
    model = build_for_strategy(cfg, stub)
    return model, param_layout(model)


def node_experiment(cfg: Config, context: Context, partition: int):
    """``(cfg, data, model, layout)`` like ``experiment_for``, with ``data`` this node's partition only."""
    state = context.state
    digest = config_digest(cfg)
    meta = state.config_records.get(META_KEY)
    if meta is not None and meta.get("config") == digest and int(meta["partition"]) == partition and ARRAYS_KEY in state.array_records:
        rec = state[ARRAYS_KEY]
        data = NodeData(
            partition,
            (rec["x-train"].numpy(), rec["y-train"].numpy()),
            (rec["x-holdout"].numpy(), rec["y-holdout"].numpy()),
            tuple(int(s) for s in meta["input-shape"]),
            int(meta["num-classes"]),
        )
    else:
        from fedmoe_flwr.experiment import experiment_for

        cfg, full, _, _ = experiment_for(cfg)
        (x, y), (xh, yh) = full.client_train(partition), full.client_holdout(partition)
        data = NodeData(partition, (x, y), (xh, yh), tuple(int(s) for s in full.input_shape), int(full.num_classes))
        state[ARRAYS_KEY] = ArrayRecord({
            "x-train": Array(np.ascontiguousarray(x)), "y-train": Array(np.ascontiguousarray(y)),
            "x-holdout": Array(np.ascontiguousarray(xh)), "y-holdout": Array(np.ascontiguousarray(yh)),
        })
        state[META_KEY] = ConfigRecord({
            "config": digest, "partition": partition,
            "input-shape": list(data.input_shape), "num-classes": data.num_classes,
        })
    model, layout = _model(tuple(sorted(flatten(cfg).items())), data.input_shape, data.num_classes)
    return cfg, data, model, layout
