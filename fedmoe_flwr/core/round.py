"""The server half of one round as one pure function (docs/architecture.md#one-round).

``apply_round(state, params, layout, inputs, settings) -> (state, params, stats)``, in the
style of fedjax's ``apply``: the Flower adapter decodes the replies
(:mod:`fedmoe_flwr.protocol`) and hands them here; everything the round decides happens
below, in this order:

1. classify each cohort client: no reply or an error -> dropped; an update that fails
   validation, or points away from the server's reference update -> rejected (with its
   reason); a reply slower than the round's close -> dropped; else accepted;
2. aggregate the accepted updates per expert and take the server-optimizer step;
3. fold the round into profiles (every cohort client), fitness (accepted clients) and load;
4. account bytes and simulated time (:func:`~fedmoe_flwr.core.accounting.round_cost`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Mapping

import numpy as np

from ..layout import ParamLayout
from .accounting import RoundCost, round_cost
from .aggregate import ClientUpdate, aggregate_experts, server_step
from .fitness import FitnessSettings, fitness_signal, update_fitness
from .load import load_cv, round_load, update_load
from .privacy import SHARED, DPSettings, add_group_noise
from .profiles import update_profiles
from .defences import (capture_max, check_directions, check_trust, clip_bound, delta_norms, record_influence, record_refusals,
                       trusted_updates)
from .robust import RobustSettings, quorum_scale, signal_consistency, signal_problem
from .state import AlignmentState, advance_round
from .validate import validate_report, validate_update


@dataclass(frozen=True)
class ClientReport:
    """One TRAIN reply's statistics, decoded (:func:`fedmoe_flwr.protocol.decode_report`).

    Per-expert vectors are ``[K]`` in ``ParamLayout.expert_keys`` order, NaN where nothing
    was observed. ``metrics`` are the user's own scalars, passed through.
    """

    num_examples: int
    train_loss: float
    down_s: float
    train_s: float
    up_s: float
    hist: np.ndarray
    gate: np.ndarray
    tokens: np.ndarray
    expert_loss: np.ndarray
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        """The client's whole round: download, compute and upload."""
        return self.down_s + self.train_s + self.up_s


@dataclass(frozen=True)
class Sent:
    """What one cohort client was sent: its experts and the bytes of its TRAIN message."""

    client_id: str
    experts: tuple[str, ...]
    bytes_down: int


@dataclass(frozen=True)
class Received:
    """A decoded TRAIN reply: trained tensor values, its report, the bytes it carried."""

    params: dict[str, np.ndarray]
    report: ClientReport
    bytes_up: int


@dataclass(frozen=True)
class RoundInputs:
    """What the server has at the end of a round, keyed by client id.

    ``failed`` holds clients whose reply was an error (dropped), ``malformed`` those whose
    reply could not be decoded (rejected); a sent client in none of the maps timed out.
    ``close_s`` is when the server stopped waiting (None = it waited for every reply).
    ``fallback_close_s`` is set when ``close_s`` is a predicted pace rather than the deadline:
    if every reply is slower than the pace, the prediction was wrong and the round closes at
    the fallback (the deadline, or None = all replies) instead of dropping every update.
    ``registered`` holds each client's registered data size (the cap of its sample claims).
    ``noise_rng`` draws the differential-privacy noise (seeded by ``(seed, round)``; needed
    only when ``settings.dp`` is on). ``reference`` is the server's own delta (trained minus
    global) on its root sample from the round's global parameters, by tensor name; with
    ``settings.robust.trust_samples > 0`` it weighs each client by its agreement
    (:func:`~fedmoe_flwr.core.robust.trust_factors`); None = no trust weighting.
    ``probe`` is the cost of the cohort probe the server ran before assigning (``reprobe``),
    added to the round's bytes and time; None = no probe this round.
    """

    round: int
    sent: Mapping[str, Sent]
    received: Mapping[str, Received]
    failed: Mapping[str, str] = field(default_factory=dict)
    malformed: Mapping[str, str] = field(default_factory=dict)
    close_s: float | None = None
    fallback_close_s: float | None = None
    paced: bool = False
    registered: Mapping[str, float] = field(default_factory=dict)
    noise_rng: np.random.Generator | None = None
    reference: Mapping[str, np.ndarray] | None = None
    probe: RoundCost | None = None


