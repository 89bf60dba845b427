"""Weights the server can defend: what a client claims is bounded by what the server can
check (docs/robustness.md#robustness).

- samples: a client's claimed sample count is capped at its registered data size (its
  first report) times ``1 + drift``;
- tokens: only the client's *shares* of tokens per MoE layer count, scaled by its capped
  samples, so inflated token counts cannot inflate a weight;
- shares: no client contributes more than ``max_share`` times the fair share ``1/m`` of
  the ``m`` contributors to one expert (or to the shared tensors) in a round;
- capture: no client holds more than ``max_capture`` of an expert's weight summed over
  the rounds (its cumulative share), whatever it wins round by round;
- norms: updates are clipped to the round's median delta norm before averaging;
- directions (``min_agreement``, off by default): a client whose shared-tensor delta agrees
  with the round's coordinate-wise median delta (cosine) less than ``min_agreement`` times
  as well as the median client does is not aggregated (a sign flip has an ordinary norm);
- signals: routing histograms and gate shares must be distributions per layer, and a
  client whose histogram contradicts the tokens it routed loses its fitness update;
- trust (``trust_samples > 0`` and a reference update, as FLTrust): the server trains the
  round's global model on its own small root sample; a client whose delta points away from
  that reference update (cosine <= 0) is not aggregated, and one that agrees less than the
  round's median client has its weights scaled down by ``cosine / median``;
- quorum (``trust_quorum``, 0.3 by default): a round whose trust check keeps fewer than
  that share of the replies it checked takes a proportionally smaller step (:func:`quorum_scale`);
- sitting out (``sit_out_after``): a client the trust check refused at least that many
  times, and more often than it passed it, is left out of the training cohorts for a while
  (:func:`sits_out`), so known attackers stop taking the cohort's places.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional

import numpy as np

AGGREGATORS = ("mean", "median", "trimmed_mean", "krum", "multikrum", "bulyan")
CLIPS = ("none", "median", "fixed")


@dataclass
class RobustSettings:
    """What the server trusts in a reply (the strategy config extends this class)."""

    norm_bound: Optional[float] = None  # reject updates whose delta norm exceeds it; None = no bound
    aggregator: str = "mean"  # per expert over its holders: mean | median | trimmed_mean | krum | multikrum | bulyan
    byzantine_fraction: float = 0.2  # krum/multikrum/bulyan: f = max(1, floor(this x contributors)) per group
    clip: str = "median"  # none | median (the round's median delta norm) | fixed (clip_norm)
    clip_norm: Optional[float] = None  # the bound of clip=fixed
    max_share: float = 2.0  # a client's weight on one expert <= max_share / holders; 0 = off
    sample_drift: float = 0.5  # claimed samples <= registered data size * (1 + drift)
    min_consistency: float = 0.5  # fitness ignores a client whose histogram contradicts its tokens
    min_agreement: float = 0.0  # reject a client whose cosine with the median delta < this x the median client's; 0 = off
    trust_samples: int = 100  # root samples of the server's reference update (FLTrust); 0 = off
    max_capture: float = 0.5  # a client's share of an expert's weight summed over rounds <= this; 0 = off
    sit_out_after: int = 2  # refusals by the trust check before a client sits out rounds (sits_out); 0 = off
    trust_quorum: float = 0.3  # a round whose trust check keeps < this share of the replies takes a smaller step (quorum_scale); 0 = off

    def __post_init__(self) -> None:
        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"aggregator must be one of {AGGREGATORS}, got {self.aggregator!r}")
        if not 0.0 <= self.byzantine_fraction < 0.5:
            raise ValueError(f"byzantine_fraction must be in [0, 0.5), got {self.byzantine_fraction!r}")
        if self.clip not in CLIPS:
            raise ValueError(f"clip must be one of {CLIPS}, got {self.clip!r}")
        if not 0.0 <= self.min_agreement <= 1.0:
            raise ValueError(f"min_agreement must be in [0, 1], got {self.min_agreement!r}")
        if not 0.0 <= self.max_capture <= 1.0:
            raise ValueError(f"max_capture must be in [0, 1], got {self.max_capture!r}")
        if self.sit_out_after < 0:
            raise ValueError(f"sit_out_after must be >= 0, got {self.sit_out_after!r}")
        if not 0.0 <= self.trust_quorum <= 1.0:
            raise ValueError(f"trust_quorum must be in [0, 1], got {self.trust_quorum!r}")
        if self.trust_samples < 0:
            raise ValueError(f"trust_samples must be >= 0, got {self.trust_samples!r}")
        if self.clip == "fixed" and not (self.clip_norm is not None and self.clip_norm > 0):
            raise ValueError(f"clip=fixed needs clip_norm > 0, got {self.clip_norm!r}")


MAX_SIT_OUT_ROUNDS = 64
"""The longest a client sits out after one refusal (:func:`sits_out`)."""


def sits_out(refused: int, completed: int, last_refused: int, rnd: int, after: int) -> bool:
    """Whether a client is left out of round ``rnd``'s training cohort.

    ``refused`` of its ``completed`` updates were refused by the trust check, the last in
    round ``last_refused``. With at least ``after`` refusals and ``e = refused - passed > 0``
    (more refused than passed), it sits out the ``2^(e-1)`` rounds after its last refusal
    (at most :data:`MAX_SIT_OUT_ROUNDS`), then comes back: a sign-flipping client, refused
    every time, sits out 2, 4, 8, ... rounds, while an honest client the check refuses now
    and then (8-13 % of honest updates on the quickstart) passes more often than not and
    sits out only after an unlucky start, for a round or two. Known attackers then stop
    taking places an honest client could use.
    ``after <= 0``: never.
    """
    excess = refused - (completed - refused)
    if after <= 0 or refused < after or excess <= 0:
        return False
    return rnd - last_refused <= min(2 ** (excess - 1), MAX_SIT_OUT_ROUNDS)


def quorum_scale(kept: int, checked: int, quorum: float) -> float:
    """The scale of a round's step when the trust check kept ``kept`` of the ``checked``
    replies: 1 while ``kept >= quorum * checked``, else ``kept / (quorum * checked)``.

    When the server's reference agrees with few clients of a round (label skew, or a model near
    convergence whose root-sample update is mostly noise), the few it keeps are not the
    federation: one label-skewed survivor alone moved the quickstart from 91 % to 52 % in one
    round. Their step shrinks in proportion instead. ``quorum <= 0`` or nothing checked: 1.
    """
    if quorum <= 0 or checked <= 0:
        return 1.0
    return min(1.0, kept / (quorum * checked))


def trusted_samples(claimed: float, registered: float | None, drift: float) -> float:
    """``min(claimed, registered * (1 + drift))``; the claim itself when nothing is registered."""
    if registered is None or registered <= 0:
        return float(claimed)
    return float(min(claimed, registered * (1.0 + drift)))


def cap_shares(weights: np.ndarray, max_share: float) -> np.ndarray:
    """Weights with no entry above ``min(1, max_share / m)`` of their total (water-filling).

    The largest weights are lowered to a common level ``c`` with ``c = s * sum(result)``;
    the others stay as they are, so the order of contributors is kept. ``max_share <= 0``
    or a single contributor: unchanged.
    """
    w = np.asarray(weights, dtype=np.float64)
    m = int((w > 0).sum())
    if max_share <= 0 or m <= 1:
        return w.copy()
    s = min(1.0, max_share / m)
    desc = np.sort(w[w > 0])[::-1]
    rest = np.cumsum(desc[::-1])[::-1]  # rest[k] = sum of desc[k:]
    for k in range(m):  # k weights capped at level c
        if s * k >= 1.0:
            break
        c = s * rest[k] / (1.0 - s * k)
        if desc[k] <= c * (1 + 1e-12) and (k == 0 or desc[k - 1] >= c):
            out = np.minimum(w, c) if k else w.copy()
            if out.max() / out.sum() <= s + 1e-9:
                return out
            break  # the level lost its precision (subnormal weights): see below
    # every share capped: equal weights, at the smallest (so none grows; also when the level
    # underflows or loses its precision, as with subnormal weights)
    return np.where(w > 0, desc[-1], 0.0)


CAPTURE_WARMUP_ROUNDS = 10
"""The capture cap counts at least this many rounds of an expert (see :func:`cap_capture`)."""


def cap_capture(weights: np.ndarray, past: np.ndarray, rounds: float, max_capture: float) -> np.ndarray:
    """One expert's weights this round with no contributor's cumulative share above
    ``max_capture``.

    ``past[i]`` is contributor ``i``'s share of the expert's weight summed over the
    ``rounds`` earlier rounds it was aggregated; after this round its cumulative share is
    ``(past[i] + share[i]) / (rounds + 1)``, so its share this round may be at most
    ``a[i] = max_capture * max(rounds + 1, CAPTURE_WARMUP_ROUNDS) - past[i]`` (clipped to
    [0, 1]): over the first rounds, when an expert has had few holders, a cumulative share
    says little, so the cap counts at least the warm-up's rounds. Water-filling: the
    set ``S`` of capped contributors grows until every other one is within its allowance;
    those in ``S`` get exactly ``a[i]`` of the new total ``W = sum(others) / (1 - sum(a[S]))``
    (each only lowered), the others keep their weights. A lone contributor, ``max_capture
    <= 0``, or allowances that cannot be met (``sum(a[S]) >= 1``): unchanged.
    """
    w = np.asarray(weights, dtype=np.float64)
    if max_capture <= 0 or int((w > 0).sum()) <= 1:
        return w.copy()
    span = max(float(rounds) + 1.0, CAPTURE_WARMUP_ROUNDS)
    a = np.clip(max_capture * span - np.asarray(past, dtype=np.float64), 0.0, 1.0)
    capped = np.zeros(len(w), dtype=bool)
    while True:
        rest = 1.0 - a[capped].sum()
        if rest <= 1e-12:
            return w.copy()
        total = w[~capped].sum() / rest
        if total <= 0:
            return w.copy()
        over = ~capped & (w > a * total * (1 + 1e-12))
        if not over.any():
            break
        capped |= over
    return np.where(capped, a * total, w)


def token_weights(tokens: np.ndarray, samples: float, layer_of: np.ndarray, held: np.ndarray) -> np.ndarray:
    """Per-expert weights ``samples * tokens[k] / sum(tokens of k's layer)`` over held experts.

    A layer whose held experts got no token spreads ``samples`` evenly over them.
    """
    tokens = np.where(held, np.clip(np.nan_to_num(tokens), 0, None), 0.0)
    out = np.zeros(len(tokens))
    for layer in np.unique(layer_of):
        cols = (layer_of == layer) & held
        if not cols.any():
            continue
        total = tokens[cols].sum()
        out[cols] = samples * (tokens[cols] / total if total > 0 else 1.0 / cols.sum())
    return out


def signal_problem(values: np.ndarray, layer_of: np.ndarray, name: str, tol: float = 1e-3) -> str | None:
    """Why a per-expert distribution (routing histogram, gate share) is not one, or None.

    Every entry missing (NaN) is fine (not measured); otherwise each layer's entries must
    be finite, >= 0 and sum to 1 within ``tol``.
    """
    v = np.asarray(values, dtype=np.float64)
    if np.isnan(v).all():
        return None
    if not np.isfinite(v).all() or (v < 0).any():
        return f"{name} has non-finite or negative entries"
    for layer in np.unique(layer_of):
        total = float(v[layer_of == layer].sum())
        if abs(total - 1.0) > tol:
            return f"{name} of layer {layer} sums to {total:.6g}, not 1"
    return None


def signal_consistency(hist: np.ndarray, tokens: np.ndarray, held: np.ndarray, layer_of: np.ndarray) -> float:
    """How well a client's routing histogram (before training) agrees with the tokens it
    routed among its held experts (during training): ``1 - TV distance``, the worst layer.

    1 = the same distribution over the held experts, 0 = disjoint. NaN histogram: 1.
    """
    hist = np.asarray(hist, dtype=np.float64)
    if np.isnan(hist).any():
        return 1.0
    worst = 1.0
    for layer in np.unique(layer_of):
        cols = (layer_of == layer) & held
        h, t = hist[cols], np.clip(np.nan_to_num(tokens[cols]), 0, None)
        if cols.sum() < 2 or h.sum() <= 0 or t.sum() <= 0:
            continue
        worst = min(worst, 1.0 - 0.5 * float(np.abs(h / h.sum() - t / t.sum()).sum()))
    return worst


def median_norm(deltas: Mapping[str, float]) -> float | None:
    """The median of the clients' delta norms (the round's clipping bound); None if none."""
    values = [v for v in deltas.values() if np.isfinite(v)]
    return float(np.median(values)) if values else None


MAX_DIRECTION_COORDS = 1_000_000
"""Coordinates the direction check compares at most (an even stride over larger deltas)."""


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    norm = float(np.linalg.norm(a)) * float(np.linalg.norm(b))
    return float(a @ b / norm) if norm > 0 else 0.0


def trust_factors(cosines: Mapping[str, float]) -> dict[str, float]:
    """Each client's weight factor from its cosine with the server's reference update.

    ``min(1, max(0, cos) / median cos)``: a client pointing away from the reference (a sign
    flip, a replacement in another direction) gets 0, one that agrees at least as well as
    the round's median client keeps its whole weight, the rest in proportion (FLTrust
    weighs by ``max(0, cos)`` alone; relative to the median, honest non-IID clients far from
    the root sample's labels are damped, not silenced). A median <= 0 (most clients point
    away): 1 for a positive cosine, else 0.
    """
    if not cosines:
        return {}
    median = float(np.median(list(cosines.values())))
    if median <= 0:
        return {c: float(v > 0) for c, v in cosines.items()}
    return {c: float(min(1.0, max(0.0, v) / median)) for c, v in cosines.items()}


def direction_scores(deltas: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Each client's cosine with the coordinate-wise median of all clients' deltas.

    ``deltas`` maps client id -> its flat delta (all the same length). The median is robust
    while fewer than half the clients lie, so a sign-flipped or replaced update scores < 0
    while honest ones, even non-IID, mostly agree with it. A zero vector scores 0.
    """
    ids = sorted(deltas)
    if not ids:
        return {}
    n = len(deltas[ids[0]])
    step = max(1, -(-n // MAX_DIRECTION_COORDS))
    stack = np.stack([np.asarray(deltas[c], dtype=np.float64)[::step] for c in ids])
    ref = np.median(stack, axis=0)
    return {c: _cosine(d, ref) for c, d in zip(ids, stack)}


def reference_cosine(delta: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """The cosine of a client's delta with the server's reference delta over the tensors the
    client returned (its shared tensors and its experts; tensors the reference lacks are
    left out). Larger deltas are compared on an even stride of at most
    :data:`MAX_DIRECTION_COORDS` coordinates."""
    names = sorted(n for n in delta if n in reference)
    if not names:
        return 0.0
    n = sum(int(np.size(delta[k])) for k in names)
    step = max(1, -(-n // MAX_DIRECTION_COORDS))
    a = np.concatenate([np.asarray(delta[k], np.float64).ravel() for k in names])[::step]
    b = np.concatenate([np.asarray(reference[k], np.float64).ravel() for k in names])[::step]
    return _cosine(a, b)
