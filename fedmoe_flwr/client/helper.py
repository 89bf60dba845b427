"""Make an existing Flower ClientApp expert-aware in a few lines.

Wrap your own PyTorch training and evaluation functions and answer the strategy's QUERY::

    from fedmoe_flwr.client import expert_evaluate, expert_probe, expert_train, node_profile

    @app.train()
    def train(msg, context):
        return expert_train(msg, MyMoEModel(), lambda m: my_train(m, trainloader), stats_inputs=x_sample)

    @app.evaluate()
    def evaluate(msg, context):
        return expert_evaluate(msg, MyMoEModel(), lambda m: my_test(m, valloader))

    @app.query()
    def query(msg, context):
        model = MyMoEModel()
        return expert_probe(msg, model, profile=node_profile(context, model), stats_inputs=x_sample)

:func:`expert_train` loads the shared parameters and the assigned experts into ``model``,
masks every other expert (their router logits become minus infinity), measures the routing
histogram on ``stats_inputs`` before training, runs ``train_fn(model)``, counts the tokens
each expert received through forward hooks, and replies with exactly the tensors it was sent.
``train_fn`` may return a float loss, a ``(loss, num_examples)`` pair, an int (the number of
examples) or a dict with ``num-examples``, ``train-loss``, ``expert-loss`` (a per-expert-key
vector) and your own scalars; without a number of examples, the samples it passed through
the model count.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import torch
from flwr.app import Context, Message, MetricRecord, RecordDict

from fedmoe_flwr import core
from fedmoe_flwr import protocol as P
from fedmoe_flwr.client.local_update import routing_stats
from fedmoe_flwr.models.adapters import count_tokens, model_experts
from fedmoe_flwr.models.slicing import from_array_record, param_layout, sub_state, to_array_record


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
    return keys, P.record_nbytes(msg.content[P.ARRAYS])


CAPACITY_KEYS = ("max-experts", "memory-mb")
"""``node_config`` keys that declare a node's expert budget (either one)."""


def node_profile(context: Context, model: torch.nn.Module, *,
                 capacity_fn: Callable[[Context], dict | int] | None = None, **declared) -> P.NodeProfile:
    """The node's stable id and declared capacity, from ``context.node_config``.

    Keys read (docs/architecture.md#capacity): ``client-id`` (else ``partition-id``, else
    the Flower node id); the expert budget as ``max-experts`` (a count of the model's
    largest experts) or ``memory-mb`` (total MiB for the model; the budget is that minus the
    shared tensors); absent = every expert fits; optional ``samples-per-s``, ``uplink-Bps``,
    ``downlink-Bps``, ``reliability``, ``num-examples``. ``capacity_fn(context)`` returns the
    same keys (or an int: a number of experts) for nodes whose ``node_config`` lacks them (in
    simulation Flower gives only ``partition-id``):
    ``capacity_fn=lambda ctx: {"max-experts": 1 + ctx.node_config["partition-id"] % 4}``.
    A node that declares its own budget (either key) keeps it whole: ``capacity_fn``'s
    budget is ignored there. ``declared`` overrides any field of
    :class:`~fedmoe_flwr.protocol.NodeProfile` by name.
    """
    own = dict(context.node_config)
    fallback = capacity_fn(context) if capacity_fn is not None else {}
    if isinstance(fallback, int) and not isinstance(fallback, bool):
        fallback = {"max-experts": fallback}
    if not isinstance(fallback, dict):
        raise TypeError(f"capacity_fn returned a {type(fallback).__name__}; expected a dict of node_config keys or an int")
    if any(k in own for k in CAPACITY_KEYS):  # the node's own declaration wins as a whole
        fallback = {k: v for k, v in fallback.items() if k not in CAPACITY_KEYS}
    nc = {**fallback, **own}
    layout = param_layout(model)
    cid = nc.get("client-id", nc.get("partition-id", context.node_id))
    largest = max((layout.expert_nbytes(k) for k in layout.expert_keys), default=0)
    if "max-experts" in nc:
        budget = int(nc["max-experts"]) * largest
    elif "memory-mb" in nc:
        budget = int(float(nc["memory-mb"]) * 2**20) - layout.shared_nbytes
    else:
        budget = sum(layout.expert_nbytes(k) for k in layout.expert_keys)
    keys = {"samples_per_s": P.SAMPLES_PER_S, "uplink_Bps": P.UPLINK, "downlink_Bps": P.DOWNLINK,
            "reliability": P.RELIABILITY}
    fields = {f: float(nc[k]) for f, k in keys.items() if k in nc}
    if P.NUM_EXAMPLES in nc:
        fields["num_examples"] = int(nc[P.NUM_EXAMPLES])
    return replace(P.NodeProfile(client_id=str(cid), expert_memory_bytes=max(int(budget), 0), **fields), **declared)


