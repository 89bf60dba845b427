"""Faulty nodes, end to end: Flower's ``Strategy.start`` over an in-process grid.

A :class:`FaultyClientApp` wraps the real ClientApp and breaks the TRAIN replies of chosen
nodes in chosen rounds: it raises, replies with an error, never answers (the grid's
timeout), or sends a malformed or oversized update. Each fault must be counted (dropped
or rejected, with its reason in ``strategy.last``/metrics) while the round aggregates the
others; a round where every node fails keeps the global model and the run goes on.
Nodes joining and leaving between rounds are picked up by the next round.
(tests/test_strategy.py corrupts replies at the ``aggregate_train`` level; this file
drives whole runs.)
"""

from __future__ import annotations

import re
import threading
import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict

from fedmoe_flwr import protocol as P
from fedmoe_flwr.client.app import make_client_app
from fedmoe_flwr.config import Config, TierConfig, flatten
from fedmoe_flwr.deployment_grid import DeploymentGrid
from fedmoe_flwr.experiment import build, experiment_for
from fedmoe_flwr.models.slicing import to_array_record
from fedmoe_flwr.server_app import build_strategy
from fedmoe_flwr.sim import LocalGrid

NUM_NODES = 5
NORM_BOUND = 1e3


def fault_config() -> Config:
    cfg = Config()
    cfg.dataset.num_clients = NUM_NODES
    cfg.model.num_experts = 4
    cfg.model.d_model = cfg.model.d_hidden = 32
    cfg.strategy.name = "aligned"
    cfg.strategy.fraction_train = 1.0  # every node trains every round
    cfg.strategy.pace_margin = 0.0
    cfg.strategy.norm_bound = NORM_BOUND
    cfg.strategy.trust_samples = 0  # these tests count exact aggregations; the trust check has tests/test_trust.py
    cfg.fleet.deadline_s = None
    cfg.fleet.jitter = 0.0
    # every device holds 2 of the 4 experts, so an update can carry an expert it was not sent
    cfg.fleet.tiers = [TierConfig(name="two", fraction=1.0, max_experts=2, reliability=1.0)]
    cfg.train.local_epochs = 1
    return cfg


