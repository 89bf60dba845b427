"""The Flower adapter shared by every expert-aware strategy.

:class:`ExpertStrategy` is a ``flwr.serverapp.strategy.Strategy`` (Message API). Its hooks
do the Flower work, and the alignment core (:mod:`fedmoe_flwr.core`, pure functions) does
the thinking:

- ``configure_train``: sample the cohort from the grid's nodes (seeded by ``(seed, round)``),
  ask new nodes for their profile (and routing histogram) with a QUERY message, call
  :meth:`ExpertStrategy.assign` (the one method subclasses change), and send each node an
  ``ArrayRecord`` with exactly the shared tensors and its experts.
- ``aggregate_train``: split off failed replies and replies past the deadline, validate the
  rest (rejected updates are logged with their reason, never aggregated), aggregate per
  expert, take a server-optimizer step, then update profiles, fitness and load.

All learning state is one :class:`~fedmoe_flwr.core.AlignmentState`; see
:meth:`ExpertStrategy.state_dict`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedmoe_flwr import core
from fedmoe_flwr import protocol as P
from fedmoe_flwr.fleet import rng_for
from fedmoe_flwr.layout import ParamLayout
from strategies.problem import AssignmentProblem, assign_by_layer


@dataclass
class FitnessSettings:
    """How per-pair signals become fitness (DESIGN.md §4)."""

    w_hist: float = 1.0
    w_gate: float = 0.0
    w_loss: float = 0.0
    alpha: float = 1.0
    beta: float = 0.5
    kappa: float = 0.0
    anneal_rounds: int | None = 50


@dataclass
class _Sent:
    client_id: str
    keys: list[str]
    bytes_down: int


@dataclass
class RoundLog:
    """What the last round did; read by run outputs and tests."""

    assignment: dict[str, list[str]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)


def _to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: arr.numpy() for name, arr in arrays.items()}


class ExpertStrategy(Strategy):
    """Expert-aware federated training of an MoE model (base of every fedmoe strategy).

    Args:
        layout: which tensors belong to which expert (``fedmoe_flwr.models.param_layout``).
        fraction_train: fraction of connected nodes in each training cohort.
        min_train_nodes: lower bound on the cohort size.
        min_available_nodes: rounds wait for nothing; fewer connected nodes than this
            skips the round (logged) instead of failing.
        fraction_evaluate: fraction of nodes for federated (personalised) evaluation:
            each evaluates the experts :meth:`assign` would give it on its held-out split.
            0 disables federated evaluation.
        seed: every random choice derives from ``(seed, round, client)``.
        probe: QUERY new nodes for their routing histogram (cold-start fitness).
        deadline_s: simulated/measured round deadline; replies slower than it are dropped
            and the deadline-aware strategies keep assignments within it. None = no deadline.
        norm_bound: updates whose delta norm exceeds it are rejected. None = no bound.
        server_opt, server_lr: ``"avg"``, ``"fedadam"`` or ``"fedyogi"`` server step.
        fitness: signal weights, smoothing and exploration (:class:`FitnessSettings`).
        profile_ema: smoothing of measured speeds and reliability.
        train_config: extra settings sent in every TRAIN message (``local-epochs``, ``lr``...).
        train_metrics_aggr_fn, evaluate_metrics_aggr_fn: ``(list[RecordDict], weight_key) ->
            MetricRecord``, as in Flower's FedAvg; default: weighted mean by ``num-examples``.
        query_timeout: seconds to wait for QUERY replies.
        evaluate_every: federated evaluation runs on rounds divisible by this.
    """

    name = "expert"

    def __init__(
        self,
        layout: ParamLayout,
        *,
        fraction_train: float = 0.5,
        min_train_nodes: int = 2,
        min_available_nodes: int = 1,
        fraction_evaluate: float = 0.0,
        seed: int = 0,
        probe: bool = True,
        deadline_s: float | None = None,
        norm_bound: float | None = None,
        server_opt: str = "avg",
        server_lr: float = 1.0,
        fitness: FitnessSettings | None = None,
        profile_ema: float = 0.3,
        train_config: dict | None = None,
        train_metrics_aggr_fn: Callable | None = None,
        evaluate_metrics_aggr_fn: Callable | None = None,
        query_timeout: float = 600.0,
        evaluate_every: int = 1,
    ) -> None:
        if not 0.0 < fraction_train <= 1.0:
            raise ValueError(f"fraction_train must be in (0, 1], got {fraction_train}")
        self.layout = layout
        self.expert_keys = layout.expert_keys
        self.expert_bytes = np.array([layout.expert_nbytes(k) for k in self.expert_keys], dtype=np.float64)
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.min_available_nodes = min_available_nodes
        self.fraction_evaluate = fraction_evaluate
        self.seed = seed
        self.probe = probe
        self.deadline_s = deadline_s
        self.norm_bound = norm_bound
        self.server_opt = server_opt
        self.server_lr = server_lr
        self.fitness = fitness or FitnessSettings()
        self.profile_ema = profile_ema
        self.train_config = dict(train_config or {})
        self.train_metrics_aggr_fn = train_metrics_aggr_fn
        self.evaluate_metrics_aggr_fn = evaluate_metrics_aggr_fn
        self.query_timeout = query_timeout
        self.evaluate_every = max(1, int(evaluate_every))
        self.state = core.init_state(self.expert_keys)
        self.node_clients: dict[int, str] = {}  # Flower node id -> stable client id
        self.num_examples: dict[str, int] = {}
        self.sim_time_total = 0.0
        self.bytes_total = 0
        self.last = RoundLog()
        self._sent: dict[int, _Sent] = {}
        self._close: float | None = deadline_s
        self._global: dict[str, np.ndarray] | None = None

    # ------------------------------------------------------------------ the one hook
    def assign(self, problem: AssignmentProblem) -> core.AssignmentResult:
        """Choose each cohort client's experts. Subclasses override this (and only this)."""
        raise NotImplementedError

    def eligible_nodes(self, server_round: int, nodes: list[int]) -> list[int]:
        """The nodes the cohort is drawn from (default: every known node)."""
        return nodes

    def round_close(self, problem: AssignmentProblem, x: np.ndarray) -> float | None:
        """When the server stops waiting for this round's replies (s); None = for all.

        Default: the fixed deadline. Profile-aware strategies may close earlier.
        """
        return self.deadline_s

    def personal_experts(self, problem: AssignmentProblem) -> core.AssignmentResult:
        """The experts a client would get for personalised evaluation (default: :meth:`assign`)."""
        return self.assign(problem)

    # ------------------------------------------------------------------ Flower hooks
    def summary(self) -> None:
        log(INFO, "\t├──> %s: %d experts, fraction_train %.2f, deadline %s s",
            type(self).__name__, len(self.expert_keys), self.fraction_train, self.deadline_s)
        log(INFO, "\t└──> fitness %s", self.fitness)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._global = _to_numpy(arrays)
        nodes = self.eligible_nodes(server_round, self._known_nodes(grid, arrays, server_round))
        cohort = self._sample(nodes, server_round, self.fraction_train, self.min_train_nodes, "train")
        self._sent = {}
        if not cohort:
            return []
        problem = self._problem(server_round, cohort)
        result = self._assign_all_layers(problem, self.assign)
        self._close = self.round_close(problem, result.x)
        self.last = RoundLog(metrics={"solve_time_s": result.solve_time_s})
        self.last.metrics["assign_relaxed"] = float(len(result.relaxed))
        self.last.metrics["num_skipped"] = float((~result.x.any(axis=1)).sum())
        messages = []
        for i, node_id in enumerate(cohort):
            keys = [self.expert_keys[k] for k in np.flatnonzero(result.x[i])]
            if not keys and self.expert_keys:
                continue  # nothing it can hold (or finish in time): a sub-model without experts cannot route
            record, nbytes = self._payload(arrays, keys)
            conf = ConfigRecord({**self.train_config, **dict(config), "server-round": server_round, "experts": keys})
            self._sent[node_id] = _Sent(problem.client_ids[i], keys, nbytes)
            self.last.assignment[problem.client_ids[i]] = keys
            messages.append(Message(RecordDict({P.ARRAYS: record, P.CONFIG: conf}), dst_node_id=node_id, message_type=MessageType.TRAIN))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # Aggregate in client-id order: floating-point sums then do not depend on arrival order.
        replies = sorted(replies, key=lambda m: self._sent[m.metadata.src_node_id].client_id if m.metadata.src_node_id in self._sent else "")
        t0 = time.perf_counter()
        updates, reports, observations, accepted_contents = [], [], {}, []
        dropped, rejected = {}, {}
        round_times, late = [], False
        replied = set()
        for msg in replies:
            node_id = msg.metadata.src_node_id
            sent = self._sent.get(node_id)
            if sent is None:
                log(WARNING, "reply from node %s that was not sent a TRAIN message; ignored", node_id)
                continue
            replied.add(node_id)
            cid = sent.client_id
            if msg.has_error():
                dropped[cid] = (msg.error.reason or "error").splitlines()[0][:200]
                observations[cid] = {"completed": False}
                continue
            try:
                update, obs, secs, rep = self._read_reply(msg, sent)
            except ValueError as ex:
                rejected[cid] = str(ex)
                observations[cid] = {"completed": False}
                continue
            if self._close is not None and secs > self._close:
                dropped[cid] = f"missed the deadline ({secs:.1f} s > {self._close:.1f} s)"
                observations[cid] = {**obs, "completed": False}
                late = True
                continue
            updates.append(update)
            reports.append(rep)
            observations[cid] = {**obs, "completed": True}
            accepted_contents.append(msg.content)
            round_times.append(secs)
        for node_id, sent in self._sent.items():
            if node_id not in replied:
                dropped[sent.client_id] = "no reply (timeout)"
                observations[sent.client_id] = {"completed": False}
        for cid, why in {**dropped, **rejected}.items():
            log(INFO, "round %d: update of client %s not aggregated: %s", server_round, cid, why)

        new_arrays = None
        if updates:
            _, delta, stats = core.aggregate_experts(self._global, updates, self.layout)
            new_global, opt_state = core.server_step(
                self._global, delta, self.state.opt_state, kind=self.server_opt, lr=self.server_lr,
                touched=set(stats["touched"]), row_masks=stats["row_masks"],
            )
            self.state = replace(self.state, opt_state=opt_state)
            new_arrays = ArrayRecord({n: Array(np.ascontiguousarray(new_global[n])) for n in self._global})
            self._global = new_global
        self._learn(server_round, updates, reports, observations)

        sim_round = max(round_times, default=0.0)
        if (late or dropped) and self._close is not None:
            sim_round = self._close  # the server waited until it closed the round
        self.sim_time_total += sim_round
        bytes_down = sum(s.bytes_down for s in self._sent.values())
        bytes_up = sum(int(c[P.REPORT][P.BYTES_UP]) for c in accepted_contents)
        self.bytes_total += bytes_down + bytes_up
        tokens_k = self.state.load.tokens_last
        m = self.last.metrics
        m.update({
            "bytes_down": float(bytes_down), "bytes_up": float(bytes_up), "bytes_total": float(self.bytes_total),
            "sim_round_time_s": sim_round, "sim_time_total_s": self.sim_time_total,
            "load_cv": core.load_cv(self.state.load.clients_last), "token_load_cv": core.load_cv(tokens_k),
            "num_sent": float(len(self._sent)), "num_aggregated": float(len(updates)),
            "num_dropped": float(len(dropped)), "num_rejected": float(len(rejected)),
            "experts_trained_total": float((self.state.load.clients_total > 0).sum()),
            "aggregate_time_s": time.perf_counter() - t0,
        })
        if accepted_contents:
            losses = [float(c[P.REPORT][P.TRAIN_LOSS]) for c in accepted_contents]
            weights = [float(c[P.REPORT][P.NUM_EXAMPLES]) for c in accepted_contents]
            m["train_loss"] = float(np.average(losses, weights=weights))
        if self.train_metrics_aggr_fn is not None and accepted_contents:
            m.update(dict(self.train_metrics_aggr_fn(accepted_contents, P.NUM_EXAMPLES)))
        self.last.dropped, self.last.rejected = dropped, rejected
        return new_arrays, MetricRecord({k: float(v) for k, v in m.items()})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate <= 0 or server_round % self.evaluate_every:
            return []
        nodes = self._sample(self._known_nodes(grid, arrays, server_round), server_round, self.fraction_evaluate, 1, "evaluate")
        if not nodes:
            return []
        problem = self._problem(server_round, nodes)
        result = self._assign_all_layers(problem, self.personal_experts)
        messages = []
        for i, node_id in enumerate(nodes):
            keys = [self.expert_keys[k] for k in np.flatnonzero(result.x[i])]
            if not keys:
                continue
            record, _ = self._payload(arrays, keys)
            conf = ConfigRecord({**dict(config), "server-round": server_round, "experts": keys})
            messages.append(Message(RecordDict({P.ARRAYS: record, P.CONFIG: conf}), dst_node_id=node_id, message_type=MessageType.EVALUATE))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        good = [m.content for m in replies if not m.has_error() and P.METRICS in m.content]
        if not good:
            return None
        if self.evaluate_metrics_aggr_fn is not None:
            return self.evaluate_metrics_aggr_fn(good, P.NUM_EXAMPLES)
        # Weighted mean by num-examples of every scalar the clients report, as FedAvg does,
        # prefixed "personal_" (accuracy -> personal_accuracy).
        w = np.array([float(c[P.METRICS].get(P.NUM_EXAMPLES, 1.0)) for c in good])
        keys = [k for k, v in good[0][P.METRICS].items() if k != P.NUM_EXAMPLES and isinstance(v, (int, float))]
        personal = {
            f"personal_{k}": float(np.average([float(c[P.METRICS][k]) for c in good], weights=w))
            for k in keys if all(k in c[P.METRICS] for c in good)
        }
        personal["personal_clients"] = float(len(good))
        self.last.metrics.update(personal)
        return MetricRecord(personal)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything the strategy learned, JSON-serialisable (with numpy arrays as lists)."""
        alignment, arrays = core.state_to_dict(self.state)
        return {
            "alignment": alignment,
            "alignment_arrays": {k: v.tolist() for k, v in arrays.items()},
            "num_examples": dict(self.num_examples),
            "sim_time_total": self.sim_time_total,
            "bytes_total": self.bytes_total,
        }

    def load_state_dict(self, d: dict) -> None:
        arrays = {k: np.asarray(v) for k, v in d.get("alignment_arrays", {}).items()}
        self.state = core.state_from_dict(d["alignment"], arrays)
        self.num_examples = {k: int(v) for k, v in d["num_examples"].items()}
        self.sim_time_total = float(d["sim_time_total"])
        self.bytes_total = int(d["bytes_total"])

    # ------------------------------------------------------------------ helpers
    def _known_nodes(self, grid: Grid, arrays: ArrayRecord, rnd: int) -> list[int]:
        """Connected nodes with a known profile, ordered by stable client id.

        Nodes never seen get a QUERY (profile, and the routing histogram when probing);
        nodes that do not answer are left out this round. Ordering by client id keeps
        cohorts independent of Flower's random node ids.
        """
        nodes = [int(n) for n in grid.get_node_ids()]
        new = [n for n in nodes if n not in self.node_clients]
        if new:
            content = {P.CONFIG: ConfigRecord({"probe": self.probe, "server-round": rnd})}
            if self.probe:
                content[P.ARRAYS], _ = self._payload(arrays, [])
            msgs = [Message(RecordDict(dict(content)), dst_node_id=n, message_type=MessageType.QUERY) for n in new]
            for reply in grid.send_and_receive(msgs, timeout=self.query_timeout):
                if reply.has_error() or P.PROFILE not in reply.content:
                    log(WARNING, "node %s did not answer the profile query", reply.metadata.src_node_id)
                    continue
                self._register(reply.metadata.src_node_id, reply.content)
        known = [n for n in nodes if n in self.node_clients]
        return sorted(known, key=lambda n: self.node_clients[n])

    def _sample(self, nodes: list[int], rnd: int, fraction: float, minimum: int, purpose: str) -> list[int]:
        """A cohort drawn from ``(seed, purpose, round)`` over the client-id-ordered nodes."""
        if len(nodes) < self.min_available_nodes:
            log(WARNING, "round %d: %d nodes available, %d required; skipping %s", rnd, len(nodes), self.min_available_nodes, purpose)
            return []
        size = min(len(nodes), max(int(round(len(nodes) * fraction)), minimum))
        pick = rng_for(self.seed, purpose, rnd).choice(len(nodes), size=size, replace=False)
        return [nodes[i] for i in sorted(pick)]

    def _register(self, node_id: int, content: RecordDict) -> None:
        prof = content[P.PROFILE]
        cid = str(prof[P.CLIENT_ID])
        self.node_clients[node_id] = cid
        declared = core.ClientProfile(
            memory_bytes=float(prof.get(P.EXPERT_MEMORY, math.inf)),
            compute_tier=str(prof.get(P.TIER, "")) or None,
            declared_samples_per_s=prof.get(P.SAMPLES_PER_S),
            declared_uplink_Bps=prof.get(P.UPLINK),
            declared_downlink_Bps=prof.get(P.DOWNLINK),
            declared_reliability=prof.get(P.RELIABILITY),
        )
        self.state, row = core.ensure_client(self.state, cid, declared)
        if P.NUM_EXAMPLES in prof:
            self.num_examples[cid] = int(prof[P.NUM_EXAMPLES])
        if P.REPORT in content and not self.state.fitness.seen[row]:
            k = len(self.expert_keys)
            hist = P.decode_vector(content[P.REPORT][P.HIST], k)
            gate = P.decode_vector(content[P.REPORT][P.GATE_SHARE], k)
            self._observe_fitness(row, hist, gate, None, trained=np.zeros(k, bool))

    def _problem(self, rnd: int, nodes: list[int]) -> AssignmentProblem:
        cids = [self.node_clients[n] for n in nodes]
        rows = np.array([self.state.client_index[c] for c in cids], dtype=np.int64)
        profiles = [self.state.profiles[c] for c in cids]
        memory = np.array([p.memory_bytes for p in profiles], dtype=np.float64)
        epochs = int(self.train_config.get("local-epochs", 1))
        shared = float(self.layout.shared_nbytes)
        costs = [core.expert_time_costs(p, self.expert_bytes, shared, self.num_examples.get(c, 0), epochs) for p, c in zip(profiles, cids)]
        return AssignmentProblem(
            round=rnd,
            client_ids=cids,
            rows=rows,
            memory=memory,
            expert_bytes=self.expert_bytes,
            k_cap=core.capacity_in_experts(memory, self.expert_bytes),
            time_fixed=np.array([c[0] for c in costs], dtype=np.float64),
            time_per_expert=np.array([c[1] for c in costs], dtype=np.float64).reshape(len(cids), -1),
            rng=rng_for(self.seed, "assign", rnd),
            cols=np.arange(len(self.expert_keys)),
            deadline=self.deadline_s,
        )

    def _assign_all_layers(self, problem: AssignmentProblem, solve) -> core.AssignmentResult:
        """``solve(problem)``, layer by layer when the model has several MoE layers."""
        return assign_by_layer(problem, solve, self.expert_keys)

    def _payload(self, arrays: ArrayRecord, keys: list[str]) -> tuple[ArrayRecord, int]:
        names = self.layout.param_names(keys)
        record = ArrayRecord({n: arrays[n] for n in names})
        return record, int(sum(self.layout.nbytes[n] for n in names))

    def _read_reply(self, msg: Message, sent: _Sent):
        """Validate one reply; returns (update, profile observation, round seconds, report)."""
        content = msg.content
        if P.ARRAYS not in content or P.REPORT not in content:
            raise ValueError("reply lacks 'arrays' or 'report'")
        params = _to_numpy(content[P.ARRAYS])
        names = set(self.layout.param_names(sent.keys))
        ok, why = core.validate_update(params, expected_names=names, reference=self._global, norm_bound=self.norm_bound,
                                       layout=self.layout)
        if not ok:
            raise ValueError(why)
        rep = content[P.REPORT]
        k = len(self.expert_keys)
        try:
            tokens = P.decode_vector(rep[P.TOKENS], k, missing_as_nan=False)
            n = int(rep[P.NUM_EXAMPLES])
            secs = [float(rep[key]) for key in (P.DOWN_TIME, P.TRAIN_TIME, P.UP_TIME)]
        except (KeyError, TypeError) as ex:
            raise ValueError(f"malformed report: {ex}") from ex
        held = frozenset(sent.keys)
        token_map = {key: float(tokens[i]) for i, key in enumerate(self.expert_keys) if key in held}
        ok, why = core.validate_report(token_map, held=held, num_samples=n)
        if not ok or not all(math.isfinite(s) and s >= 0 for s in secs):
            raise ValueError(why or f"bad timings {secs}")
        update = core.ClientUpdate(client_id=sent.client_id, params=params, held=held, num_samples=n, tokens=token_map)
        obs = dict(num_samples=n * int(self.train_config.get("local-epochs", 1)), train_time_s=secs[1],
                   bytes_down=sent.bytes_down, down_time_s=secs[0], bytes_up=int(rep[P.BYTES_UP]), up_time_s=secs[2])
        return update, obs, sum(secs), rep

    def _observe_fitness(self, row: int, hist, gate, loss, trained: np.ndarray) -> None:
        f = self.fitness
        # renormalise: an expert's missing loss (not trained) still lets its histogram
        # entry update the pair.
        sig = core.fitness_signal(
            hist, gate, loss, w_hist=f.w_hist, w_gate=f.w_gate, w_loss=f.w_loss, alpha=f.alpha, renormalise=True,
        )
        observed = np.isfinite(sig)
        fitness = core.update_fitness(self.state.fitness, row, np.nan_to_num(sig), trained, observed_mask=observed, beta=f.beta)
        self.state = replace(self.state, fitness=fitness)

    def _learn(self, rnd: int, updates: list, reports: list, observations: dict) -> None:
        """Fold the round into profiles, fitness and load (the core's pure updates)."""
        self.state = replace(self.state, profiles=core.update_profiles(self.state.profiles, observations, ema=self.profile_ema))
        k = len(self.expert_keys)
        for u, rep in zip(updates, reports):
            row = self.state.client_index[u.client_id]
            trained = np.array([key in u.held for key in self.expert_keys])
            hist = P.decode_vector(rep[P.HIST], k)
            gate = P.decode_vector(rep[P.GATE_SHARE], k)
            loss = P.decode_vector(rep[P.EXPERT_LOSS], k)
            loss = np.where(trained, loss, np.nan)
            self._observe_fitness(row, hist, gate, loss, trained)
        tokens, clients = core.round_load([u.held for u in updates], [u.tokens for u in updates], self.expert_keys)
        load = core.update_load(self.state.load, tokens, clients, rnd, **self.load_update_kwargs())
        self.state = core.advance_round(replace(self.state, load=load), rnd)

    def load_update_kwargs(self) -> dict:
        """Settings of the load monitor's price update (the aligned strategy sets a step)."""
        return {"price_step": 0.0}
