"""Malicious clients for the attack benchmark (:mod:`fedmoe_flwr.bench.attacks`).

:func:`attacked_client_app` wraps the honest ClientApp: every node runs the real client,
and a malicious node (a partition id in :attr:`AttackPlan.malicious`) then rewrites its
real reply through :mod:`fedmoe_flwr.protocol`, so what the server sees is exactly what a
lying client could send. The attacks (``ATTACKS``; "delta" = trained - global):

- ``sign_flip``: sends ``global - delta``;
- ``scale10``: sends ``global + 10 delta``;
- ``inflate``: sign-flipped update, with ``num-examples`` and every token count x1000;
- ``replace``: model replacement: ``global + m (target - global)`` with ``target`` a fixed
  random model and ``m`` the cohort size (the boost that makes a plain mean land on it);
- ``capture``: fitness lying to capture the target expert: one-hot routing histogram and
  gate share on it (in the profile probe and in every reply), all its tokens on it when it
  holds it (consistent with the histogram), a tiny loss on it; sign-flipped update;
- ``capacity``: declares 1e15 bytes of expert memory; sign-flipped update;
- ``takeover``: claims the client id of an honest client; sign-flipped update;
- ``absent``: not an attack: the malicious nodes answer every TRAIN message with an error, so
  the run trains without their data, but they keep their places in the cohorts;
- ``excluded``: not an attack but the ceiling of any defence: the malicious nodes answer the
  profile query with an error, so they are never registered nor sampled: the federation
  without them, as a filter that knew them from the start would leave it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmoe_flwr import protocol as P
from fedmoe_flwr.layout import parse_expert_key
from fedmoe_flwr.seeding import rng_for

ATTACKS = ("sign_flip", "scale10", "inflate", "replace", "capture", "capacity", "takeover", "absent", "excluded")
INFLATION = 1000
SCALE = 10.0
HUGE_MEMORY = 1e15


@dataclass
class AttackPlan:
    """Who attacks and how. ``victims`` maps a takeover attacker's partition id to the
    partition id whose client id it claims. ``nodes`` maps a malicious partition id to its Flower
    node id and ``trained`` collects the malicious partition ids sent a TRAIN message; with the
    server's ``refused_claims`` they give the client ids it weighted as attackers
    (:meth:`trained_as`)."""

    attack: str
    malicious: frozenset[int]
    expert_keys: tuple[str, ...]
    target_expert: int = 0
    cohort_size: int = 10
    seed: int = 0
    victims: dict[int, int] = field(default_factory=dict)
    nodes: dict[int, int] = field(default_factory=dict)
    trained: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.attack not in ATTACKS:
            raise ValueError(f"attack must be one of {ATTACKS}, got {self.attack!r}")

    def trained_as(self, refused_claims: dict[int, str]) -> set[str]:
        """The client ids the server trained the malicious nodes under: the id each claimed,
        unless the server refused the claim and gave the node a fresh id (``refused_claims``:
        node id -> id given)."""
        return {refused_claims.get(self.nodes.get(pid, -1), str(self.victims.get(pid, pid))) for pid in self.trained}


def choose_malicious(num_clients: int, fraction: float, seed: int) -> frozenset[int]:
    """``round(fraction * num_clients)`` (at least 1) partition ids drawn from ``(seed, "attackers")``."""
    k = max(1, int(round(fraction * num_clients)))
    return frozenset(int(i) for i in rng_for(seed, "attackers").choice(num_clients, size=k, replace=False))


def choose_victims(num_clients: int, malicious: frozenset[int], seed: int) -> dict[int, int]:
    """A distinct honest partition id per attacker (for ``takeover``), drawn from the seed."""
    honest = [i for i in range(num_clients) if i not in malicious]
    picks = rng_for(seed, "victims").choice(len(honest), size=len(malicious), replace=False)
    return {a: honest[int(p)] for a, p in zip(sorted(malicious), picks)}


def _one_hot_in_layer(values: np.ndarray, keys: tuple[str, ...], target: int) -> np.ndarray:
    """``values`` with the target expert's layer replaced by a one-hot on the target."""
    layer = parse_expert_key(keys[target])[0]
    out = np.array(values, dtype=np.float64)
    for k, key in enumerate(keys):
        if parse_expert_key(key)[0] == layer:
            out[k] = 1.0 if k == target else 0.0
    return out