class FaultyClientApp:
    """The real ClientApp, with TRAIN replies broken as ``faults[(partition, round)]`` says.

    ``faults`` maps ``(partition id, round)`` (round ``None`` = every round) to a kind.
    Calls into the real app hold a lock (the per-process model skeleton is shared), so a
    threaded grid may call this concurrently; a hanging node waits outside the lock until
    :meth:`release` (or 60 s).
    """

    def __init__(self, app, faults: dict):
        self.app = app
        self.faults = dict(faults)
        self.lock = threading.Lock()
        self.released = threading.Event()
        self.calls: list[tuple[int, str, int]] = []

    def release(self) -> None:
        self.released.set()

    def __call__(self, msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        rnd = int(msg.content[P.CONFIG].get("server-round", 0)) if P.CONFIG in msg.content else 0
        self.calls.append((pid, str(msg.metadata.message_type), rnd))
        kind = self.faults.get((pid, rnd), self.faults.get((pid, None)))
        if msg.metadata.message_type != "train" or kind is None:
            with self.lock:
                return self.app(msg, context)
        if kind == "raise":
            raise RuntimeError("injected failure")
        if kind == "error":
            return Message(Error(code=1, reason="injected error"), reply_to=msg)
        if kind == "hang":
            self.released.wait(60)
            return Message(Error(code=1, reason="released after the test"), reply_to=msg)
        with self.lock:
            reply = self.app(msg, context)
        return corrupt(reply, kind, msg)


def corrupt(reply: Message, kind: str, sent: Message) -> Message:
    """A malformed (bad keys, shape, NaN, report) or oversized (more tensors or bytes, norm) update."""
    arrs = {n: a.numpy().copy() for n, a in reply.content[P.ARRAYS].items()}
    expert_names = [n for n in arrs if ".experts." in n]
    name = expert_names[0]
    if kind == "nan":
        arrs[name][...] = np.nan
    elif kind == "bad-key":
        arrs["not." + name] = arrs.pop(name)
    elif kind == "bad-shape":
        arrs[name] = arrs[name][..., :1]
    elif kind == "more-bytes":
        arrs[name] = np.concatenate([arrs[name], arrs[name]], axis=0)
    elif kind == "extra-expert":
        sent_keys = set(sent.content[P.CONFIG]["experts"])
        held = {n.split(".experts.")[1].split(".")[0] for n in expert_names}
        other = next(e for e in range(4) if f"L0.E{e}" not in sent_keys)
        assert str(other) not in held
        for n in expert_names:  # a copy of a held expert's tensors under an unassigned expert's names
            idx = n.split(".experts.")[1].split(".")[0]
            arrs[n.replace(f".experts.{idx}.", f".experts.{other}.")] = arrs[n].copy()
    elif kind == "norm":
        arrs[name] = arrs[name] + np.float32(10 * NORM_BOUND)
    elif kind == "report":
        reply.content[P.REPORT][P.TOKENS] = [1.0]  # per-expert vector of the wrong length
    else:
        raise ValueError(kind)
    reply.content[P.ARRAYS] = ArrayRecord({n: Array(np.ascontiguousarray(a)) for n, a in arrs.items()})
    return reply


class ThreadedGrid(LocalGrid):
    """A LocalGrid whose ``send_and_receive`` honours ``timeout``: each node answers in its
    own thread and replies that are not there after ``timeout`` seconds are missing, as
    with Flower's grids."""

    timeouts: list

    def send_and_receive(self, messages, *, timeout=None):
        self.timeouts = getattr(self, "timeouts", []) + [timeout]
        slots: dict[int, Message] = {}
        threads = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{self.messages_sent}"
            msg.metadata.__dict__["_run_id"] = self.run.run_id
            self.messages_sent += 1

            def deliver(i=i, msg=msg):
                slots[i] = self._deliver(msg)

            t = threading.Thread(target=deliver, daemon=True)
            t.start()
            threads.append(t)
        end = time.monotonic() + (timeout if timeout is not None else 1e9)
        for t in threads:
            t.join(max(0.0, end - time.monotonic()))
        return [slots[i] for i in sorted(slots)]


class ElasticGrid(LocalGrid):
    """A LocalGrid that nodes can join (a new Flower node id for a given partition)."""

    def add_node(self, node_id: int, partition_id: int) -> None:
        self._contexts[node_id] = Context(
            run_id=1, node_id=node_id, node_config={"partition-id": partition_id, "num-partitions": NUM_NODES},
            state=RecordDict(), run_config={},
        )


def run_rounds(grid, cfg: Config, rounds: int, between=None, strategy=None):
    """``strategy.start`` for ``rounds`` rounds; per round: arrays, metrics, dropped, rejected."""
    cfg, data, _, layout = experiment_for(cfg)
    strategy = strategy or build_strategy(cfg, layout)
    initial = to_array_record(build(cfg, data).state_dict())
    log = []

    def evaluate_fn(rnd, arrays):
        last = strategy.last
        log.append({
            "round": rnd,
            "arrays": {n: a.numpy().copy() for n, a in arrays.items()},
            "metrics": dict(last.metrics) if rnd else {},
            "dropped": dict(last.dropped) if rnd else {},
            "rejected": dict(last.rejected) if rnd else {},
            "assignment": dict(last.assignment) if rnd else {},
        })
        if between is not None and rnd:
            between(rnd, strategy)
        return None

    strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds, timeout=3600,
                   train_config=ConfigRecord(), evaluate_fn=evaluate_fn)
    return strategy, log


def changed(a: dict, b: dict) -> bool:
    return any(not np.array_equal(a[n], b[n]) for n in a)


