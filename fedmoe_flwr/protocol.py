"""The wire contract between fedmoe_flwr's strategies and clients: every record, key and
its one encode/decode pair (docs/architecture.md#the-reply-format).

The server side (strategies, no torch) and the client side (ClientApp, helper) both go
through this module, so they cannot drift apart, and a reply is decoded exactly once.

TRAIN message (server -> client)
    ``arrays``  ArrayRecord: the shared tensors plus exactly the assigned experts' tensors.
    ``config``  ConfigRecord: ``server-round``, ``experts`` (list of expert keys), and the
                training settings of the round (``local-epochs``, ``lr``, ...).
TRAIN reply (client -> server)
    ``arrays``  ArrayRecord: the same tensor names, trained values.
    ``report``  MetricRecord: :class:`~fedmoe_flwr.core.ClientReport` (:func:`encode_report`),
                including the user's own scalars under their own names (one MetricRecord,
                as Flower's FedAvg requires); the server averages those weighted by
                ``num-examples`` like FedAvg does.
QUERY message: ``config`` with ``probe`` (bool) and, when probing, ``arrays`` with the
    shared tensors only. QUERY reply: ``profile`` (:class:`NodeProfile`) and, when probed,
    ``report`` with the routing histogram and gate share.
EVALUATE message/reply: like TRAIN, without training; the reply's ``metrics`` record holds
    ``num-examples`` and the client's scalars (``accuracy``, ``loss``...) on its held-out split.

Byte counts of what travels are :func:`record_nbytes` of the ArrayRecords, counted by the
server on what it sends and receives (a client cannot misreport them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedmoe_flwr.core.round import ClientReport
from fedmoe_flwr.layout import array_nbytes

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

NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TRAIN_TIME = "train-time-s"  # compute time of local training (simulated or measured)
DOWN_TIME = "down-time-s"
UP_TIME = "up-time-s"
PROBE_TIME = "probe-time-s"  # QUERY reply: seconds to download, route and answer (simulated or measured)

# Profile keys (declared capacity and, in simulation, the device's nominal speeds).
CLIENT_ID = "client-id"
EXPERT_MEMORY = "expert-memory-bytes"  # bytes the client can hold for experts (hard limit)
SAMPLES_PER_S = "samples-per-s"
UPLINK = "uplink-Bps"
DOWNLINK = "downlink-Bps"
RELIABILITY = "reliability"
TIER = "tier"

# Width baselines (heterofl, fjord, fedrolex, dense-large-exclusive): TRAIN/EVALUATE config keys.
WIDTH = "width"  # the client's width ratio; the arrays hold a width-sliced dense model (fedmoe_flwr.widths)
OD_LEVELS = "od-levels"  # FjORD: width ratios (of the full model) to draw one of per local step

# QUERY config keys.
PROBE = "probe"  # route a sample and reply with the histogram (needs the shared ARRAYS)
ZERO_EXPERTS = "zero-experts"  # route with every expert's output zero: only the sent (shared) tensors count

MISSING = -1.0  # MetricRecord values must be finite numbers: -1 marks "no observation"


class ProtocolError(ValueError):
    """A record that does not follow this contract; the message says what is wrong."""


def record_nbytes(arrays: ArrayRecord | None) -> int:
    """Bytes of the tensors an ArrayRecord carries (what one transfer of it costs)."""
    if arrays is None:
        return 0
    return int(sum(array_nbytes(a.shape, a.dtype) for a in arrays.values()))


def encode_vector(v) -> list[float]:
    """A per-expert vector for a MetricRecord: NaN (no observation) becomes MISSING."""
    return [MISSING if not math.isfinite(float(x)) else float(x) for x in np.asarray(v, dtype=np.float64).ravel()]


def decode_vector(values, length: int, *, missing_as_nan: bool = True) -> np.ndarray:
    """Inverse of :func:`encode_vector`; raises :class:`ProtocolError` on a wrong length or type."""
    try:
        arr = np.asarray(list(values), dtype=np.float64)
    except (TypeError, ValueError) as ex:
        raise ProtocolError(f"per-expert vector is not a list of numbers: {ex}") from None
    if arr.shape != (length,):
        raise ProtocolError(f"per-expert vector has length {arr.size}, expected {length}")
    if missing_as_nan:
        arr = np.where(arr == MISSING, np.nan, arr)
    return arr


def _number(record, key: str, *, integer: bool = False) -> float:
    if key not in record:
        raise ProtocolError(f"report lacks {key!r}")
    v = record[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise ProtocolError(f"{key!r} must be a finite number, got {v!r}")
    if integer and float(v) != int(v):
        raise ProtocolError(f"{key!r} must be a whole number, got {v!r}")
    return float(v)


# ---------------------------------------------------------------------------- TRAIN reply
REPORT_KEYS = frozenset({NUM_EXAMPLES, TRAIN_LOSS, DOWN_TIME, TRAIN_TIME, UP_TIME, HIST, GATE_SHARE, TOKENS, EXPERT_LOSS})
"""The report's own keys; any other scalar in it is a user metric."""


def encode_report(report: ClientReport) -> MetricRecord:
    """The ``report`` record of a TRAIN reply (user metrics may not reuse its own keys)."""
    clash = sorted(set(report.metrics) & REPORT_KEYS)
    if clash:
        raise ValueError(f"user metrics may not be named like report fields: {clash}")
    return MetricRecord({
        **{k: float(v) for k, v in report.metrics.items()},
        NUM_EXAMPLES: int(report.num_examples),
        TRAIN_LOSS: encode_vector([report.train_loss])[0],
        DOWN_TIME: float(report.down_s),
        TRAIN_TIME: float(report.train_s),
        UP_TIME: float(report.up_s),
        HIST: encode_vector(report.hist),
        GATE_SHARE: encode_vector(report.gate),
        TOKENS: encode_vector(report.tokens),
        EXPERT_LOSS: encode_vector(report.expert_loss),
    })