def _train_result(out, counted: int) -> dict:
    """A train function's return as ``{num-examples, train-loss, expert-loss?, metrics}``.

    Accepted: a float loss, a dict (``num-examples``, ``train-loss``, ``expert-loss`` and any
    other scalars, which travel as the user's metrics), a ``(loss, num_examples)`` pair, or
    an int (the number of examples). ``counted`` (samples the model saw in training) stands in
    for a missing number of examples.
    """
    if isinstance(out, bool) or out is None:
        raise TypeError(f"train_fn returned {out!r}; expected a float loss, a dict, a (loss, n) pair or an int")
    if _is_int(out):
        return {P.NUM_EXAMPLES: int(out), P.TRAIN_LOSS: math.nan, "metrics": {}}
    if _is_scalar(out) or (isinstance(out, torch.Tensor) and out.numel() == 1):
        return {P.NUM_EXAMPLES: counted, P.TRAIN_LOSS: float(out), "metrics": {}}
    if isinstance(out, tuple) and len(out) == 2:
        return {P.NUM_EXAMPLES: int(out[1]), P.TRAIN_LOSS: float(out[0]), "metrics": {}}
    if isinstance(out, dict):
        own = {P.NUM_EXAMPLES, P.TRAIN_LOSS, P.EXPERT_LOSS}
        metrics = {k: float(v) for k, v in out.items() if k not in own and isinstance(v, (int, float)) and not isinstance(v, bool)}
        return {P.NUM_EXAMPLES: int(out.get(P.NUM_EXAMPLES, counted)), P.TRAIN_LOSS: float(out.get(P.TRAIN_LOSS, math.nan)),
                P.EXPERT_LOSS: out.get(P.EXPERT_LOSS), "metrics": metrics}
    raise TypeError(f"train_fn returned a {type(out).__name__}; expected a float loss, a dict, a (loss, n) pair or an int")


@contextmanager
def count_samples(model: torch.nn.Module, *, training: bool | None = True):
    """Count the samples (first dimension of the first input) of the model's forwards:
    training-mode ones (``training=True``), eval-mode ones (False) or all (None)."""
    seen = [0]

    def hook(module, args, _out):
        if training is not None and module.training != training:
            return
        if args and hasattr(args[0], "shape") and len(args[0].shape):
            seen[0] += int(args[0].shape[0])

    handle = model.register_forward_hook(hook)
    try:
        yield lambda: seen[0]
    finally:
        handle.remove()


