"""The width baselines' shared Flower loop: FedAvg over width-sliced sub-models of the dense
model of the MoE's total size (docs/architecture.md#strategies).

:class:`WidthFedAvg` learns each node's capacity from a QUERY (the same declared expert
budget the MoE strategies read), turns it into a width ratio (:meth:`client_width`), sends
each cohort node the FFN hidden units its rule picks (:meth:`indices`) and aggregates every
element over the clients that held it (:func:`fedmoe_flwr.widths.aggregate_sliced`).
Bytes and simulated time follow the rule every strategy uses (:meth:`DenseFedAvg.account`),
on the exact bytes of each sliced message. Subclasses: ``dense-large-exclusive``,
``heterofl``, ``fjord``, ``fedrolex``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedmoe_flwr import protocol as P
from fedmoe_flwr import widths as W
from fedmoe_flwr.seeding import sample_cohort
from fedmoe_flwr.strategies.dense import DenseFedAvg
from fedmoe_flwr.strategies.record import RoundLog


class WidthFedAvg(DenseFedAvg):
    """FedAvg on width-sliced sub-models; subclasses set the width rule.

    Args:
        moe_expert_bytes: bytes of all the MoE's experts: a node's capacity is its declared
            expert budget over this (1.0 = it could hold the whole MoE).
        width_levels: the width ratios a client may get (the largest not above its capacity).
        roll_step: FedRolex's window shift in hidden units per round.
        query_timeout: seconds to wait for QUERY replies.
        Other arguments are :class:`DenseFedAvg`'s.
    """

    name = "width"

    def __init__(self, *, moe_expert_bytes: float, width_levels: Iterable[float] = (0.125, 0.25, 0.5, 1.0),
                 roll_step: int = 1, query_timeout: float = 600.0, **kwargs):
        super().__init__(**kwargs)
        if not moe_expert_bytes > 0:
            raise ValueError(f"moe_expert_bytes must be > 0, got {moe_expert_bytes}")
        self.moe_expert_bytes = float(moe_expert_bytes)
        self.width_levels = sorted({float(l) for l in width_levels})
        if not self.width_levels or not all(0 < l <= 1 for l in self.width_levels):
            raise ValueError(f"width_levels must be ratios in (0, 1], got {list(width_levels)}")
        self.roll_step = int(roll_step)
        self.query_timeout = query_timeout
        self.node_clients: dict[int, str] = {}
        self.capacity: dict[int, float] = {}  # node id -> share of the MoE's experts it can hold
        self._plan: dict[int, dict[str, np.ndarray]] = {}  # node -> FFN prefix -> hidden units sent
        self._global: dict[str, np.ndarray] | None = None
        self._layout: W.WidthLayout | None = None

    # ------------------------------------------------------------------ the rule
    def client_width(self, capacity: float) -> float | None:
        """The width ratio of a node of this capacity; None = it does not train."""
        return W.width_level(capacity, self.width_levels)

    def indices(self, ratio: float, full: int, rnd: int) -> np.ndarray:
        """The hidden units of an FFN of ``full`` units a client of ``ratio`` trains in round ``rnd``."""
        return W.static_indices(ratio, full)

    def od_levels(self, ratio: float) -> list[float]:
        """Width ratios drawn per local step (FjORD); empty = train the whole slice."""
        return []

    # ------------------------------------------------------------------ Flower hooks
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._set_global(arrays)
        cohort = self._sample(grid, server_round, self.fraction_train, self.min_train_nodes, "train")
        conf = {**self.train_config, **dict(config), "server-round": server_round}
        self.last = RoundLog()
        msgs = self._messages(cohort, server_round, conf, MessageType.TRAIN, keep_plan=True)
        self._bytes_down = [P.record_nbytes(m.content[P.ARRAYS]) for m in msgs]
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        in_time, accepted, dropped = self.accept_replies(replies)
        updates, kept, losses = [], [], []
        for m, acc in zip(in_time, accepted):
            idx = self._plan.get(m.metadata.src_node_id)
            try:
                if idx is None:
                    raise P.ProtocolError("a reply from a node that was not sent a TRAIN message")
                sub = P.decode_arrays(m.content)
                self._check(sub, idx)
                report = P.decode_report(m.content, 0)
            except P.ProtocolError as ex:
                log(WARNING, "round %d: reply of node %s not aggregated: %s", server_round, m.metadata.src_node_id, ex)
                dropped += 1
                continue
            updates.append((sub, idx, float(report.num_examples)))
            kept.append(acc)
            if math.isfinite(report.train_loss):
                losses.append((report.train_loss, report.num_examples))
        self.account(kept, dropped, len(updates))
        if not updates:
            return None, MetricRecord({})
        self._global = W.aggregate_sliced(self._global, self._layout, updates)
        metrics = {}
        if losses:
            metrics["train_loss"] = float(sum(l * n for l, n in losses) / sum(n for _, n in losses))
        return ArrayRecord({n: Array(np.ascontiguousarray(a)) for n, a in self._global.items()}), MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Each sampled node evaluates the sub-model it would train this round on its held-out split."""
        if self.fraction_evaluate <= 0 or server_round % self.evaluate_every:
            return []
        self._set_global(arrays)
        nodes = self._sample(grid, server_round, self.fraction_evaluate, 1, "evaluate")
        return self._messages(nodes, server_round, {"server-round": server_round}, MessageType.EVALUATE, keep_plan=False)

    # ------------------------------------------------------------------ helpers
    def _set_global(self, arrays: ArrayRecord) -> None:
        self._global = {n: a.numpy() for n, a in arrays.items()}
        self._layout = W.WidthLayout.from_shapes({n: a.shape for n, a in self._global.items()})

    def _sample(self, grid: Grid, rnd: int, fraction: float, minimum: int, purpose: str) -> list[int]:
        nodes = [n for n in self._known_nodes(grid) if self.client_width(self.capacity[n]) is not None]
        if not nodes:
            log(WARNING, "round %d: no node can hold a %s sub-model; skipping %s", rnd, self.name, purpose)
            return []
        return sample_cohort(nodes, self.seed, purpose, rnd, fraction, minimum)

    def _plan_for(self, ratio: float, rnd: int) -> dict[str, np.ndarray]:
        return {prefix: self.indices(ratio, full, rnd) for prefix, full in self._layout.widths.items()}

    def _messages(self, nodes: list[int], rnd: int, conf: dict, kind: str, *, keep_plan: bool) -> list[Message]:
        if keep_plan:
            self._plan = {}
        out = []
        for node in nodes:
            ratio = self.client_width(self.capacity[node])
            idx = self._plan_for(ratio, rnd)
            sub = W.slice_arrays(self._global, self._layout, idx)
            extra = {P.WIDTH: float(ratio)}
            levels = self.od_levels(ratio)
            if levels:
                extra[P.OD_LEVELS] = [float(l) for l in levels]
            record = ArrayRecord({n: Array(a) for n, a in sub.items()})
            content = RecordDict({P.ARRAYS: record, P.CONFIG: ConfigRecord({**conf, **extra})})
            out.append(Message(content, dst_node_id=node, message_type=kind))
            if keep_plan:
                self._plan[node] = idx
                self.last.assignment[self.node_clients[node]] = [f"width={ratio:g}"]
        return out

    def _check(self, sub: dict[str, np.ndarray], idx: dict[str, np.ndarray]) -> None:
        if set(sub) != set(self._global):
            raise P.ProtocolError("the reply's tensor names differ from the model's")
        for name, a in sub.items():
            shape = list(self._global[name].shape)
            if name in self._layout.sliced:
                prefix, axis = self._layout.sliced[name]
                shape[axis] = len(idx[prefix])
            if tuple(a.shape) != tuple(shape) or not np.isfinite(a).all():
                raise P.ProtocolError(f"{name}: shape {tuple(a.shape)} (expected {tuple(shape)}) or non-finite values")

    def _known_nodes(self, grid: Grid) -> list[int]:
        """Connected nodes with a known capacity, by stable client id (new ones get a QUERY)."""
        nodes = [int(n) for n in grid.get_node_ids()]
        new = [n for n in nodes if n not in self.node_clients]
        if new:
            msgs = [Message(RecordDict({P.CONFIG: ConfigRecord({"probe": False})}), dst_node_id=n,
                            message_type=MessageType.QUERY) for n in new]
            for reply in grid.send_and_receive(msgs, timeout=self.query_timeout):
                node = reply.metadata.src_node_id
                try:
                    if reply.has_error():
                        raise P.ProtocolError(reply.error.reason or "error")
                    profile, _, _ = P.decode_probe(reply.content, 0)
                except P.ProtocolError as ex:
                    log(WARNING, "node %s: profile query failed: %s", node, ex)
                    continue
                mem = profile.expert_memory_bytes
                self.node_clients[node] = profile.client_id
                self.capacity[node] = 1.0 if mem is None else min(1.0, float(mem) / self.moe_expert_bytes)
        known = [n for n in nodes if n in self.node_clients]
        return sorted(known, key=lambda n: self.node_clients[n])