class _Rewriter:
    def __init__(self, plan: AttackPlan):
        self.plan = plan
        self.targets: dict[str, np.ndarray] = {}  # model replacement's fixed target tensors

    def probe(self, msg: Message, reply: Message, pid: int) -> Message:
        plan = self.plan
        profile, hist, gate = P.decode_probe(reply.content, len(plan.expert_keys))
        content = dict(reply.content.items())
        if plan.attack == "capacity":
            profile = replace(profile, expert_memory_bytes=HUGE_MEMORY)
        if plan.attack == "takeover":
            profile = replace(profile, client_id=str(plan.victims[pid]))
        if plan.attack == "capture" and hist is not None:
            content[P.REPORT] = MetricRecord({
                P.HIST: P.encode_vector(_one_hot_in_layer(hist, plan.expert_keys, plan.target_expert)),
                P.GATE_SHARE: P.encode_vector(_one_hot_in_layer(gate, plan.expert_keys, plan.target_expert)),
            })
        content[P.PROFILE] = profile.encode()
        return Message(RecordDict(content), reply_to=msg)

    def train(self, msg: Message, reply: Message, pid: int) -> Message:
        plan, keys = self.plan, self.plan.expert_keys
        sent, trained = P.decode_arrays(msg.content), P.decode_arrays(reply.content)
        report = P.decode_report(reply.content, len(keys))
        plan.trained.add(pid)
        if plan.attack == "absent":
            return Message(Error(code=0, reason="withheld by a malicious node"), reply_to=msg)
        arrays = {n: self._payload(n, sent[n].astype(np.float64), t.astype(np.float64)).astype(t.dtype)
                  for n, t in trained.items()}
        if plan.attack == "inflate":
            report = replace(report, num_examples=report.num_examples * INFLATION, tokens=report.tokens * INFLATION)
        if plan.attack == "capture":
            report = self._capture_report(report, set(msg.content[P.CONFIG]["experts"]))
        content = dict(reply.content.items())
        content[P.ARRAYS] = ArrayRecord({n: Array(np.ascontiguousarray(a)) for n, a in arrays.items()})
        content[P.REPORT] = P.encode_report(report)
        return Message(RecordDict(content), reply_to=msg)

    def _payload(self, name: str, g: np.ndarray, t: np.ndarray) -> np.ndarray:
        attack = self.plan.attack
        if attack == "scale10":
            return g + SCALE * (t - g)
        if attack == "replace":
            if name not in self.targets:
                scale = float(np.std(g)) + 1e-3
                self.targets[name] = rng_for(self.plan.seed, "replacement", name).normal(0.0, scale, g.shape)
            return g + self.plan.cohort_size * (self.targets[name] - g)
        return g - (t - g)  # the sign flip: the payload of every other attack

    def _capture_report(self, report: P.ClientReport, held: set[str]) -> P.ClientReport:
        keys, target = self.plan.expert_keys, self.plan.target_expert
        hist = _one_hot_in_layer(np.nan_to_num(report.hist, nan=0.0), keys, target)
        gate = _one_hot_in_layer(np.nan_to_num(report.gate, nan=0.0), keys, target)
        tokens, loss = report.tokens.copy(), report.expert_loss.copy()
        if keys[target] in held:
            layer = parse_expert_key(keys[target])[0]
            same = np.array([parse_expert_key(k)[0] == layer for k in keys])
            total = float(tokens[same].sum())
            tokens[same] = 0.0
            tokens[target] = max(total, float(report.num_examples))
            loss[target] = 0.01
        return replace(report, hist=hist, gate=gate, tokens=tokens, expert_loss=loss)


def attacked_client_app(inner: ClientApp, plan: AttackPlan) -> ClientApp:
    """A ClientApp that runs ``inner`` and, on malicious nodes, rewrites its replies."""
    app = ClientApp()
    rewriter = _Rewriter(plan)

    def evil(context: Context) -> int | None:
        pid = int(context.node_config["partition-id"])
        return pid if pid in plan.malicious else None

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        pid = evil(context)
        if pid is not None:
            plan.nodes[pid] = int(context.node_id)
        if pid is not None and plan.attack == "excluded":
            return Message(Error(code=0, reason="not part of the federation"), reply_to=msg)
        reply = inner(msg, context)
        return reply if pid is None or reply.has_error() else rewriter.probe(msg, reply, pid)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply, pid = inner(msg, context), evil(context)
        return reply if pid is None or reply.has_error() else rewriter.train(msg, reply, pid)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return inner(msg, context)

    return app
