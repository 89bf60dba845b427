"""Federated (personalised) evaluation replies: one aggregation for every strategy."""

from __future__ import annotations

import math
from collections.abc import Callable
from logging import WARNING

import numpy as np
from flwr.app import Message, MetricRecord
from flwr.common.logger import log

from fedmoe_flwr import protocol as P


def _usable(msg: Message) -> str | None:
    """Why an EVALUATE reply cannot be counted, or None."""
    if msg.has_error():
        return (msg.error.reason or "error").splitlines()[0][:200]
    if P.METRICS not in msg.content or not isinstance(msg.content[P.METRICS], MetricRecord):
        return "reply lacks the 'metrics' record"
    n = msg.content[P.METRICS].get(P.NUM_EXAMPLES)
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(float(n)) or float(n) <= 0:
        return f"num-examples must be a finite number > 0, got {n!r}"
    return None


def personal_metrics(replies: list[Message], aggr_fn: Callable | None = None) -> tuple[MetricRecord | None, dict]:
    """``(record, server figures)`` of one evaluation round.

    ``record`` is the weighted mean (by ``num-examples``, as Flower's FedAvg) of every
    scalar all usable replies report, prefixed ``personal_`` (``accuracy`` ->
    ``personal_accuracy``), or ``aggr_fn(contents, "num-examples")`` when given; None if no
    reply is usable. The server figures count the clients and the failed replies, whose
    reasons are logged.
    """
    good, failed = [], 0
    for msg in replies:
        why = _usable(msg)
        if why is None:
            good.append(msg.content)
        else:
            failed += 1
            log(WARNING, "evaluation reply of node %s not counted: %s", msg.metadata.src_node_id, why)
    server = {"personal_clients": float(len(good)), "personal_failed": float(failed)}
    if not good:
        return None, server
    if aggr_fn is not None:
        return aggr_fn(good, P.NUM_EXAMPLES), server
    metrics = [P.scalars(c[P.METRICS]) for c in good]
    w = np.array([m[P.NUM_EXAMPLES] for m in metrics])
    keys = set.intersection(*(set(m) for m in metrics)) - {P.NUM_EXAMPLES}
    personal = {f"personal_{k}": float(np.average([m[k] for m in metrics], weights=w)) for k in sorted(keys)}
    server.update(personal)
    return MetricRecord({**personal, "personal_clients": float(len(good))}), server
