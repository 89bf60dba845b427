"""The server's defences on one round's accepted replies (docs/robustness.md), used by
:func:`~fedmoe_flwr.core.round.apply_round` in this order: the direction check, the trust
check against the server's reference update, the weights the server can defend (sample and
token claims, share and capture caps), the clipping bound; after aggregation, each client's
share of every expert's weight is added to ``fitness.influence``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Mapping

import numpy as np

from ..layout import ParamLayout
from .aggregate import ClientUpdate
from .profiles import ClientProfile
from .robust import (cap_capture, cap_shares, direction_scores, median_norm, reference_cosine, sits_out,
                     token_weights, trust_factors, trusted_samples)
from .state import AlignmentState

if TYPE_CHECKING:  # the round's types; round.py imports this module
    from .round import Received, RoundInputs, RoundSettings, Sent


def _rounds(influence: np.ndarray) -> np.ndarray:
    """``[K]`` rounds each expert was aggregated: a column of ``influence`` gains exactly 1 per
    such round. Rounded, because a float sum over clients can differ in its last bit between
    processes (SIMD reductions depend on alignment), and every backend must decide alike."""
    return np.rint(influence.sum(axis=0))


def capture_max(state: AlignmentState) -> float:
    """The largest share of one expert's weight, summed over rounds, that one client holds."""
    influence = state.fitness.influence
    rounds = _rounds(influence)
    seen = rounds > 0
    if not seen.any():
        return 0.0
    return float((influence[:, seen].max(axis=0) / rounds[seen]).max())


def trusted_updates(accepted: list[tuple[str, Received]], inputs: RoundInputs, layout: ParamLayout,
                     settings: RoundSettings, trust: Mapping[str, float], state: AlignmentState) -> list[ClientUpdate]:
    """The accepted replies with the weights the server can defend (:mod:`.robust`);
    ``trust`` scales a client's samples before the share caps (absent = 1), and the
    capture cap reads the clients' past shares in ``state``."""
    keys, layer_of = layout.expert_keys, layout.layer_of
    if not accepted:
        return []
    samples = np.array([trusted_samples(r.report.num_examples, inputs.registered.get(cid), settings.robust.sample_drift)
                        * trust.get(cid, 1.0) for cid, r in accepted])
    held = np.array([[k in inputs.sent[cid].experts for k in keys] for cid, _ in accepted], dtype=bool)
    tok = np.array([token_weights(r.report.tokens, n, layer_of, h) for (_, r), n, h in zip(accepted, samples, held)])
    influence = state.fitness.influence
    rows = np.array([state.client_index.get(cid, -1) for cid, _ in accepted])
    for k in range(len(keys)):  # no client above max_capture of an expert summed over rounds,
        past = np.where(rows >= 0, influence[np.maximum(rows, 0), k], 0.0)  # nor above max_share in this one
        tok[:, k] = _cap_expert(tok[:, k], past, float(_rounds(influence[:, [k]])[0]), settings)
    samples = cap_shares(samples, settings.robust.max_share)
    return [ClientUpdate(client_id=cid, params=r.params, held=frozenset(inputs.sent[cid].experts), num_samples=float(n),
                         tokens={keys[k]: float(tok[i, k]) for k in np.flatnonzero(held[i])})
            for i, ((cid, r), n) in enumerate(zip(accepted, samples))]


def _cap_expert(weights: np.ndarray, past: np.ndarray, rounds: float, settings: RoundSettings) -> np.ndarray:
    """One expert's weights under both caps. Each only lowers weights, and lowering one client
    raises the others' shares, so they alternate until neither changes anything (a few passes);
    the per-round share cap is applied last, so it always holds."""
    w = np.asarray(weights, dtype=np.float64)
    for _ in range(20):
        new = w.copy()
        if settings.robust.max_capture > 0:
            on = new > 0
            new[on] = cap_capture(new[on], past[on], rounds, settings.robust.max_capture)
        new = cap_shares(new, settings.robust.max_share)
        if np.allclose(new, w, rtol=1e-12, atol=0.0):
            return new
        w = new
    return w


CORE_CLIP_FACTOR = 2.0
"""With trust factors the clip bound is at most this times the median norm of the trusted core."""


def clip_bound(updates: list[ClientUpdate], params: Mapping[str, np.ndarray], layout: ParamLayout,
               settings: RoundSettings, trust: Mapping[str, float] | None = None,
               checked: Mapping[str, float] | None = None) -> float | None:
    """The round's clipping bound: ``clip_norm`` (``clip=fixed``), or the median delta norm
    (``clip=median``).

    With trust factors the median bound is also at most :data:`CORE_CLIP_FACTOR` times the
    median norm of the clients that agree with the server's reference at least as well as the
    median client (factor 1): a cohort that by chance is half attackers with huge updates
    cannot raise the bound to their size, while honest rounds keep the plain median (the core
    alone is tighter: it cost FMNIST ~5 points when used as the bound).

    ``checked`` holds the delta norms of every reply the trust check saw, refused or not: the
    bound is also at most their median. A median is robust while fewer than half of whom it
    is taken over lie; the cohort is drawn by the server, the trust check's survivors are not:
    on label-skewed data it refuses many honest clients of a round, and clients that scale an
    honest direction (which it keeps) can be most of those left."""
    if settings.robust.clip == "fixed":
        return settings.robust.clip_norm
    if settings.robust.clip != "median" or len(updates) < 2:
        return None
    checked = checked or {}
    norms = {u.client_id: checked[u.client_id] if u.client_id in checked else _norm(u.params, u.held, params, layout)
             for u in updates}  # a survivor's norm is already among the checked ones
    bound = median_norm(norms)
    core = {c: v for c, v in norms.items() if (trust or {}).get(c, 1.0) >= 1.0}
    if trust and core and bound is not None:
        bound = min(bound, CORE_CLIP_FACTOR * median_norm(core))
    if checked and bound is not None:
        bound = min(bound, median_norm(checked))
    return bound


