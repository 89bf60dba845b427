"""The wire contract between fedmoe_flwr's strategies and clients.

One place names every record and key a message carries, so the server side (strategies,
no torch) and the client side (ClientApp, helper) cannot drift apart.

TRAIN message (server -> client)
    ``arrays``  ArrayRecord: the shared tensors plus exactly the assigned experts' tensors.
    ``config``  ConfigRecord: ``server-round``, ``experts`` (list of expert keys), and the
                training settings of the round (``local-epochs``, ``lr``, ...).
TRAIN reply (client -> server)
    ``arrays``  ArrayRecord: the same tensor names, trained values.
    ``report``  MetricRecord: see :data:`REPORT_VECTORS` and :data:`REPORT_SCALARS`.
    ``profile`` ConfigRecord: the node's stable ``client-id`` and declared capacity.
QUERY message: ``config`` with ``probe`` (bool) and, when probing, ``arrays`` with the
    shared tensors only. QUERY reply: ``profile`` and, when probed, ``report`` with the
    routing histogram and gate share.
EVALUATE message/reply: like TRAIN, without training; the reply's ``metrics`` record holds
    ``num-examples``, ``accuracy`` and ``loss`` on the client's held-out split.
"""

from __future__ import annotations

import math

import numpy as np

ARRAYS = "arrays"
CONFIG = "config"
REPORT = "report"
PROFILE = "profile"
METRICS = "metrics"

# Per-expert vectors, length K in ParamLayout.expert_keys order.
HIST = "hist"  # share of samples whose top-1 over ALL router rows is k (before training)
GATE_SHARE = "gate-share"  # share of router probability mass on k (before training)
TOKENS = "tokens"  # tokens routed to k during local training (0 for experts not held)
EXPERT_LOSS = "expert-loss"  # mean loss of tokens routed to k; MISSING if none
REPORT_VECTORS = (HIST, GATE_SHARE, TOKENS, EXPERT_LOSS)

NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TRAIN_TIME = "train-time-s"  # compute time of local training (simulated or measured)
DOWN_TIME = "down-time-s"
UP_TIME = "up-time-s"
BYTES_DOWN = "bytes-down"
BYTES_UP = "bytes-up"
REPORT_SCALARS = (NUM_EXAMPLES, TRAIN_LOSS, TRAIN_TIME, DOWN_TIME, UP_TIME, BYTES_DOWN, BYTES_UP)

# Profile keys (declared capacity and, in simulation, the device's nominal speeds).
CLIENT_ID = "client-id"
EXPERT_MEMORY = "expert-memory-bytes"  # bytes the client can hold for experts (hard limit)
SAMPLES_PER_S = "samples-per-s"
UPLINK = "uplink-Bps"
DOWNLINK = "downlink-Bps"
RELIABILITY = "reliability"
TIER = "tier"

MISSING = -1.0  # MetricRecord values must be finite numbers: -1 marks "no observation"


def encode_vector(v) -> list[float]:
    """A per-expert vector for a MetricRecord: NaN (no observation) becomes MISSING."""
    return [MISSING if not math.isfinite(float(x)) else float(x) for x in np.asarray(v).ravel()]


def decode_vector(values, length: int, *, missing_as_nan: bool = True) -> np.ndarray:
    """Inverse of :func:`encode_vector`; raises ValueError on a wrong length."""
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.shape != (length,):
        raise ValueError(f"per-expert vector has length {arr.size}, expected {length}")
    if missing_as_nan:
        arr = np.where(arr == MISSING, np.nan, arr)
    return arr
