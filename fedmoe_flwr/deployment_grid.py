"""The ServerApp's view of a deployment grid: a round timeout and a log of what nodes got.

:class:`DeploymentGrid` wraps the ``Grid`` Flower hands the ServerApp and changes two
things, both useful on real SuperNodes and harmless in simulation:

- ``round_timeout``: an upper bound on how long one ``send_and_receive`` waits for
  replies. A SuperNode that died or hangs then costs one timeout, not an hour; its missing
  reply is counted as dropped by the strategy ("no reply (timeout)").
- ``log_path``: one JSON line per message sent and per reply received (``messages.jsonl``):
  round, message type, node id, the stable client id and the declared expert budget the
  node reported, the experts it was sent and their bytes. What a node *received* can then
  be checked against what it *declared*, independently of the strategy's bookkeeping.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from fedmoe_flwr import protocol as P


class DeploymentGrid(Grid):
    """Delegates to ``grid``; caps reply timeouts and logs messages (see module doc).

    Args:
        grid: the Grid the ServerApp was given.
        round_timeout: seconds; a larger (or missing) timeout of a ``send_and_receive``
            is lowered to it. None = leave timeouts as the strategy asks.
        log_path: JSON-lines file to append to; None = no log.
        layout: the model's :class:`~fedmoe_flwr.layout.ParamLayout`, to log expert bytes.
    """

    def __init__(self, grid: Grid, *, round_timeout: float | None = None, log_path: str | Path | None = None, layout=None):
        self.grid = grid
        self.round_timeout = round_timeout
        self.log_path = Path(log_path) if log_path is not None else None
        self.layout = layout
        self.clients: dict[int, dict] = {}  # node id -> {"client": ..., "declared_expert_bytes": ...}
        self.node_counts: list[int] = []  # len(get_node_ids()) at each call
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log_path.unlink(missing_ok=True)

    # -- pure delegation ---------------------------------------------------------------------
    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        ids = list(self.grid.get_node_ids())
        self.node_counts.append(len(ids))
        self._write({"event": "nodes", "count": len(ids)})
        return ids

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for m in messages:
            self._log_sent(m)
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        for r in replies:
            self._log_reply(r)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        if self.round_timeout is not None:
            timeout = self.round_timeout if timeout is None else min(timeout, self.round_timeout)
        messages = list(messages)
        rounds = [self._log_sent(m) for m in messages]
        t0 = time.perf_counter()
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for r in replies:
            self._log_reply(r, max(rounds, default=0))
        if len(replies) < len(messages):
            self._write({"event": "missing", "count": len(messages) - len(replies), "waited_s": time.perf_counter() - t0})
        return replies

    # -- log ---------------------------------------------------------------------------------
    def _write(self, row: dict) -> None:
        if self.log_path is None:
            return
        row["time"] = time.time()
        with self.log_path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")

    def _log_sent(self, m: Message) -> int:
        c = m.content
        conf = c[P.CONFIG] if P.CONFIG in c.config_records else {}
        experts = [str(k) for k in conf.get("experts", [])] if "experts" in conf else None
        arrays = c[P.ARRAYS] if P.ARRAYS in c.array_records else None
        node = int(m.metadata.dst_node_id)
        row = {
            "event": "send",
            "type": str(m.metadata.message_type),
            "round": int(conf.get("server-round", 0)) if conf else 0,
            "node": node,
            "bytes": P.record_nbytes(arrays),
            "tensors": len(arrays) if arrays is not None else 0,
            "experts": experts,
            **self.clients.get(node, {}),
        }
        if experts is not None and self.layout is not None:
            row["expert_bytes"] = int(sum(self.layout.expert_nbytes(k) for k in experts))
        self._write(row)
        return row["round"]

    def _log_reply(self, r: Message, rnd: int | None = None) -> None:
        node = int(r.metadata.src_node_id)
        row: dict = {"event": "reply", "type": str(r.metadata.message_type), "node": node, "round": rnd}
        if r.has_error():
            row["error"] = (r.error.reason or "").splitlines()[0][:200] if r.error.reason else str(r.error.code)
        elif P.PROFILE in r.content.config_records:
            prof = r.content[P.PROFILE]
            info = {"client": str(prof[P.CLIENT_ID])}
            if P.EXPERT_MEMORY in prof:
                info["declared_expert_bytes"] = float(prof[P.EXPERT_MEMORY])
            self.clients[node] = info
        if not r.has_error() and P.REPORT in r.content.metric_records:
            rep = r.content[P.REPORT]
            for key, name in ((P.TRAIN_TIME, "train_time_s"), (P.DOWN_TIME, "down_time_s"), (P.UP_TIME, "up_time_s")):
                if key in rep:
                    row[name] = float(rep[key])
            row["bytes_up"] = P.record_nbytes(r.content[P.ARRAYS]) if P.ARRAYS in r.content.array_records else 0
        row.update(self.clients.get(node, {}))
        self._write(row)


def read_log(path: str | Path) -> list[dict]:
    """The rows of a ``messages.jsonl`` written by :class:`DeploymentGrid`."""
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]