def delta_norms(replies: list[tuple[str, Received]], sent: Mapping[str, Sent], params: Mapping[str, np.ndarray],
                layout: ParamLayout) -> dict[str, float]:
    """Each reply's delta norm over the tensors aggregation counts (:func:`clip_bound`'s ``checked``)."""
    return {cid: _norm(r.params, frozenset(sent[cid].experts), params, layout) for cid, r in replies}


def _norm(trained: Mapping[str, np.ndarray], held, params: Mapping[str, np.ndarray], layout: ParamLayout) -> float:
    """The delta's L2 norm over the shared tensors and those of the ``held`` experts."""
    names = [n for n in trained if layout.expert_of.get(n, None) in held or n not in layout.expert_of]
    return float(np.sqrt(sum(float(np.sum((np.asarray(trained[n], np.float64) - params[n]) ** 2)) for n in names)))


def check_directions(accepted: list[tuple[str, Received]], params: Mapping[str, np.ndarray], layout: ParamLayout,
                      min_agreement: float, rejected: dict[str, str]) -> list[tuple[str, Received]]:
    """The accepted replies whose shared-tensor delta agrees with the round's median delta
    at least ``min_agreement`` times as well (cosine) as the median client's does; the others
    go to ``rejected`` with their cosine. Relative, so it adapts to how much honest non-IID
    clients disagree. Needs 3 clients (a median of 2 is their mean); off at 0."""
    names = [n for n in sorted(layout.shared_params) if n not in layout.router_params]
    if min_agreement <= 0 or len(accepted) < 3 or not names:
        return accepted
    deltas = {cid: np.concatenate([(np.asarray(r.params[n], np.float64) - params[n]).ravel() for n in names])
              for cid, r in accepted}
    scores = direction_scores(deltas)
    bound = min_agreement * float(np.median(list(scores.values())))
    if bound <= 0:  # no agreement to speak of this round
        return accepted
    for cid, _ in accepted:
        if scores[cid] < bound:
            rejected[cid] = f"update disagrees with the round's median delta (cosine {scores[cid]:.2f} < {bound:.2f})"
    return [(cid, r) for cid, r in accepted if scores[cid] >= bound]


def check_trust(accepted: list[tuple[str, Received]], params: Mapping[str, np.ndarray],
                 reference: Mapping[str, np.ndarray] | None, rejected: dict[str, str]):
    """``(kept, factors, cosines)``: each accepted reply's cosine with the server's reference
    update; those at a factor of 0 (pointing away from it) go to ``rejected`` with their
    cosine, the others keep their factor (:func:`~fedmoe_flwr.core.robust.trust_factors`).
    No reference: everything kept at factor 1."""
    if reference is None or not accepted:
        return accepted, {}, {}
    cosines = {cid: reference_cosine({n: np.asarray(a, np.float64) - params[n] for n, a in r.params.items()}, reference)
               for cid, r in accepted}
    factors = trust_factors(cosines)
    for cid, _ in accepted:
        if factors[cid] <= 0:
            rejected[cid] = f"update points away from the server's reference update (cosine {cosines[cid]:.2f})"
    return [(cid, r) for cid, r in accepted if factors[cid] > 0], factors, cosines


def record_refusals(state: AlignmentState, refused: list[str], rnd: int) -> AlignmentState:
    """Count round ``rnd``'s trust-check refusals in the clients' profiles (:func:`sitting_out`)."""
    if not refused:
        return state
    profiles = dict(state.profiles)
    for cid in refused:
        p = profiles.get(cid, ClientProfile())
        profiles[cid] = replace(p, rounds_refused=p.rounds_refused + 1, last_refused=int(rnd))
    return replace(state, profiles=profiles)


def sitting_out(profiles: Mapping[str, ClientProfile], client_ids: list[str], rnd: int, after: int) -> set[str]:
    """The clients of ``client_ids`` left out of round ``rnd``'s training cohort
    (:func:`~fedmoe_flwr.core.robust.sits_out`; ``after <= 0``: none)."""
    if after <= 0:
        return set()
    out = set()
    for cid in client_ids:
        p = profiles.get(cid)
        if p is not None and sits_out(p.rounds_refused, p.rounds_completed, p.last_refused, rnd, after):
            out.add(cid)
    return out


def record_influence(state: AlignmentState, updates: list[ClientUpdate], keys: list[str]) -> AlignmentState:
    """Add each client's share of every expert's aggregation weight this round to
    ``fitness.influence`` (what the capture cap and ``capture_max`` read)."""
    if not updates:
        return state
    influence = state.fitness.influence.copy()
    for k, key in enumerate(keys):
        weights = {u.client_id: u.tokens.get(key, 0.0) for u in updates if u.tokens.get(key, 0.0) > 0}
        total = sum(weights.values())
        for cid, w in weights.items():
            if cid in state.client_index:
                influence[state.client_index[cid], k] += w / total
    return replace(state, fitness=replace(state.fitness, influence=influence))
