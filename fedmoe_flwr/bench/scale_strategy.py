"""The Flower adapter at scale: ``AlignedStrategy`` on many in-process nodes, no training.

    python -m fedmoe_flwr.bench.scale_strategy [--clients 1000 10000 100000] [--experts 64]
                                               [--cohort 1000] [--rounds 3] [--out FILE]

Where :mod:`fedmoe_flwr.bench.scale` drives the pure core, this runs the real server path:
Flower's ``Strategy.start`` with ``AlignedStrategy`` over :class:`~fedmoe_flwr.sim.LocalGrid`
with ``N`` nodes whose ClientApp answers at once (numpy only): its profile and a probe
histogram to the QUERY, its received tensors plus 0.01 and a report to TRAIN. The
ClientApp's own time is measured and subtracted, so ``server s`` is everything else of a
round: sampling, the time model of every known node, assignment, building and decoding
messages, ``apply_round``. CPU seconds; nothing is asserted.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from fedmoe_flwr.bench.scale import DEADLINE_S, EXPERT_BYTES, fleet_arguments, synthetic_fleet, tiny_layout

clock = time.process_time


def fleet_app(layout, profiles: dict, examples: dict, ids: list[str], seed: int, spent: list[float]):
    """A ClientApp that answers from the synthetic fleet; its CPU time is added to ``spent``."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from fedmoe_flwr import core
    from fedmoe_flwr import protocol as P
    from fedmoe_flwr.seeding import rng_for

    keys = layout.expert_keys
    app = ClientApp()

    @app.query()
    def query(msg, context):
        t0 = clock()
        pid = int(context.node_config["partition-id"])
        cid, p = ids[pid], profiles[ids[pid]]
        prof = P.NodeProfile(client_id=cid, expert_memory_bytes=p.memory_bytes, samples_per_s=p.declared_samples_per_s,
                             uplink_Bps=p.declared_uplink_Bps, downlink_Bps=p.declared_downlink_Bps,
                             num_examples=examples[cid])
        hist = rng_for(seed, "probe", pid).dirichlet(np.full(len(keys), 0.3))
        content = RecordDict({P.PROFILE: prof.encode(),
                              P.REPORT: MetricRecord({P.HIST: P.encode_vector(hist), P.GATE_SHARE: P.encode_vector(hist)})})
        spent[0] += clock() - t0
        return Message(content, reply_to=msg)

    @app.train()
    def train(msg, context):
        t0 = clock()
        pid = int(context.node_config["partition-id"])
        cid = ids[pid]
        held = set(msg.content[P.CONFIG]["experts"])
        trained = {n: a.numpy() + np.float32(0.01) for n, a in msg.content[P.ARRAYS].items()}
        mask = np.array([k in held for k in keys])
        hist = rng_for(seed, "hist", pid).dirichlet(np.full(len(keys), 0.3))
        n = examples[cid]
        report = core.ClientReport(num_examples=n, train_loss=1.0, down_s=0.0, train_s=n / profiles[cid].declared_samples_per_s,
                                   up_s=0.0, hist=hist, gate=hist, tokens=np.where(mask, 10.0, 0.0),
                                   expert_loss=np.where(mask, 1.0, np.nan))
        content = RecordDict({P.ARRAYS: ArrayRecord({k: Array(v) for k, v in trained.items()}),
                              P.REPORT: P.encode_report(report)})
        spent[0] += clock() - t0
        return Message(content, reply_to=msg)

    return app


def measure(num_clients: int, num_experts: int, cohort: int, rounds: int, seed: int = 0) -> dict:
    from flwr.app import Array, ArrayRecord, ConfigRecord

    from fedmoe_flwr.sim import LocalGrid
    from fedmoe_flwr.strategies import AlignedStrategy

    layout, params = tiny_layout(num_experts)
    ids, profiles, examples = synthetic_fleet(num_clients, num_experts, seed)
    spent = [0.0]
    grid = LocalGrid(fleet_app(layout, profiles, examples, ids, seed, spent), num_clients, seed=seed)
    strategy = AlignedStrategy(layout, fraction_train=cohort / num_clients, min_train_nodes=1, fraction_evaluate=0.0,
                               seed=seed, deadline_s=DEADLINE_S, pace_margin=0.0)
    strategy.expert_bytes = np.full(num_experts, EXPERT_BYTES)  # the time model's sizes (the tensors are tiny)
    stamps: list[tuple[float, float]] = []

    def stamp(_rnd, _arrays):
        stamps.append((clock(), spent[0]))

    strategy.start(grid=grid, initial_arrays=ArrayRecord({n: Array(a) for n, a in params.items()}), num_rounds=rounds,
                   train_config=ConfigRecord({"local-epochs": 1}), evaluate_fn=stamp)
    per_round = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(stamps, stamps[1:])]
    server = [total - client for total, client in per_round]
    return {"clients": num_clients, "experts": num_experts, "cohort": cohort, "rounds": rounds,
            "first_round_server_s": server[0], "round_server_s": float(np.mean(server[1:] or server)),
            "round_client_s": float(np.mean([c for _, c in per_round[1:] or per_round])),
            "messages_sent": grid.messages_sent, "aggregated_last_round": strategy.last.metrics.get("num_aggregated")}


def main(argv=None) -> None:
    p = fleet_arguments(__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    from fedmoe_flwr.simulation import quiet_flower

    import flwr.serverapp  # noqa: F401  (importing flwr resets its log level: silence it after)

    quiet_flower()
    rows = []
    for n in a.clients:
        rows.append(measure(n, a.experts, min(a.cohort, n), a.rounds))
        r = rows[-1]
        print(f"{n:>8} known clients: round 1 (profile queries of all) {r['first_round_server_s']:.2f} s server CPU, "
              f"later rounds {r['round_server_s'] * 1e3:.0f} ms server CPU "
              f"(+ {r['round_client_s'] * 1e3:.0f} ms in the stand-in ClientApp; {r['aggregated_last_round']:.0f} "
              "updates aggregated in the last round)", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
