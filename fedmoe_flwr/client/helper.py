"""Make an existing Flower ClientApp expert-aware in a few lines.

Wrap your own PyTorch training function::

    from fedmoe_flwr.client import expert_train, node_profile

    @app.train()
    def train(msg, context):
        model = MyMoEModel()
        return expert_train(msg, model, lambda m: my_train(m, trainloader),
                            profile=node_profile(context, model), stats_inputs=x_sample)

:func:`expert_train` loads the shared parameters and the assigned experts into ``model``,
masks every other expert (their router logits become minus infinity), measures the routing
histogram on ``stats_inputs`` before training, runs ``train_fn(model)``, counts the tokens
each expert received through forward hooks, and replies with exactly the tensors it was sent.
``train_fn`` returns the number of training examples, or a dict with ``num-examples`` and
optionally ``train-loss`` and ``expert-loss`` (a per-expert-key vector).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedmoe_flwr import protocol as P
from fedmoe_flwr.client.local_update import routing_stats
from fedmoe_flwr.models.adapters import count_tokens, model_experts
from fedmoe_flwr.models.slicing import from_array_record, param_layout, state_nbytes, sub_state, to_array_record


def assigned_experts(msg: Message, model: torch.nn.Module) -> list[str]:
    """The expert keys a TRAIN/EVALUATE message assigns to this node.

    A message without an ``experts`` entry (e.g. from Flower's stock FedAvg) assigns all.
    """
    conf = msg.content[P.CONFIG] if P.CONFIG in msg.content else {}
    if "experts" not in conf:
        return param_layout(model).expert_keys
    return [str(k) for k in conf["experts"]]


def load_assigned(msg: Message, model: torch.nn.Module) -> tuple[list[str], int]:
    """Load the message's tensors into ``model`` and mask absent experts.

    Returns the assigned keys and the bytes received. Raises ValueError if the message holds
    tensors the model does not have or of the wrong shape.
    """
    keys = assigned_experts(msg, model)
    received = from_array_record(msg.content[P.ARRAYS])
    experts = model_experts(model)  # the model's adapter: names, loading, masking
    experts.load_wire(received)
    if experts.layers:
        experts.set_active(keys)
    return keys, state_nbytes(received)


def node_profile(context: Context, model: torch.nn.Module, **declared) -> dict:
    """The node's stable id and declared capacity from ``context.node_config``.

    Keys read: ``client-id`` (else ``partition-id``, else the Flower node id) and
    ``memory-mb`` (total memory for the model; the expert budget is that minus the shared
    tensors; absent = every expert fits). ``declared`` adds or overrides profile fields.
    """
    nc = dict(context.node_config)
    layout = param_layout(model)
    cid = nc.get("client-id", nc.get("partition-id", context.node_id))
    all_experts = sum(layout.expert_nbytes(k) for k in layout.expert_keys)
    if "memory-mb" in nc:
        budget = int(float(nc["memory-mb"]) * 2**20) - layout.shared_nbytes
    else:
        budget = all_experts
    profile = {P.CLIENT_ID: str(cid), P.EXPERT_MEMORY: max(int(budget), 0)}
    for key in (P.SAMPLES_PER_S, P.UPLINK, P.DOWNLINK, P.RELIABILITY):
        if key in nc:
            profile[key] = float(nc[key])
    profile.update(declared)
    return profile


def expert_train(
    msg: Message,
    model: torch.nn.Module,
    train_fn: Callable[[torch.nn.Module], int | dict],
    *,
    profile: dict,
    stats_inputs: np.ndarray | None = None,
    timings: Callable[[int, int, int, float], tuple[float, float, float]] | None = None,
) -> Message:
    """Train the assigned experts with ``train_fn`` and build the TRAIN reply.

    ``timings(bytes_down, bytes_up, num_examples, measured_train_s)`` may replace the
    measured ``(down, compute, up)`` seconds (the simulated fleet does).
    """
    keys, bytes_down = load_assigned(msg, model)
    layout = param_layout(model)
    k = len(layout.expert_keys)
    if stats_inputs is not None and k:
        hist, gate = routing_stats(model, stats_inputs)
    else:
        hist, gate = np.full(k, np.nan), np.full(k, np.nan)
    with count_tokens(model) as tokens:
        t0 = time.perf_counter()
        out = train_fn(model)
        train_s = time.perf_counter() - t0
        token_counts = tokens()
    out = {P.NUM_EXAMPLES: int(out)} if not isinstance(out, dict) else dict(out)
    sent = {n: t.detach().clone() for n, t in sub_state(model_experts(model).to_wire(), layout, keys).items()}
    bytes_up = state_nbytes(sent)
    down_s, train_s, up_s = (
        timings(bytes_down, bytes_up, int(out[P.NUM_EXAMPLES]), train_s) if timings else (0.0, train_s, 0.0)
    )
    report = MetricRecord(
        {
            P.NUM_EXAMPLES: int(out[P.NUM_EXAMPLES]),
            P.TRAIN_LOSS: P.encode_vector([out.get(P.TRAIN_LOSS, np.nan)])[0],
            P.TRAIN_TIME: float(train_s),
            P.DOWN_TIME: float(down_s),
            P.UP_TIME: float(up_s),
            P.BYTES_DOWN: int(bytes_down),
            P.BYTES_UP: int(bytes_up),
            P.HIST: P.encode_vector(hist),
            P.GATE_SHARE: P.encode_vector(gate),
            P.TOKENS: P.encode_vector(token_counts if len(token_counts) == k else np.zeros(k)),
            P.EXPERT_LOSS: P.encode_vector(out.get(P.EXPERT_LOSS, np.full(k, np.nan))),
        }
    )
    content = RecordDict({P.ARRAYS: to_array_record(sent), P.REPORT: report, P.PROFILE: ConfigRecord(profile)})
    return Message(content, reply_to=msg)


def expert_probe(msg: Message, model: torch.nn.Module, *, profile: dict, stats_inputs: np.ndarray | None) -> Message:
    """The QUERY reply: the node's profile and, if asked, its routing histogram."""
    content = RecordDict({P.PROFILE: ConfigRecord(profile)})
    if bool(msg.content[P.CONFIG].get("probe", False)) and stats_inputs is not None and P.ARRAYS in msg.content:
        experts = model_experts(model)
        experts.load_wire(from_array_record(msg.content[P.ARRAYS]))
        experts.set_active(None)
        hist, gate = routing_stats(model, stats_inputs)
        content[P.REPORT] = MetricRecord({P.HIST: P.encode_vector(hist), P.GATE_SHARE: P.encode_vector(gate)})
    return Message(content, reply_to=msg)