def decode_report(content: RecordDict, num_experts: int) -> ClientReport:
    """The :class:`ClientReport` of a TRAIN reply; :class:`ProtocolError` names what is wrong.

    Total: any missing key, wrong type, non-finite or negative count or time, or per-expert
    vector of the wrong length is a ProtocolError, never another exception.
    """
    if REPORT not in content or not isinstance(content[REPORT], MetricRecord):
        raise ProtocolError("reply lacks the 'report' record")
    rep = content[REPORT]
    n = _number(rep, NUM_EXAMPLES, integer=True)
    times = [_number(rep, k) for k in (DOWN_TIME, TRAIN_TIME, UP_TIME)]
    if n <= 0 or min(times) < 0:
        raise ProtocolError(f"num-examples must be > 0 and times >= 0, got {n:g} and {times}")
    loss = _number(rep, TRAIN_LOSS)
    tokens = decode_vector(rep.get(TOKENS, [0.0] * num_experts), num_experts, missing_as_nan=False)
    if not (np.isfinite(tokens) & (tokens >= 0)).all():
        raise ProtocolError("token counts must be finite and >= 0")
    missing = [MISSING] * num_experts
    return ClientReport(
        num_examples=int(n),
        train_loss=math.nan if loss == MISSING else loss,
        down_s=times[0], train_s=times[1], up_s=times[2],
        hist=decode_vector(rep.get(HIST, missing), num_experts),
        gate=decode_vector(rep.get(GATE_SHARE, missing), num_experts),
        tokens=tokens,
        expert_loss=decode_vector(rep.get(EXPERT_LOSS, missing), num_experts),
        metrics={k: v for k, v in scalars(rep).items() if k not in REPORT_KEYS},
    )


def scalars(record) -> dict[str, float]:
    """The finite scalar entries of a MetricRecord (lists and non-finite values left out)."""
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def decode_arrays(content: RecordDict) -> dict[str, np.ndarray]:
    """The tensors of a reply, as numpy arrays; ProtocolError when there are none."""
    if ARRAYS not in content or not isinstance(content[ARRAYS], ArrayRecord):
        raise ProtocolError("reply lacks the 'arrays' record")
    try:
        return {name: arr.numpy() for name, arr in content[ARRAYS].items()}
    except Exception as ex:  # noqa: BLE001 - a corrupt buffer must reject the reply, not the round
        raise ProtocolError(f"unreadable tensor: {ex}") from None


# ---------------------------------------------------------------------------- node profile
@dataclass(frozen=True)
class NodeProfile:
    """What a node declares in its QUERY reply: stable id and capacity.

    ``expert_memory_bytes`` is the budget for experts (after the shared tensors); None
    = every expert fits. Speeds and reliability are optional declarations the server
    uses until it has measured the node.
    """

    client_id: str
    expert_memory_bytes: float | None = None
    samples_per_s: float | None = None
    uplink_Bps: float | None = None
    downlink_Bps: float | None = None
    reliability: float | None = None
    tier: str | None = None
    num_examples: int | None = None

    def encode(self) -> ConfigRecord:
        out = {k: v for k, v in zip(_PROFILE_KEYS, (getattr(self, f.name) for f in fields(self))) if v is not None}
        return ConfigRecord(out)

    @classmethod
    def decode(cls, record) -> "NodeProfile":
        """Inverse of :meth:`encode`; ProtocolError names a missing id or a bad value."""
        if CLIENT_ID not in record or str(record[CLIENT_ID]) == "":
            raise ProtocolError("profile lacks 'client-id'")
        values: dict = {"client_id": str(record[CLIENT_ID])}
        for f, key in zip(fields(cls), _PROFILE_KEYS):
            if f.name == "client_id" or key not in record:
                continue
            v = record[key]
            if f.name == "tier":
                values["tier"] = str(v)
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)) or float(v) < 0:
                raise ProtocolError(f"profile {key!r} must be a finite number >= 0, got {v!r}")
            values[f.name] = int(v) if f.name == "num_examples" else float(v)
        if values.get("reliability") is not None and values["reliability"] > 1:
            raise ProtocolError(f"profile 'reliability' must be in [0, 1], got {values['reliability']}")
        return cls(**values)


_PROFILE_KEYS = (CLIENT_ID, EXPERT_MEMORY, SAMPLES_PER_S, UPLINK, DOWNLINK, RELIABILITY, TIER, NUM_EXAMPLES)
"""Wire keys of :class:`NodeProfile`'s fields, in field order."""


def decode_probe(content: RecordDict, num_experts: int) -> tuple[NodeProfile, np.ndarray | None, np.ndarray | None]:
    """A QUERY reply: the profile, and the routing histogram and gate share if probed."""
    if PROFILE not in content:
        raise ProtocolError("QUERY reply lacks the 'profile' record")
    profile = NodeProfile.decode(content[PROFILE])
    if REPORT not in content:
        return profile, None, None
    rep = content[REPORT]
    return profile, decode_vector(rep.get(HIST, []), num_experts), decode_vector(rep.get(GATE_SHARE, []), num_experts)


def decode_probe_time(content: RecordDict) -> float:
    """Seconds a probed node took to answer (0 when it does not say); raises on a bad value."""
    value = content[REPORT].get(PROBE_TIME, 0.0) if REPORT in content else 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ProtocolError(f"{PROBE_TIME} must be a finite number >= 0, got {value!r:.40}")
    return float(value)
