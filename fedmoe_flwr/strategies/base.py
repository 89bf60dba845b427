"""The Flower adapter shared by every expert-aware strategy.

(Over 400 lines: one class, its Flower hooks first and the helpers they call after, read top to bottom.)

:class:`ExpertStrategy` is a ``flwr.serverapp.strategy.Strategy`` (Message API). Its hooks
do the Flower work (sample nodes, build and decode messages); the alignment core does the
thinking (:func:`fedmoe_flwr.core.apply_round`, docs/architecture.md#one-round):

- ``configure_train``: sample the cohort (seeded by ``(seed, round)``), ask new nodes for
  their profile with a QUERY message, call :meth:`ExpertStrategy.assign`, and send each node
  an ``ArrayRecord`` with exactly the shared tensors and its experts.
- ``aggregate_train``: decode the replies (:mod:`fedmoe_flwr.protocol`) and apply the round.

Subclasses choose experts in :meth:`~ExpertStrategy.assign`; profile-aware ones may also
narrow the cohort (:meth:`~ExpertStrategy.eligible_nodes`), close rounds early
(:meth:`~ExpertStrategy.round_close`) and move load prices (``price_step``).
All learning state is one :class:`~fedmoe_flwr.core.AlignmentState`.
"""

from __future__ import annotations

import hashlib
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
from fedmoe_flwr.layout import ParamLayout
from fedmoe_flwr.seeding import rng_for, sample_cohort
from fedmoe_flwr.strategies.evaluation import personal_metrics
from fedmoe_flwr.strategies.record import RoundLog


@dataclass
class _Cohort:
    """The round in flight: node id -> what it was sent, and when the round closes."""

    sent: dict[int, core.Sent] = field(default_factory=dict)
    close_s: float | None = None
    paced: bool = False  # close_s comes from the predicted pace, not the deadline
    probe: core.RoundCost | None = None  # the cohort probe's cost (reprobe)


