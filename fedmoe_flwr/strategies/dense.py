"""``dense``: Flower's own FedAvg on the dense twin model (the non-MoE reference).

Only two things are added to the stock FedAvg: the cohort is drawn from ``(seed, round)``
(FedAvg uses Python's global ``random``), and the round's bytes and simulated time are
accounted by the same rule as the MoE strategies (:func:`fedmoe_flwr.core.round_cost`),
so the benchmark compares like with like.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedmoe_flwr import core
from fedmoe_flwr import protocol as P
from fedmoe_flwr.seeding import sample_cohort
from fedmoe_flwr.strategies.evaluation import personal_metrics
from fedmoe_flwr.strategies.record import RoundLog


class DenseFedAvg(FedAvg):
    """FedAvg with seeded sampling, a deadline and byte/time accounting.

    Args:
        seed: cohort sampling seed. deadline_s: replies slower than it are not aggregated.
        Other arguments are FedAvg's.
    """

    name = "dense"
    state = None  # no alignment state: the dense model has no experts

    def __init__(self, *, seed: int = 0, deadline_s: float | None = None, train_config: dict | None = None,
                 evaluate_every: int = 1, **kwargs):
        kwargs.setdefault("weighted_by_key", P.NUM_EXAMPLES)
        # FedAvg fills in its own default; only a user's function replaces the personal_ metrics
        self._personal_aggr_fn = kwargs.get("evaluate_metrics_aggr_fn")
        super().__init__(**kwargs)
        self.evaluate_every = max(1, int(evaluate_every))
        self.seed = seed
        self.deadline_s = deadline_s
        self.train_config = dict(train_config or {})
        self.bytes_total = 0
        self.sim_time_total = 0.0
        self.last = RoundLog()
        self._bytes_down: list[int] = []

    def _cohort(self, grid: Grid, server_round: int, fraction: float, minimum: int, purpose: str) -> list[int]:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        return sample_cohort(nodes, self.seed, purpose, server_round, fraction, minimum)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        cohort = self._cohort(grid, server_round, self.fraction_train, self.min_train_nodes, "train")
        conf = ConfigRecord({**self.train_config, **dict(config), "server-round": server_round})
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: conf})
        self._bytes_down = [P.record_nbytes(arrays)] * len(cohort)
        self.last = RoundLog()
        return [Message(record, dst_node_id=n, message_type=MessageType.TRAIN) for n in cohort]

    def accept_replies(self, replies: Iterable[Message]) -> tuple[list[Message], list[tuple[float, int]], int]:
        """``(in-time replies, (seconds, bytes up) of each, number dropped)``: errors, malformed
        reports and replies slower than the deadline are dropped."""
        replies = list(replies)
        in_time, accepted, dropped = [], [], len(self._bytes_down) - len(replies)
        for m in replies:
            try:
                if m.has_error():
                    raise P.ProtocolError(m.error.reason or "error")
                secs = P.decode_report(m.content, 0).seconds
            except P.ProtocolError:
                dropped += 1
                continue
            if self.deadline_s is not None and secs > self.deadline_s:
                dropped += 1
                continue
            in_time.append(m)
            accepted.append((secs, P.record_nbytes(m.content[self.arrayrecord_key])))
        return in_time, accepted, dropped

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        in_time, accepted, dropped = self.accept_replies(replies)
        arrays, metrics = super().aggregate_train(server_round, in_time)
        self.account(accepted, dropped, len(in_time))
        return arrays, metrics

    def account(self, accepted: list[tuple[float, int]], dropped: int, aggregated: int) -> None:
        """The round's bytes and simulated time (:func:`fedmoe_flwr.core.round_cost`) into :attr:`last`."""
        cost = core.round_cost(self._bytes_down, accepted, self.deadline_s, incomplete=dropped > 0)
        self.bytes_total += cost.bytes_down + cost.bytes_up
        self.sim_time_total += cost.sim_time_s
        self.last.metrics.update({
            "bytes_down": float(cost.bytes_down), "bytes_up": float(cost.bytes_up), "bytes_total": float(self.bytes_total),
            "sim_round_time_s": cost.sim_time_s, "sim_time_total_s": self.sim_time_total,
            "num_sent": float(len(self._bytes_down)), "num_aggregated": float(aggregated), "num_dropped": float(dropped),
            "num_rejected": 0.0, "load_cv": 0.0, "solve_time_s": 0.0,
        })

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate <= 0 or server_round % self.evaluate_every:
            return []
        cohort = self._cohort(grid, server_round, self.fraction_evaluate, 1, "evaluate")
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: ConfigRecord({"server-round": server_round})})
        return [Message(record, dst_node_id=n, message_type=MessageType.EVALUATE) for n in cohort]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        record, server = personal_metrics(list(replies), self._personal_aggr_fn)
        self.last.metrics.update(server)
        return record

    def state_dict(self) -> dict:
        return {"bytes_total": self.bytes_total, "sim_time_total": self.sim_time_total}

    def load_state_dict(self, d: dict) -> None:
        self.bytes_total = int(d["bytes_total"])
        self.sim_time_total = float(d["sim_time_total"])