@dataclass(frozen=True)
class RoundSettings:
    """How a round folds replies into the state (set once per strategy)."""

    fitness: FitnessSettings = field(default_factory=FitnessSettings)
    robust: RobustSettings = field(default_factory=RobustSettings)
    dp: DPSettings = field(default_factory=DPSettings)
    server_opt: str = "avg"
    server_lr: float = 1.0
    profile_ema: float = 0.3
    price_step: float = 0.0
    local_epochs: int = 1
    lora_aggregation: str = "product"  # LoRA pairs: product (core.lora) | factors (biased)


@dataclass(frozen=True)
class RoundStats:
    """What a round did: who was aggregated, who was not and why, and what it cost."""

    accepted: tuple[str, ...]
    rejected: dict[str, str]
    dropped: dict[str, str]
    bytes_down: int
    bytes_up: int
    sim_time_s: float
    train_loss: float | None
    client_metrics: dict[str, float]
    # client id -> the weights the server gave it (after the robust caps): "shared" (its
    # samples) and each held expert key (its tokens); what an audit of influence reads
    weights: dict[str, dict[str, float]] = field(default_factory=dict)
    trust: dict[str, float] = field(default_factory=dict)  # client id -> cosine with the reference update
    noise_std: dict[str, float] = field(default_factory=dict)  # DP noise std per group ("shared", expert keys)
    fallbacks: int = 0  # groups too small for the krum/multikrum/bulyan aggregator (combined by the median)

    def metrics(self, state: AlignmentState) -> dict[str, float]:
        """The server-side figures of the round (the run's metrics rows)."""
        out = {
            "bytes_down": float(self.bytes_down), "bytes_up": float(self.bytes_up),
            "sim_round_time_s": float(self.sim_time_s),
            "load_cv": load_cv(state.load.clients_last), "token_load_cv": load_cv(state.load.tokens_last),
            "num_aggregated": float(len(self.accepted)),
            "num_dropped": float(len(self.dropped)), "num_rejected": float(len(self.rejected)),
            "experts_trained_total": float((state.load.clients_total > 0).sum()),
            "capture_max": capture_max(state),
        }
        if self.fallbacks:
            out["aggregator_fallbacks"] = float(self.fallbacks)
        if self.train_loss is not None:
            out["train_loss"] = self.train_loss
        if self.noise_std:
            out["dp_noise_std_shared"] = self.noise_std.get(SHARED, 0.0)
            out["dp_noise_std_expert_max"] = max((v for k, v in self.noise_std.items() if k != SHARED), default=0.0)
        return out


def observe_fitness(state: AlignmentState, client_id: str, hist, gate, loss, trained: np.ndarray,
                    settings: FitnessSettings) -> AlignmentState:
    """Fold one client's per-expert signals into its fitness row (docs/architecture.md#fitness).

    Entries are renormalised over the signals observed there: the loss of an expert the
    client did not train is missing, its histogram entry still updates the pair.
    """
    return observe_fitness_batch(state, [client_id], [hist], [gate], [loss], [trained], settings)


def observe_fitness_batch(state: AlignmentState, client_ids: list[str], hists: list, gates: list, losses: list,
                          trained: list, settings: FitnessSettings) -> AlignmentState:
    """:func:`observe_fitness` for several distinct clients at once (same rows as one call each).

    One ``update_fitness`` over all their rows copies the ``[known clients, K]`` arrays once,
    not once per client: folding a 1,000-client cohort into 100,000 known clients one by
    one would copy ~100 GB.
    """
    if not client_ids:
        return state
    f = settings
    sig = np.stack([fitness_signal(h, g, l, w_hist=f.w_hist, w_gate=f.w_gate, w_loss=f.w_loss, alpha=f.loss_alpha,
                                   renormalise=True) for h, g, l in zip(hists, gates, losses)])
    rows = np.array([state.client_index[c] for c in client_ids], dtype=np.int64)
    fitness = update_fitness(state.fitness, rows, np.nan_to_num(sig), np.stack(trained),
                             observed_mask=np.isfinite(sig), beta=f.beta)
    return replace(state, fitness=fitness)


