"""Expert load: counts, staleness, dual prices and coverage bands (docs/architecture.md#load).

How ``band`` (:func:`coverage_bounds`) and ``price`` (:func:`update_load`) work together:

- The band is a hard per-round constraint ``lo[k] <= clients on k <= hi[k]`` in the
  solver. With ``band = 0`` (exact floor/ceil of slots per expert) every feasible
  assignment gives each expert the same count, so adding ``p[k]`` to every ``x[c, k]``
  adds the same constant to every feasible objective: **prices change nothing**.
- With a looser band (e.g. ``band = 0.5``: +-50% around the mean), the solver may follow
  fitness and overload popular experts within the band. The price carries balance
  pressure *across rounds*: an expert under-served this round (share below target) gets
  a higher price, so it is favoured next round, the same idea as bias-based, loss-free
  MoE balancing. So: the band bounds per-round imbalance, the price corrects drift over
  time (e.g. under partial participation or token-weighted load).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True, eq=False)
class LoadState:
    """Per-expert load (all arrays ``[K]``).

    Attributes:
        tokens_total, clients_total: cumulative tokens routed / clients that trained it.
        tokens_last, clients_last: the same for the last recorded round.
        last_trained_round: last round with at least one client, ``-1`` never.
        price: the dual price ``p[k]`` added to the solver's scores.
    """

    tokens_total: np.ndarray
    clients_total: np.ndarray
    tokens_last: np.ndarray
    clients_last: np.ndarray
    last_trained_round: np.ndarray
    price: np.ndarray

    @property
    def num_experts(self) -> int:
        return int(self.price.shape[0])


def init_load(num_experts: int) -> LoadState:
    """Zero counts, never trained, zero prices."""
    K = int(num_experts)
    return LoadState(
        tokens_total=np.zeros(K, dtype=np.float64),
        clients_total=np.zeros(K, dtype=np.int64),
        tokens_last=np.zeros(K, dtype=np.float64),
        clients_last=np.zeros(K, dtype=np.int64),
        last_trained_round=np.full(K, -1, dtype=np.int64),
        price=np.zeros(K, dtype=np.float64),
    )


def update_load(
    state: LoadState,
    tokens: np.ndarray,
    clients: np.ndarray,
    round: int,
    *,
    price_step: float = 0.1,
    target: np.ndarray | None = None,
    basis: str = "clients",
    price_bound: float = 1.0,
) -> LoadState:
    """Record one round's per-expert load and move the dual prices; returns a new state.

    ``tokens[k]`` are tokens routed to expert ``k`` this round, ``clients[k]`` the clients
    that trained it. Prices:

        share[k] = load[k] / sum(load)     (load = clients, or tokens if basis="tokens")
        p[k] <- clip(p[k] + price_step * (target[k] - share[k]) / target[k],
                     -price_bound, price_bound)

    ``target`` is the desired share (default uniform ``1/K``; renormalised to sum 1).
    An expert nobody served gets ``+price_step``; one with twice its share gets
    ``-price_step``. If the round had no load at all, prices are unchanged.
    Experts with ``target[k] == 0`` keep their price.
    """
    if basis not in ("clients", "tokens"):
        raise ValueError(f"basis must be 'clients' or 'tokens', got {basis!r}")
    tokens = np.asarray(tokens, dtype=np.float64)
    clients = np.asarray(clients, dtype=np.int64)
    K = state.num_experts
    if tokens.shape != (K,) or clients.shape != (K,):
        raise ValueError(f"tokens and clients must have shape ({K},)")
    load = clients.astype(np.float64) if basis == "clients" else tokens
    price = state.price.copy()
    total = float(load.sum())
    if total > 0:
        tgt = np.full(K, 1.0 / K) if target is None else np.asarray(target, dtype=np.float64)
        tgt = tgt / tgt.sum()
        share = load / total
        pos = tgt > 0
        price[pos] += price_step * (tgt[pos] - share[pos]) / tgt[pos]
        price = np.clip(price, -price_bound, price_bound)
    return replace(
        state,
        tokens_total=state.tokens_total + tokens,
        clients_total=state.clients_total + clients,
        tokens_last=tokens.copy(),
        clients_last=clients.copy(),
        last_trained_round=np.where(clients > 0, int(round), state.last_trained_round),
        price=price,
    )


def staleness(state: LoadState, round: int) -> np.ndarray:
    """Rounds since each expert was last trained: ``round - last_trained_round``.

    An expert never trained counts from round ``-1`` (staleness ``round + 1``).
    """
    return int(round) - state.last_trained_round


def load_cv(counts: np.ndarray) -> float:
    """Coefficient of variation ``std / mean`` (population std) of per-expert load.

    0 for a perfectly balanced load and for an all-zero load.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.size == 0 or not counts.any():
        return 0.0
    counts = counts / np.abs(counts).max()  # scale first: squares of tiny counts underflow
    return float(counts.std() / counts.mean())


def coverage_bounds(num_slots: int, num_experts: int, band: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-expert bounds on clients per round around the mean ``m = num_slots / K``.

    ``lo = floor(m * (1 - band))`` (at least 0), ``hi = ceil(m * (1 + band))``.
    ``band = 0`` gives the exact band ``floor(m) .. ceil(m)``; ``band = 0.5`` gives +-50%.
    ``num_slots`` is the total number of (client, expert) pairs expected this round
    (e.g. ``sum(k_c)``). Returns int64 ``[K]`` arrays.
    """
    if band < 0:
        raise ValueError(f"band must be >= 0, got {band}")
    K = int(num_experts)
    m = float(num_slots) / max(K, 1)
    eps = 1e-9  # so that m * (1 +- band) landing on an integer is not rounded away
    lo = max(0, math.floor(m * (1.0 - band) + eps))
    hi = max(lo, math.ceil(m * (1.0 + band) - eps))
    return np.full(K, lo, dtype=np.int64), np.full(K, hi, dtype=np.int64)


def round_load(held: list, tokens: list, expert_keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-expert ``(tokens, clients)`` of one round's aggregated updates.

    ``held[i]`` is the set of expert keys update ``i`` trained and ``tokens[i]`` its
    ``{expert key: tokens routed}``; the result is in ``expert_keys`` order, ready for
    :func:`update_load`.
    """
    index = {k: i for i, k in enumerate(expert_keys)}
    tok = np.zeros(len(expert_keys))
    cli = np.zeros(len(expert_keys))
    for keys, counts in zip(held, tokens):
        for key in keys:
            tok[index[key]] += float(counts.get(key, 0.0))
            cli[index[key]] += 1
    return tok, cli