def expert_train(
    msg: Message,
    model: torch.nn.Module,
    train_fn: Callable[[torch.nn.Module], float | int | dict | tuple],
    *,
    stats_inputs: np.ndarray | None = None,
    timings: Callable[[int, int, int, float], tuple[float, float, float]] | None = None,
    profile=None,
) -> Message:
    """Train the assigned experts with ``train_fn`` and build the TRAIN reply.

    ``train_fn(model)`` may return a float loss, a ``(loss, num_examples)`` pair, an int (the
    number of examples) or a dict (see :func:`_train_result`; extra scalars travel as your
    metrics and reach the strategy's aggregated train metrics). ``timings(bytes_down,
    bytes_up, num_examples, measured_train_s)`` may replace the measured ``(down, compute,
    up)`` seconds (the simulated fleet does). ``profile`` is accepted for compatibility and
    unused: a node's profile travels in its QUERY reply.
    """
    del profile
    keys, bytes_down = load_assigned(msg, model)
    layout = param_layout(model)
    k = len(layout.expert_keys)
    if stats_inputs is not None and k:
        hist, gate = routing_stats(model, stats_inputs)
    else:
        hist, gate = np.full(k, np.nan), np.full(k, np.nan)
    with count_tokens(model) as tokens, count_samples(model) as samples:
        t0 = time.perf_counter()
        raw = train_fn(model)
        train_s = time.perf_counter() - t0
        token_counts = tokens()
        out = _train_result(raw, samples())
    if out[P.NUM_EXAMPLES] <= 0:
        raise ValueError(f"train_fn trained on {out[P.NUM_EXAMPLES]} examples; nothing to send")
    wire = sub_state(model_experts(model).to_wire(), layout, keys)
    sent = to_array_record({n: t.detach().clone() for n, t in wire.items()})
    down_s, train_s, up_s = (
        timings(bytes_down, P.record_nbytes(sent), out[P.NUM_EXAMPLES], train_s) if timings else (0.0, train_s, 0.0)
    )
    expert_loss = out.get(P.EXPERT_LOSS)
    report = core.ClientReport(
        num_examples=out[P.NUM_EXAMPLES], train_loss=out[P.TRAIN_LOSS], down_s=down_s, train_s=train_s, up_s=up_s,
        hist=hist, gate=gate, tokens=token_counts if len(token_counts) == k else np.zeros(k),
        expert_loss=np.full(k, np.nan) if expert_loss is None else np.asarray(expert_loss, dtype=np.float64),
        metrics=out["metrics"],
    )
    content = RecordDict({P.ARRAYS: sent, P.REPORT: P.encode_report(report)})
    return Message(content, reply_to=msg)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_scalar(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _eval_result(out) -> tuple[int | None, dict]:
    """An evaluate function's return as ``(num_examples or None, scalars)``.

    Accepted: a float loss; ``(loss, accuracy)`` with a float accuracy (what Flower's
    PyTorch template's ``test`` returns); ``(loss, n)`` with an int ``n``; ``(loss, n,
    metrics)``; a dict of scalars with optional ``num-examples``. Anything else raises
    TypeError: a wrong guess would weight or label the metrics wrongly without a sound.
    """
    if isinstance(out, torch.Tensor) and out.numel() == 1:
        out = float(out)
    if _is_scalar(out):
        return None, {"loss": float(out)}
    if isinstance(out, tuple) and len(out) in (2, 3) and all(_is_scalar(v) for v in out[:2]):
        loss, second = out[0], out[1]
        extra = out[2] if len(out) == 3 else {}
        if not isinstance(extra, dict):
            raise TypeError(f"eval_fn returned (loss, n, {type(extra).__name__}); the third item must be a dict of metrics")
        extra = {k: float(v) for k, v in extra.items() if _is_scalar(v)}
        if _is_int(second):
            return int(second), {"loss": float(loss), **extra}
        if len(out) == 2:
            return None, {"loss": float(loss), "accuracy": float(second)}
    if isinstance(out, dict):
        scalars = {k: float(v) for k, v in out.items() if _is_scalar(v)}
        n = scalars.pop(P.NUM_EXAMPLES, None)
        return (None if n is None else int(n)), scalars
    raise TypeError(f"eval_fn returned {out!r:.80}; expected a float loss, (loss, accuracy), (loss, n[, metrics]) "
                    "with an int n, or a dict of scalars")


@torch.no_grad()
def expert_evaluate(msg: Message, model: torch.nn.Module, eval_fn: Callable[[torch.nn.Module], float | tuple | dict],
                    *, num_examples: int | None = None) -> Message:
    """Evaluate the sub-model an EVALUATE message assigns (absent experts masked) with your
    own ``eval_fn(model)`` and build the reply (``metrics``: ``num-examples`` and the scalars).

    ``eval_fn`` may return what :func:`_eval_result` accepts (a stock ``test`` returning
    ``(loss, accuracy)`` works unchanged). The number of examples is the one returned, else
    ``num_examples``, else the samples ``eval_fn`` passed through the model.
    """
    load_assigned(msg, model)
    with count_samples(model, training=None) as samples:
        raw = eval_fn(model)
        counted = samples()
    n, scalars = _eval_result(raw)
    n = n if n is not None else (num_examples if num_examples is not None else counted)
    if n is None or n <= 0:
        raise ValueError("expert_evaluate: eval_fn ran no samples through the model; return (loss, n) or pass num_examples=")
    return Message(RecordDict({P.METRICS: MetricRecord({P.NUM_EXAMPLES: int(n), **scalars})}), reply_to=msg)


def expert_probe(msg: Message, model: torch.nn.Module, *, profile: P.NodeProfile, stats_inputs: np.ndarray | None,
                 timings: Callable[[int, int, int, float], tuple[float, float, float]] | None = None) -> Message:
    """The QUERY reply: the node's profile and, if asked, its routing histogram.

    With ``zero-experts`` in the QUERY config every expert's output is zero while routing, so
    the histogram depends only on the tensors sent (not on expert weights this process last
    held). ``timings(bytes_down, bytes_up, samples, measured_s)`` (as for
    :func:`expert_train`) adds the seconds the probe took to the reply.
    """
    content = RecordDict({P.PROFILE: profile.encode()})
    conf = msg.content[P.CONFIG]
    if bool(conf.get(P.PROBE, False)) and stats_inputs is not None and P.ARRAYS in msg.content:
        t0 = time.perf_counter()
        experts = model_experts(model)
        experts.load_wire(from_array_record(msg.content[P.ARRAYS]))
        if bool(conf.get(P.ZERO_EXPERTS, False)):
            shapes = experts.wire_shapes()
            experts.load_wire({n: torch.zeros(shapes[n][0], dtype=shapes[n][1])
                               for names in experts.layout().expert_params.values() for n in names})
        experts.set_active(None)
        hist, gate = routing_stats(model, stats_inputs)
        report = {P.HIST: P.encode_vector(hist), P.GATE_SHARE: P.encode_vector(gate)}
        if timings is not None:
            down, compute, up = timings(P.record_nbytes(msg.content[P.ARRAYS]), 0, len(stats_inputs), time.perf_counter() - t0)
            report[P.PROBE_TIME] = float(down + compute + up)
        content[P.REPORT] = MetricRecord(report)
    return Message(content, reply_to=msg)