class ExpertStrategy(Strategy):
    """Expert-aware federated training of an MoE model (base of every fedmoe strategy).

    Args:
        layout: which tensors belong to which expert (``fedmoe_flwr.models.param_layout``).
        fraction_train: fraction of connected nodes in each training cohort.
        min_train_nodes: lower bound on the cohort size.
        min_available_nodes: fewer connected nodes than this skips the round (logged).
        fraction_evaluate: fraction of nodes for federated (personalised) evaluation, as in
            Flower's FedAvg (default 1.0): each evaluates the experts :meth:`assign` would
            give it on its held-out split. 0 disables federated evaluation.
        seed: every random choice derives from ``(seed, round, client)``.
        probe: QUERY new nodes for their routing histogram (cold-start fitness).
        reprobe: each round, QUERY the cohort for its routing histograms under the current
            shared tensors (experts zeroed) before assigning, so fitness follows the model
            as it learns even for clients seen once or never trained (cross-device cohorts
            rarely repeat). Its bytes and the slowest answer count in the round's cost.
        deadline_s: round deadline; replies slower than it are dropped and the
            deadline-aware strategies keep assignments within it. None = no deadline.
        robust: what the server trusts in a reply: norm bound, aggregator, clipping, share
            cap, sample drift (:class:`~fedmoe_flwr.core.RobustSettings`; on by default).
        dp: client-level differential privacy (:class:`~fedmoe_flwr.core.DPSettings`; off by
            default): Gaussian noise per aggregation group, epsilon in the round metrics
            (docs/architecture.md#differential-privacy). Needs ``clip=fixed`` and ``aggregator=mean``.
        server_opt, server_lr: ``"avg"``, ``"fedadam"`` or ``"fedyogi"`` server step.
        fitness: signal weights, smoothing and exploration (:class:`~fedmoe_flwr.core.FitnessSettings`).
        profile_ema: smoothing of measured speeds and reliability.
        train_config: extra settings sent in every TRAIN message (``local-epochs``, ``lr``...).
        train_metrics_aggr_fn, evaluate_metrics_aggr_fn: ``(list[RecordDict], weight_key) ->
            MetricRecord``, as in Flower's FedAvg; default: weighted mean by ``num-examples``.
        query_timeout: seconds to wait for QUERY replies.
        evaluate_every: federated evaluation runs on rounds divisible by this.
        lora_aggregation: how LoRA adapters (the layout's ``lora_pairs``) aggregate:
            ``"product"`` (the best rank-r fit of the mean of B @ A) or ``"factors"`` (A and B
            averaged separately, biased; for comparison). See docs/models.md#lora.
        reference_fn: ``(global_params, server_round) -> trained_params`` (dicts of numpy
            arrays by wire name): the server's own local update on its small root sample
            (FLTrust). With ``robust.trust_samples > 0`` each client is weighed by its
            delta's agreement with this one (docs/robustness.md#trust); None = no trust
            weighting. :func:`fedmoe_flwr.server_reference.root_reference` builds one for
            the shipped models.
    """

    name = "expert"
    price_step = 0.0  # the load monitor's dual-price step (aligned sets one)

    def __init__(
        self,
        layout: ParamLayout,
        *,
        fraction_train: float = 0.5,
        min_train_nodes: int = 2,
        min_available_nodes: int = 1,
        fraction_evaluate: float = 1.0,
        seed: int = 0,
        probe: bool = True,
        reprobe: bool = False,
        deadline_s: float | None = None,
        robust: core.RobustSettings | None = None,
        dp: core.DPSettings | None = None,
        server_opt: str = "avg",
        server_lr: float = 1.0,
        fitness: core.FitnessSettings | None = None,
        profile_ema: float = 0.3,
        train_config: dict | None = None,
        train_metrics_aggr_fn: Callable | None = None,
        evaluate_metrics_aggr_fn: Callable | None = None,
        query_timeout: float = 600.0,
        evaluate_every: int = 1,
        lora_aggregation: str = "product",
        reference_fn: Callable[[dict[str, np.ndarray], int], dict[str, np.ndarray]] | None = None,
    ) -> None:
        if not 0.0 < fraction_train <= 1.0:
            raise ValueError(f"fraction_train must be in (0, 1], got {fraction_train}")
        if not layout.expert_keys:
            raise ValueError(f"{type(self).__name__}: the model has no experts; see docs/architecture.md#models")
        self.layout = layout
        self.expert_keys = layout.expert_keys
        self.expert_bytes = np.array([layout.expert_nbytes(k) for k in self.expert_keys], dtype=np.float64)
        self.fraction_train = fraction_train
        self.min_train_nodes = min_train_nodes
        self.min_available_nodes = min_available_nodes
        self.fraction_evaluate = fraction_evaluate
        self.seed = seed
        self.probe = probe
        self.reprobe = reprobe
        self.deadline_s = deadline_s
        self.train_config = dict(train_config or {})
        self.train_metrics_aggr_fn = train_metrics_aggr_fn
        self.evaluate_metrics_aggr_fn = evaluate_metrics_aggr_fn
        self.query_timeout = query_timeout
        self.evaluate_every = max(1, int(evaluate_every))
        self.reference_fn = reference_fn
        robust, dp = robust or core.RobustSettings(), dp or core.DPSettings()
        problems = core.dp_problems(dp, robust)
        if problems:
            raise ValueError("; ".join(problems))
        self.settings = core.RoundSettings(
            fitness=fitness or core.FitnessSettings(), robust=robust, dp=dp, server_opt=server_opt,
            server_lr=server_lr, profile_ema=profile_ema, price_step=self.price_step,
            local_epochs=int(self.train_config.get("local-epochs", 1)), lora_aggregation=lora_aggregation,
        )
        self.state = core.init_state(self.expert_keys)
        self.node_clients: dict[int, str] = {}  # Flower node id -> stable client id it trains under
        self.node_claims: dict[int, str] = {}  # Flower node id -> the client id it declared
        self._registered_now: set[int] = set()  # nodes whose profile query ran this round
        self.num_examples: dict[str, int] = {}
        self.sim_time_total = 0.0
        self.bytes_total = 0
        self.last = RoundLog()
        self._cohort = _Cohort()
        self._global: dict[str, np.ndarray] | None = None
        self.privacy = None  # the accountant (fedmoe_flwr.privacy.PrivacyLedger) when DP is on
        if dp.dp_enabled:
            from fedmoe_flwr.privacy import PrivacyLedger

            self.privacy = PrivacyLedger(dp.dp_noise_multiplier, dp.dp_delta)

    @property
    def fitness(self) -> core.FitnessSettings:
        return self.settings.fitness

    @property
    def _sent(self) -> dict[int, core.Sent]:
        return self._cohort.sent

    @property
    def _close(self) -> float | None:
        return self._cohort.close_s

    # ------------------------------------------------------------------ what subclasses change
    def assign(self, problem: core.AssignmentProblem) -> core.AssignmentResult:
        """Choose each cohort client's experts (``result.x``: [C, K] bool over ``problem.cols``)."""
        raise NotImplementedError

    def eligible_nodes(self, server_round: int, nodes: list[int]) -> list[int]:
        """The nodes the cohort is drawn from (default: every known node)."""
        return nodes

    def round_close(self, problem: core.AssignmentProblem, x: np.ndarray) -> float | None:
        """When the server stops waiting for this round's replies (s); None = for all."""
        return self.deadline_s

    def personal_experts(self, problem: core.AssignmentProblem) -> core.AssignmentResult:
        """The experts a client would get for personalised evaluation (default: :meth:`assign`)."""
        return self.assign(problem)

    # ------------------------------------------------------------------ Flower hooks
    def summary(self) -> None:
        log(INFO, "\t├──> %s: %d experts, fraction_train %.2f, deadline %s s",
            type(self).__name__, len(self.expert_keys), self.fraction_train, self.deadline_s)
        log(INFO, "\t└──> fitness %s", self.fitness)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Sample a cohort, assign its experts, send each node the shared tensors and its experts."""
        self._global = {name: arr.numpy() for name, arr in arrays.items()}
        self._cohort = _Cohort()
        self.last = RoundLog()
        nodes = self.eligible_nodes(server_round, self._known_nodes(grid, arrays, server_round))
        robust = self.settings.robust  # without the trust check nobody is refused: skip the pass over all nodes
        out = core.sitting_out(self.state.profiles, [self.node_clients[n] for n in nodes], server_round,
                               robust.sit_out_after) if robust.trust_samples > 0 else set()
        exclude: set[int] = set()
        if out:  # refused by the trust check more often than not: its place goes to another client
            exclude = {n for n in nodes if self.node_clients[n] in out}
            self.last.metrics["sitting_out"] = float(len(out))
        cohort = self._sample(nodes, server_round, self.fraction_train, self.min_train_nodes, "train", exclude)
        if not cohort:
            return []
        if self.reprobe:
            self._cohort.probe = self._probe_cohort(server_round, cohort, arrays, grid)
        problem = self._problem(server_round, cohort)
        result = core.assign_by_layer(problem, self.assign, self.expert_keys)
        close = self.round_close(problem, result.x)
        self._cohort.close_s, self._cohort.paced = close, close is not None and close != self.deadline_s
        self.last.metrics.update(solve_time_s=result.solve_time_s, assign_relaxed=float(len(result.relaxed)),
                                 num_skipped=float((~result.x.any(axis=1)).sum()))
        conf = {**self.train_config, **dict(config), "server-round": server_round}
        messages = self._messages(cohort, problem.client_ids, result.x, arrays, conf, MessageType.TRAIN)
        for msg, cid in messages:
            keys = tuple(msg.content[P.CONFIG]["experts"])
            self._cohort.sent[msg.metadata.dst_node_id] = core.Sent(cid, keys, P.record_nbytes(msg.content[P.ARRAYS]))
            self.last.assignment[cid] = list(keys)
        return [m for m, _ in messages]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode the replies, apply the round in the core, return the new model and client metrics."""
        t0 = time.perf_counter()
        inputs, contents = self._decode_train_replies(server_round, replies)
        inputs = replace(inputs, reference=self._reference(server_round, inputs))
        self.state, new_params, stats = core.apply_round(self.state, self._global, self.layout, inputs, self.settings)
        for cid in stats.accepted:  # the server learns a node's data size from its replies
            self.num_examples.setdefault(cid, inputs.received[cid].report.num_examples)
        for cid, why in sorted({**stats.dropped, **stats.rejected}.items()):
            log(INFO, "round %d: update of client %s not aggregated: %s", server_round, cid, why)
        self._record(stats, t0)
        self._account(stats)
        if new_params is None:
            return None, self._client_metrics(stats, contents)
        self._global = new_params
        return ArrayRecord({n: Array(np.ascontiguousarray(a)) for n, a in new_params.items()}), self._client_metrics(stats, contents)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Send sampled nodes the experts they would get, for evaluation on their held-out data."""
        if self.fraction_evaluate <= 0 or server_round % self.evaluate_every:
            return []
        nodes = self._sample(self._known_nodes(grid, arrays, server_round), server_round, self.fraction_evaluate, 1, "evaluate")
        if not nodes:
            return []
        problem = self._problem(server_round, nodes)
        result = core.assign_by_layer(problem, self.personal_experts, self.expert_keys)
        conf = {**dict(config), "server-round": server_round}
        return [m for m, _ in self._messages(nodes, problem.client_ids, result.x, arrays, conf, MessageType.EVALUATE)]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Weighted mean of every scalar the clients report, ``personal_``-prefixed; failures counted."""
        record, server = personal_metrics(list(replies), self.evaluate_metrics_aggr_fn)
        self.last.metrics.update(server)
        return record

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
            **({"dp_rates": self.privacy.state_dict()} if self.privacy is not None else {}),
        }

    def load_state_dict(self, d: dict) -> None:
        arrays = {k: np.asarray(v) for k, v in d.get("alignment_arrays", {}).items()}
        self.state = core.state_from_dict(d["alignment"], arrays)
        self.num_examples = {k: int(v) for k, v in d["num_examples"].items()}
        self.sim_time_total = float(d["sim_time_total"])
        self.bytes_total = int(d["bytes_total"])
        if self.privacy is not None:
            self.privacy.load_state_dict(d.get("dp_rates", []))

    # ------------------------------------------------------------------ helpers
    def _known_nodes(self, grid: Grid, arrays: ArrayRecord, rnd: int) -> list[int]:
        """Connected nodes with a known profile, ordered by stable client id.

        Nodes never seen get a QUERY (profile, and the routing histogram when probing);
        nodes that do not answer, or answer with a malformed profile, are left out this round.
        Ordering by client id keeps cohorts independent of Flower's random node ids.
        """
        nodes = [int(n) for n in grid.get_node_ids()]
        new = [n for n in nodes if n not in self.node_clients]
        self._registered_now = set(new)
        if new:
            content = {P.CONFIG: ConfigRecord({P.PROBE: self.probe, "server-round": rnd})}
            if self.probe:
                content[P.ARRAYS] = ArrayRecord({n: arrays[n] for n in self.layout.param_names([])})
            msgs = [Message(RecordDict(dict(content)), dst_node_id=n, message_type=MessageType.QUERY) for n in new]
            self._register(grid.send_and_receive(msgs, timeout=self.query_timeout), live=set(nodes))
        known = [n for n in nodes if n in self.node_clients]
        return sorted(known, key=lambda n: self.node_clients[n])

    def _register(self, replies: Iterable[Message], live: set[int]) -> None:
        """Bind nodes to client ids (:func:`~fedmoe_flwr.core.identity.bind_client_ids`) and fold
        their profiles (and probe histograms) into the state, all in one step
        (docs/robustness.md#identity).

        A claim of an id bound to another connected node is refused (logged) and the node
        trains under a fresh id; a node that comes back under a new node id takes its id over,
        and its declared memory can only shrink (a profile cannot grow its own budget by
        re-registering). One ``ensure_clients`` and one fitness update for the whole batch: one
        call per reply copied the known-client arrays each time (O(new x known) at start-up).
        """
        decoded: dict[int, tuple] = {}
        for reply in replies:
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "node %s did not answer the profile query", node_id)
                continue
            try:
                decoded.setdefault(node_id, P.decode_probe(reply.content, len(self.expert_keys)))
            except P.ProtocolError as ex:
                log(WARNING, "node %s: profile query reply refused: %s", node_id, ex)
        bound = {c: n for n, c in self.node_clients.items()}  # client id -> node id
        claims = [core.Claim(n, prof.client_id, _digest(prof, hist, gate)) for n, (prof, hist, gate) in decoded.items()]
        ids = core.bind_client_ids(claims, bound, live)
        declared: dict[str, core.ClientProfile] = {}
        probes: dict[str, tuple] = {}
        for node_id, cid in ids.items():
            prof, hist, gate = decoded[node_id]
            if cid != prof.client_id:
                self.last.refused_claims[node_id] = (prof.client_id, cid)
                log(WARNING, "node %s claims client id %r, already bound to connected node %s; claim refused, "
                    "registered as %r", node_id, prof.client_id, bound.get(prof.client_id), cid)
            holder = bound.get(cid)
            if holder is not None and holder != node_id:  # the same client back under a new node id
                del self.node_clients[holder], self.node_claims[holder]
            memory = math.inf if prof.expert_memory_bytes is None else prof.expert_memory_bytes
            if cid in self.state.profiles:
                memory = min(memory, self.state.profiles[cid].memory_bytes)
            self.node_clients[node_id], self.node_claims[node_id], bound[cid] = cid, prof.client_id, node_id
            declared[cid] = core.ClientProfile(
                memory_bytes=memory,
                compute_tier=prof.tier or None,
                declared_samples_per_s=prof.samples_per_s,
                declared_uplink_Bps=prof.uplink_Bps,
                declared_downlink_Bps=prof.downlink_Bps,
                declared_reliability=prof.reliability,
            )
            if prof.num_examples:
                self.num_examples[cid] = prof.num_examples
            if hist is not None and self._signal_problem(hist, gate) is None:
                probes.setdefault(cid, (hist, gate))  # the first histogram of a cold row counts
        if not declared:
            return
        self.state, _ = core.ensure_clients(self.state, list(declared), declared)
        cold = [c for c in probes if not self.state.fitness.seen[self.state.client_index[c]]]
        if cold:
            no_expert = np.zeros(len(self.expert_keys), bool)
            self.state = core.observe_fitness_batch(self.state, cold, [probes[c][0] for c in cold],
                                                    [probes[c][1] for c in cold], [None] * len(cold),
                                                    [no_expert] * len(cold), self.fitness)

    def _probe_cohort(self, rnd: int, cohort: list[int], arrays: ArrayRecord, grid: Grid) -> core.RoundCost:
        """QUERY the cohort's routing histograms under the current shared tensors and fold
        them into fitness (``reprobe``); returns the probe's cost. Nodes registered this
        round were just probed with the same tensors; a reply that fails to decode, names
        another client or carries a histogram off the simplex is ignored (logged)."""
        shared = ArrayRecord({n: arrays[n] for n in self.layout.param_names([])})
        conf = ConfigRecord({P.PROBE: True, P.ZERO_EXPERTS: True, "server-round": rnd})
        asked = [n for n in cohort if n not in self._registered_now]
        msgs = [Message(RecordDict({P.CONFIG: conf, P.ARRAYS: shared}), dst_node_id=n, message_type=MessageType.QUERY)
                for n in asked]
        heard: dict[str, tuple] = {}
        seconds = []
        for reply in grid.send_and_receive(msgs, timeout=self.query_timeout) if msgs else []:
            node_id = reply.metadata.src_node_id
            if reply.has_error() or node_id not in asked or self.node_clients[node_id] in heard:
                continue  # a failed probe keeps the row as it was; a second reply is ignored
            try:
                prof, hist, gate = P.decode_probe(reply.content, len(self.expert_keys))
                took = P.decode_probe_time(reply.content)
            except P.ProtocolError as ex:
                log(WARNING, "round %d: node %s: probe reply refused: %s", rnd, node_id, ex)
                continue
            why = "it names another client" if prof.client_id != self.node_claims[node_id] else self._signal_problem(hist, gate)
            if why is not None:
                log(WARNING, "round %d: node %s: probe reply refused: %s", rnd, node_id, why)
                continue
            heard.setdefault(self.node_clients[node_id], (hist, gate))
            seconds.append(took)
        if heard:
            cids = sorted(heard)  # client-id order: the fold does not depend on reply order
            none = np.zeros(len(self.expert_keys), bool)
            self.state = core.observe_fitness_batch(self.state, cids, [heard[c][0] for c in cids], [heard[c][1] for c in cids],
                                                    [None] * len(cids), [none] * len(cids), self.fitness)
        return core.probe_cost([P.record_nbytes(shared)] * len(msgs), seconds)

    def _signal_problem(self, hist: np.ndarray | None, gate: np.ndarray | None) -> str | None:
        """Why a probe's histogram or gate share cannot be folded into fitness, or None."""
        if hist is None or gate is None:
            return "no routing histogram"
        layer_of = self.layout.layer_of
        return core.signal_problem(hist, layer_of, "routing histogram") or core.signal_problem(gate, layer_of, "gate share")

    def _sample(self, nodes: list[int], rnd: int, fraction: float, minimum: int, purpose: str,
                exclude: set[int] = frozenset()) -> list[int]:
        if len(nodes) < self.min_available_nodes:
            log(WARNING, "round %d: %d nodes available, %d required; skipping %s", rnd, len(nodes), self.min_available_nodes, purpose)
            return []
        return sample_cohort(nodes, self.seed, purpose, rnd, fraction, minimum, exclude)

    def _problem(self, rnd: int, nodes: list[int]) -> core.AssignmentProblem:
        return core.build_problem(
            self.state, [self.node_clients[n] for n in nodes], rnd=rnd, expert_bytes=self.expert_bytes,
            shared_bytes=float(self.layout.shared_nbytes), num_examples=self.num_examples,
            local_epochs=self.settings.local_epochs, deadline=self.deadline_s, rng=rng_for(self.seed, "assign", rnd),
        )

    def _messages(self, nodes, client_ids, x, arrays: ArrayRecord, conf: dict, kind: str) -> list[tuple[Message, str]]:
        """One message per node with its experts; nodes given no expert get none (they cannot route)."""
        out = []
        for node_id, cid, row in zip(nodes, client_ids, x):
            keys = [self.expert_keys[k] for k in np.flatnonzero(row)]
            if not keys:
                continue
            record = ArrayRecord({n: arrays[n] for n in self.layout.param_names(keys)})
            content = RecordDict({P.ARRAYS: record, P.CONFIG: ConfigRecord({**conf, "experts": keys})})
            out.append((Message(content, dst_node_id=node_id, message_type=kind), cid))
        return out

    def _decode_train_replies(self, rnd: int, replies: Iterable[Message]) -> tuple[core.RoundInputs, dict]:
        """Decode each reply once; a reply nobody asked for, or a second one, is ignored (logged)."""
        received, failed, malformed, contents = {}, {}, {}, {}
        for msg in replies:
            sent = self._cohort.sent.get(msg.metadata.src_node_id)
            if sent is None or sent.client_id in contents:
                log(WARNING, "round %d: reply from node %s %s; ignored", rnd, msg.metadata.src_node_id,
                    "that was not sent a TRAIN message" if sent is None else "already answered")
                continue
            cid = sent.client_id
            contents[cid] = None if msg.has_error() else msg.content
            if msg.has_error():
                failed[cid] = (msg.error.reason or "error").splitlines()[0][:200]
                continue
            try:
                report = P.decode_report(msg.content, len(self.expert_keys))
                received[cid] = core.Received(P.decode_arrays(msg.content), report, P.record_nbytes(msg.content[P.ARRAYS]))
            except P.ProtocolError as ex:
                malformed[cid] = f"malformed reply: {ex}"
        sent = {s.client_id: s for s in self._cohort.sent.values()}
        noise_rng = rng_for(self.seed, "dp-noise", rnd) if self.privacy is not None else None
        inputs = core.RoundInputs(rnd, sent, received, failed, malformed, self._cohort.close_s,
                                  fallback_close_s=self.deadline_s, paced=self._cohort.paced,
                                  registered=self.num_examples, noise_rng=noise_rng, probe=self._cohort.probe)
        if core.effective_close(inputs) != inputs.close_s:
            log(WARNING, "round %d: every reply was slower than the predicted pace (%.1f s); waiting for %s instead",
                rnd, inputs.close_s, "the deadline" if self.deadline_s is not None else "all replies")
        return inputs, contents

    def _reference(self, rnd: int, inputs: core.RoundInputs) -> dict[str, np.ndarray] | None:
        """The server's reference delta for the trust check, when it has replies to check."""
        if self.reference_fn is None or self.settings.robust.trust_samples <= 0 or not inputs.received:
            return None
        trained = self.reference_fn(self._global, rnd)
        return {n: np.asarray(a, np.float64) - self._global[n] for n, a in trained.items() if n in self._global}

    def _client_metrics(self, stats: core.RoundStats, contents: dict) -> MetricRecord:
        """Aggregated ClientApp-side train metrics: the train loss and the user's own scalars."""
        if self.train_metrics_aggr_fn is not None:
            good = [contents[c] for c in stats.accepted]
            return self.train_metrics_aggr_fn(good, P.NUM_EXAMPLES) if good else MetricRecord()
        out = dict(stats.client_metrics)
        if stats.train_loss is not None:
            out["train_loss"] = stats.train_loss
        return MetricRecord(out)

    def _account(self, stats: core.RoundStats) -> None:
        """Compose the round's noisy releases into the accountant (DP on, something aggregated)."""
        if self.privacy is not None and stats.accepted:
            from fedmoe_flwr.privacy import sampling_rates

            self.privacy.step(sampling_rates([s.experts for s in self._cohort.sent.values()], self.expert_keys,
                                             len(self.node_clients)))
            self.last.metrics.update(self.privacy.metrics())

    def _record(self, stats: core.RoundStats, t0: float) -> None:
        """The server-side figures of the round into :attr:`last` (read by the run recorder)."""
        self.bytes_total += stats.bytes_down + stats.bytes_up
        self.sim_time_total += stats.sim_time_s
        self.last.metrics.update(stats.metrics(self.state))
        self.last.metrics.update(bytes_total=float(self.bytes_total), sim_time_total_s=self.sim_time_total,
                                 num_sent=float(len(self._cohort.sent)), aggregate_time_s=time.perf_counter() - t0)
        self.last = replace(self.last, dropped=dict(stats.dropped), rejected=dict(stats.rejected), weights=dict(stats.weights),
                            trust=dict(stats.trust))


def _digest(prof: P.NodeProfile, hist: np.ndarray | None, gate: np.ndarray | None) -> str:
    """A reply's fingerprint: orders claims of one client id made in the same batch."""
    h = hashlib.sha256(repr(prof).encode())
    for a in (hist, gate):
        h.update(b"-" if a is None else np.ascontiguousarray(a, np.float64).tobytes())
    return h.hexdigest()