EXPECTED = {
    "raise": ("dropped", r"RuntimeError: injected failure"),
    "error": ("dropped", r"injected error"),
    "nan": ("rejected", r"non-finite values \(NaN\)"),
    "bad-key": ("rejected", r"missing tensor"),
    "bad-shape": ("rejected", r"shape mismatch"),
    "more-bytes": ("rejected", r"shape mismatch"),
    "extra-expert": ("rejected", r"unexpected tensor .*experts\.\d"),
    "norm": ("rejected", r"delta norm .* > bound"),
    "report": ("rejected", r"per-expert vector has length 1, expected 4"),
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_a_faulty_node_is_counted_with_its_reason_and_the_others_aggregate(kind):
    cfg = fault_config()
    app = FaultyClientApp(make_client_app(flatten(cfg)), {(1, None): kind})
    grid = LocalGrid(app, NUM_NODES, seed=cfg.seed)
    strategy, log = run_rounds(grid, cfg, rounds=2)
    where, pattern = EXPECTED[kind]
    other = "rejected" if where == "dropped" else "dropped"
    for prev, row in zip(log, log[1:]):
        m = row["metrics"]
        assert m["num_sent"] == NUM_NODES
        assert m["num_aggregated"] == NUM_NODES - 1
        assert m[f"num_{where}"] == 1 and m[f"num_{other}"] == 0
        assert list(row[where]) == ["1"], "the faulty node (client id '1') and no other"
        assert re.search(pattern, row[where]["1"]), row[where]["1"]
        assert all(np.isfinite(a).all() for a in row["arrays"].values())
        assert changed(prev["arrays"], row["arrays"]), "the other nodes' updates were aggregated"


def test_a_node_that_never_answers_times_out_and_the_round_goes_on():
    cfg = fault_config()
    app = FaultyClientApp(make_client_app(flatten(cfg)), {(2, None): "hang"})
    inner = ThreadedGrid(app, NUM_NODES, seed=cfg.seed)
    grid = DeploymentGrid(inner, round_timeout=2.0)  # what the ServerApp's `round-timeout` does
    try:
        strategy, log = run_rounds(grid, cfg, rounds=2)
    finally:
        app.release()
    assert inner.timeouts and all(t == 2.0 for t in inner.timeouts), "the strategy's 3600 s were capped"
    for prev, row in zip(log, log[1:]):
        assert row["dropped"] == {"2": "no reply (timeout)"}
        assert row["metrics"]["num_aggregated"] == NUM_NODES - 1
        assert changed(prev["arrays"], row["arrays"])
    assert strategy.state.profiles["2"].rounds_completed == 0
    assert strategy.state.profiles["2"].reliability < 1.0


def test_a_round_where_every_node_fails_keeps_the_model_and_the_run_continues():
    cfg = fault_config()
    faults = {(pid, 2): kind for pid, kind in zip(range(NUM_NODES), ["raise", "error", "nan", "norm", "raise"])}
    app = FaultyClientApp(make_client_app(flatten(cfg)), faults)
    grid = LocalGrid(app, NUM_NODES, seed=cfg.seed)
    _, log = run_rounds(grid, cfg, rounds=3)
    r1, r2, r3 = log[1:]
    assert r2["metrics"]["num_aggregated"] == 0
    assert r2["metrics"]["num_dropped"] == 3 and r2["metrics"]["num_rejected"] == 2
    assert not changed(r1["arrays"], r2["arrays"]), "nothing to aggregate: the global model is kept"
    assert r3["metrics"]["num_aggregated"] == NUM_NODES
    assert changed(r2["arrays"], r3["arrays"]), "the next round trains again"


def test_nodes_leaving_and_joining_between_rounds():
    cfg = fault_config()
    app = FaultyClientApp(make_client_app(flatten(cfg)), {})
    grid = ElasticGrid(app, NUM_NODES, seed=cfg.seed)
    by_partition = {int(grid.node_context(n).node_config["partition-id"]): n for n in grid.get_node_ids()}

    def between(rnd, strategy):
        if rnd == 1:  # partitions 3 and 4 leave
            grid.remove_node(by_partition[3])
            grid.remove_node(by_partition[4])
        if rnd == 2:  # partition 3 comes back under a new Flower node id
            grid.add_node(123456789, partition_id=3)

    strategy, log = run_rounds(grid, cfg, rounds=3, between=between)
    r1, r2, r3 = log[1:]
    assert sorted(r1["assignment"]) == ["0", "1", "2", "3", "4"]
    assert sorted(r2["assignment"]) == ["0", "1", "2"], "the strategy reads the grid's nodes every round"
    assert r2["dropped"] == {} and r2["metrics"]["num_aggregated"] == 3
    assert sorted(r3["assignment"]) == ["0", "1", "2", "3"]
    assert r3["metrics"]["num_aggregated"] == 4
    # the returning node was asked for its profile and kept its stable client id and history
    assert strategy.node_clients[123456789] == "3"
    assert list(strategy.state.client_index).count("3") == 1
    assert strategy.state.profiles["3"].rounds_completed == 2
    queried = [c for c in app.calls if c[1] == "query"]
    assert len(queried) == NUM_NODES + 1
