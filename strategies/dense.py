"""``dense``: Flower's own FedAvg on the dense twin model (the non-MoE reference).

Only two things are added to the stock FedAvg: the cohort is drawn from ``(seed, round)``
(FedAvg uses Python's global ``random``), and the round's bytes and simulated time are
accounted like the MoE strategies do, so the benchmark compares like with like.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedmoe_flwr import protocol as P
from fedmoe_flwr.fleet import rng_for


class DenseFedAvg(FedAvg):
    """FedAvg with seeded sampling, a deadline and byte/time accounting.

    Args:
        seed: cohort sampling seed. deadline_s: replies slower than it are not aggregated.
        Other arguments are FedAvg's.
    """

    name = "dense"

    def __init__(self, *, seed: int = 0, deadline_s: float | None = None, train_config: dict | None = None,
                 evaluate_every: int = 1, **kwargs):
        kwargs.setdefault("fraction_evaluate", 0.0)
        self.evaluate_every = max(1, int(evaluate_every))
        kwargs.setdefault("weighted_by_key", P.NUM_EXAMPLES)
        super().__init__(**kwargs)
        self.seed = seed
        self.deadline_s = deadline_s
        self.train_config = dict(train_config or {})
        self.bytes_total = 0
        self.sim_time_total = 0.0
        self.last_metrics: dict[str, float] = {}
        self._sent = 0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        size = min(len(nodes), max(int(round(len(nodes) * self.fraction_train)), self.min_train_nodes))
        pick = rng_for(self.seed, "train", server_round).choice(len(nodes), size=size, replace=False)
        conf = ConfigRecord({**self.train_config, **dict(config), "server-round": server_round})
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: conf})
        self._sent = len(pick)
        self._bytes_each = sum(a.numpy().nbytes for a in arrays.values())
        return [Message(record, dst_node_id=nodes[i], message_type=MessageType.TRAIN) for i in sorted(pick)]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        in_time, times, dropped = [], [], 0
        for m in replies:
            if m.has_error():
                dropped += 1
                continue
            rep = m.content[P.REPORT]
            secs = float(rep[P.DOWN_TIME]) + float(rep[P.TRAIN_TIME]) + float(rep[P.UP_TIME])
            if self.deadline_s is not None and secs > self.deadline_s:
                dropped += 1
                continue
            in_time.append(m)
            times.append(secs)
        dropped += self._sent - len(replies)
        arrays, _ = super().aggregate_train(server_round, in_time)
        sim = self.deadline_s if (dropped and self.deadline_s is not None) else max(times, default=0.0)
        bytes_down = self._sent * self._bytes_each
        bytes_up = len(in_time) * self._bytes_each
        self.bytes_total += bytes_down + bytes_up
        self.sim_time_total += sim
        self.last_metrics = {
            "bytes_down": float(bytes_down), "bytes_up": float(bytes_up), "bytes_total": float(self.bytes_total),
            "sim_round_time_s": float(sim), "sim_time_total_s": self.sim_time_total,
            "num_sent": float(self._sent), "num_aggregated": float(len(in_time)), "num_dropped": float(dropped),
            "num_rejected": 0.0, "load_cv": 0.0, "solve_time_s": 0.0,
        }
        return arrays, MetricRecord(self.last_metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate <= 0 or server_round % self.evaluate_every:
            return []
        nodes = sorted(int(n) for n in grid.get_node_ids())
        size = min(len(nodes), max(int(round(len(nodes) * self.fraction_evaluate)), 1))
        pick = rng_for(self.seed, "evaluate", server_round).choice(len(nodes), size=size, replace=False)
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: ConfigRecord({"server-round": server_round})})
        return [Message(record, dst_node_id=nodes[i], message_type=MessageType.EVALUATE) for i in sorted(pick)]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        good = [m.content[P.METRICS] for m in replies if not m.has_error() and P.METRICS in m.content]
        if not good:
            return None
        w = [float(g[P.NUM_EXAMPLES]) for g in good]
        personal = {
            "personal_accuracy": sum(float(g["accuracy"]) * x for g, x in zip(good, w)) / sum(w),
            "personal_loss": sum(float(g["loss"]) * x for g, x in zip(good, w)) / sum(w),
            "personal_clients": float(len(good)),
        }
        self.last_metrics.update(personal)
        return MetricRecord(personal)

    def state_dict(self) -> dict:
        return {"bytes_total": self.bytes_total, "sim_time_total": self.sim_time_total}

    def load_state_dict(self, d: dict) -> None:
        self.bytes_total = int(d["bytes_total"])
        self.sim_time_total = float(d["sim_time_total"])
