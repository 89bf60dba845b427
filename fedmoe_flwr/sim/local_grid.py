"""A Flower ``Grid`` that runs a ClientApp in this process (or a pool of forked workers).

Flower's Ray simulation costs 10-20 s to start and ~1 GiB; tests, benchmarks and sweeps of
many short runs use this grid instead. It is only a transport: the round loop is still the
strategy's ``start()``, the nodes are still ``ClientApp`` calls with their own ``Context``
(``node_config`` with ``partition-id`` and ``num-partitions``, like Flower's simulation),
and a ClientApp that raises becomes an error reply, as in Flower.

By default messages are delivered one after another. ``workers=N`` (N > 1) delivers each
batch of messages on ``N`` forked worker processes (:mod:`fedmoe_flwr.sim.workers`): the
ClientApp and everything the parent loaded are inherited, each message and its node's
``Context`` travel pickled and come back with the reply. Every random draw of a ClientApp
call derives from ``(seed, round, client)`` and runs single-threaded, so the replies, and
the whole run, are bit-identical to the sequential grid's.
"""

from __future__ import annotations

from collections.abc import Iterable
from uuid import uuid4

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedmoe_flwr.sim.workers import CLIENT_APP_RAISED, WorkerPool, call_client_app, not_connected

__all__ = ["CLIENT_APP_RAISED", "LocalGrid"]


class LocalGrid(Grid):
    """Grid over ``num_nodes`` in-process nodes running ``client_app``.

    Node ids are random 63-bit integers drawn from ``seed`` (Flower's are random too, so
    code must never rely on their order or value). ``run_config`` is given to every node.
    ``workers`` > 1 runs the ClientApp calls of a batch on that many worker processes
    (module doc); :meth:`close` (or ``with LocalGrid(...)``) stops them.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, *, seed: int = 0, run_config: dict | None = None,
                 workers: int = 1):
        if int(workers) < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.client_app = client_app
        self.workers = int(workers)
        self._pool: WorkerPool | None = None
        rng = np.random.default_rng(seed)
        ids = rng.choice(2**62, size=num_nodes, replace=False) + 1
        self._contexts: dict[int, Context] = {
            int(nid): Context(
                run_id=1,
                node_id=int(nid),
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for i, nid in enumerate(ids)
        }
        self._run = Run.create_empty(run_id=1)
        # Messages take their run and source from the process's task identity, which
        # Flower's runtimes set for the ServerApp process; this grid plays that runtime.
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = self._run.run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        self._replies: dict[str, Message] = {}
        self.messages_sent = 0

    # -- node membership (tests may add or remove nodes between rounds) --------------------
    def node_context(self, node_id: int) -> Context:
        return self._contexts[node_id]

    def remove_node(self, node_id: int) -> None:
        self._contexts.pop(node_id)

    # -- Grid API ---------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = []
        for msg in messages:
            mid = str(uuid4())
            msg.metadata.__dict__["_message_id"] = mid
            msg.metadata.__dict__["_run_id"] = self._run.run_id
            ids.append(mid)
        if self.workers > 1 and len(messages) > 1:
            replies = self._deliver_parallel(messages)
        else:
            replies = [self._deliver(msg) for msg in messages]
        self._replies.update(zip(ids, replies))
        self.messages_sent += len(messages)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(m) for m in message_ids if m in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(self.push_messages(messages)))

    def _deliver(self, msg: Message) -> Message:
        node_id = msg.metadata.dst_node_id
        if node_id not in self._contexts:
            return not_connected(msg)
        return call_client_app(self.client_app, msg, self._contexts[node_id])

    def _deliver_parallel(self, messages: list[Message]) -> list[Message]:
        """The batch on the worker pool; each node's Context comes back with its reply."""
        if self._pool is None:
            self._pool = WorkerPool(self.client_app, self.workers)
        jobs = [(m, self._contexts.get(m.metadata.dst_node_id)) for m in messages]
        replies = []
        for msg, (reply, context) in zip(messages, self._pool.map(jobs)):
            if context is not None:  # the node's state (context.state) as the ClientApp left it
                self._contexts[msg.metadata.dst_node_id] = context
            replies.append(reply)
        return replies

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the worker processes (a later parallel batch starts new ones)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> "LocalGrid":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