def check_reply(reply: Received, sent: Sent, params: Mapping[str, np.ndarray], layout: ParamLayout,
                norm_bound: float | None) -> str | None:
    """Why a decoded reply must not be aggregated, or None when it may."""
    ok, why = validate_update(reply.params, expected_names=set(layout.param_names(sent.experts)),
                              reference=params, norm_bound=norm_bound, layout=layout)
    if not ok:
        return why
    ok, why = validate_report(_token_map(reply, sent, layout), held=sent.experts, num_samples=reply.report.num_examples)
    if not ok:
        return why
    return signal_problem(reply.report.hist, layout.layer_of, "routing histogram") or signal_problem(
        reply.report.gate, layout.layer_of, "gate share")


def _dp_weights(updates: list[ClientUpdate], settings: RoundSettings) -> list[ClientUpdate]:
    """Under differential privacy every contributor weighs 1 (the noise is calibrated to an
    unweighted mean); otherwise the updates as they are."""
    if not settings.dp.dp_enabled:
        return updates
    return [replace(u, num_samples=1, tokens={k: 1.0 for k in u.tokens}) for u in updates]


def _dp_noise(delta, agg, num_updates: int, layout: ParamLayout, settings: RoundSettings, rng):
    """The aggregated delta with each group's Gaussian noise (:mod:`.privacy`)."""
    if rng is None:
        raise ValueError("differential privacy needs RoundInputs.noise_rng (a generator seeded by (seed, round))")
    contributors = {SHARED: num_updates, **{k: int(c) for k, c in agg["expert_clients"].items() if c > 0}}
    return add_group_noise(delta, layout, contributors, agg["row_masks"], settings.dp.dp_noise_multiplier,
                           float(settings.robust.clip_norm), rng)


def _token_map(reply: Received, sent: Sent, layout: ParamLayout) -> dict[str, float]:
    held = set(sent.experts)
    return {k: float(t) for k, t in zip(layout.expert_keys, reply.report.tokens) if k in held}


def _weighted_mean(values: list[float], weights: list[float]) -> float | None:
    pairs = [(v, w) for v, w in zip(values, weights) if math.isfinite(v)]
    if not pairs or sum(w for _, w in pairs) <= 0:
        return None
    return float(np.average([v for v, _ in pairs], weights=[w for _, w in pairs]))


def _client_metrics(reports: list[ClientReport]) -> dict[str, float]:
    """Each user metric every accepted client reported, weighted by examples (as FedAvg)."""
    if not reports:
        return {}
    keys = set.intersection(*(set(r.metrics) for r in reports))
    weights = [float(r.num_examples) for r in reports]
    return {k: _weighted_mean([r.metrics[k] for r in reports], weights) for k in sorted(keys)}


def effective_close(inputs: RoundInputs) -> float | None:
    """When the round closed: the paced close, unless every reply missed it (then the fallback)."""
    seconds = [r.report.seconds for r in inputs.received.values()]
    if inputs.paced and seconds and inputs.close_s is not None and min(seconds) > inputs.close_s:
        return inputs.fallback_close_s
    return inputs.close_s


def apply_round(state: AlignmentState, params: Mapping[str, np.ndarray], layout: ParamLayout,
                inputs: RoundInputs, settings: RoundSettings):
    """The server half of one round (module doc). Returns ``(state, new_params | None, stats)``.

    ``new_params`` is None when nothing was aggregated (the global model stays as it is).
    Clients are visited in client-id order, so floating-point sums do not depend on the
    order replies arrived in.
    """
    close = effective_close(inputs)
    rejected, dropped = dict(inputs.malformed), dict(inputs.failed)
    accepted: list[tuple[str, Received]] = []
    observations: dict[str, dict] = {}
    epochs = settings.local_epochs
    for cid in sorted(inputs.sent):
        sent, reply = inputs.sent[cid], inputs.received.get(cid)
        if reply is None:
            if cid not in rejected:
                dropped.setdefault(cid, "no reply (timeout)")
            observations[cid] = {"completed": False}
            continue
        why = check_reply(reply, sent, params, layout, settings.robust.norm_bound)
        if why is not None:
            rejected[cid] = why
            observations[cid] = {"completed": False}
            continue
        rep = reply.report
        measured = dict(num_samples=rep.num_examples * epochs, train_time_s=rep.train_s, bytes_down=sent.bytes_down,
                        down_time_s=rep.down_s, bytes_up=reply.bytes_up, up_time_s=rep.up_s)
        late = close is not None and rep.seconds > close
        if late:
            dropped[cid] = f"missed the deadline ({rep.seconds:.1f} s > {close:.1f} s)"
        else:
            accepted.append((cid, reply))
        observations[cid] = {**measured, "completed": not late}

    accepted = check_directions(accepted, params, layout, settings.robust.min_agreement, rejected)
    for cid in rejected:  # a reply the direction check rejected did not complete the round either
        observations[cid] = {**observations.get(cid, {}), "completed": False}
    # one the trust check refuses did its work in time: its profile (reliability) is unchanged
    reference = inputs.reference if settings.robust.trust_samples > 0 else None
    checked = [cid for cid, _ in accepted]
    checked_norms = delta_norms(accepted, inputs.sent, params, layout) if reference is not None else None
    accepted, trust, cosines = check_trust(accepted, params, reference, rejected)
    refused = sorted(set(checked) - {cid for cid, _ in accepted})
    new_params, noise, fallbacks = None, {}, 0
    updates = trusted_updates(accepted, inputs, layout, settings, trust, state)
    aggregated = _dp_weights(updates, settings)
    if updates:
        _, delta, agg = aggregate_experts(dict(params), aggregated, layout,
                                          method=settings.robust.aggregator,
                                          clip_norm=clip_bound(updates, params, layout, settings, trust, checked_norms),
                                          lora=settings.lora_aggregation,
                                          byzantine_fraction=settings.robust.byzantine_fraction)
        fallbacks = len(agg["fallbacks"])
        if settings.dp.dp_enabled:
            delta, noise = _dp_noise(delta, agg, len(updates), layout, settings, inputs.noise_rng)
        step = quorum_scale(len(accepted), len(checked), settings.robust.trust_quorum)
        if step < 1.0:  # after the noise: post-processing, the privacy accounting is unchanged
            delta = {n: d * step for n, d in delta.items()}
        new_params, opt_state = server_step(dict(params), delta, state.opt_state, kind=settings.server_opt,
                                            lr=settings.server_lr, touched=set(agg["touched"]), row_masks=agg["row_masks"])
        state = replace(state, opt_state=opt_state)

    state = replace(state, profiles=update_profiles(state.profiles, observations, ema=settings.profile_ema))
    state = record_refusals(state, refused, inputs.round)
    keys, layer_of = layout.expert_keys, layout.layer_of
    trained = [np.array([k in u.held for k in keys]) for u in updates]
    silent = np.full(len(keys), np.nan)
    signals = []  # (hist, gate, loss); a client whose histogram contradicts its tokens has no say (still counted)
    for m, (_, r) in zip(trained, accepted):
        heard = signal_consistency(r.report.hist, r.report.tokens, m, layer_of) >= settings.robust.min_consistency
        signals.append((r.report.hist, r.report.gate, np.where(m, r.report.expert_loss, np.nan)) if heard else (silent,) * 3)
    state = observe_fitness_batch(state, [cid for cid, _ in accepted], [h for h, _, _ in signals], [g for _, g, _ in signals],
                                  [lo for _, _, lo in signals], trained, settings.fitness)
    state = record_influence(state, aggregated, keys)
    tokens, clients = round_load([u.held for u in updates], [u.tokens for u in updates], keys)
    load = update_load(state.load, tokens, clients, inputs.round, price_step=settings.price_step)
    state = advance_round(replace(state, load=load), inputs.round)

    reports = [r.report for _, r in accepted]
    cost = round_cost([s.bytes_down for s in inputs.sent.values()], [(r.report.seconds, r.bytes_up) for _, r in accepted],
                      close, incomplete=bool(dropped), before=inputs.probe)
    stats = RoundStats(
        accepted=tuple(cid for cid, _ in accepted), rejected=rejected, dropped=dropped,
        bytes_down=cost.bytes_down, bytes_up=cost.bytes_up, sim_time_s=cost.sim_time_s,
        train_loss=_weighted_mean([r.train_loss for r in reports], [float(r.num_examples) for r in reports]),
        client_metrics=_client_metrics(reports),
        weights={u.client_id: {"shared": float(u.num_samples), **u.tokens} for u in aggregated},
        trust=cosines, noise_std=noise, fallbacks=fallbacks,
    )
    return state, new_params, stats
