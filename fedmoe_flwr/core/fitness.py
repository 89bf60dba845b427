"""Client-expert fitness ``Q[c, k]``: signals, smoothing and exploration (docs/architecture.md#fitness).

Rows are clients (stable row indices kept by :mod:`fedmoe_flwr.core.state`), columns are
experts in ``ParamLayout.expert_keys`` order. All functions are pure and return new arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np


@dataclass(frozen=True, eq=False)
class FitnessState:
    """Fitness of every known client for every expert.

    Attributes:
        Q: ``[C, K]`` float64 smoothed fitness.
        n: ``[C, K]`` int64, rounds the pair trained (the UCB count).
        seen: ``[C]`` bool, the row was initialised from an observation (probe/histogram).
        t: the round counter used by the exploration bonus.
        q0: prior fitness of cold pairs (new rows start at it).
        influence: ``[C, K]`` float64, the client's share of expert ``k``'s aggregation weight,
            summed over rounds (a column sums to the rounds ``k`` was aggregated); what the
            capture cap reads (:func:`fedmoe_flwr.core.robust.cap_capture`). None = zeros.
    """

    Q: np.ndarray
    n: np.ndarray
    seen: np.ndarray
    t: int = 0
    q0: float = 0.0
    influence: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.influence is None:
            object.__setattr__(self, "influence", np.zeros(self.Q.shape, dtype=np.float64))

    @property
    def num_clients(self) -> int:
        return int(self.Q.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.Q.shape[1])


@dataclass
class FitnessSettings:
    """How per-pair signals become fitness (docs/architecture.md#fitness).

    The strategy config (:class:`fedmoe_flwr.config.StrategyConfig`) extends this class, so
    each setting is declared once and keeps its name from the command line to the core.
    """

    w_hist: float = 1.0  # weight of the top-1 routing histogram share
    w_gate: float = 0.0  # weight of the gate-mass share
    w_loss: float = 0.0  # weight of exp(-loss_alpha * expert loss)
    loss_alpha: float = 1.0
    beta: float = 0.5  # EMA step of Q
    kappa: float = 0.0  # UCB exploration; off until a benchmark shows it helps
    anneal_rounds: Optional[int] = 50  # exploration anneals to 0 over these rounds


def default_q0(num_experts: int) -> float:
    """Prior fitness of a cold pair: ``1/K``, the routing share of a uniform router."""
    return 1.0 / max(int(num_experts), 1)


def init_fitness(num_clients: int, num_experts: int, q0: float | None = None) -> FitnessState:
    """An all-cold state: ``Q = q0`` (default :func:`default_q0`), ``n = 0``, nothing seen."""
    q0 = default_q0(num_experts) if q0 is None else float(q0)
    return FitnessState(
        Q=np.full((num_clients, num_experts), q0, dtype=np.float64),
        n=np.zeros((num_clients, num_experts), dtype=np.int64),
        seen=np.zeros(num_clients, dtype=bool),
        t=0,
        q0=q0,
    )


def grow_fitness(state: FitnessState, num_clients: int, q0: float | None = None) -> FitnessState:
    """Append cold rows (``Q = q0``, default ``state.q0``) up to ``num_clients`` rows."""
    extra = num_clients - state.num_clients
    if extra <= 0:
        return state
    cold = init_fitness(extra, state.num_experts, state.q0 if q0 is None else q0)
    return replace(
        state,
        Q=np.vstack([state.Q, cold.Q]),
        n=np.vstack([state.n, cold.n]),
        seen=np.concatenate([state.seen, cold.seen]),
        influence=np.vstack([state.influence, cold.influence]),
    )


def fitness_signal(
    hist: np.ndarray | None = None,
    gate_share: np.ndarray | None = None,
    loss: np.ndarray | None = None,
    *,
    w_hist: float = 1.0,
    w_gate: float = 0.0,
    w_loss: float = 0.0,
    alpha: float = 1.0,
    renormalise: bool = False,
) -> np.ndarray:
    """One client's per-expert signal ``s[k]``: a weighted mean of available signals.

    Signals: the top-1 routing histogram share ``hist[k]``, the gate-mass share
    ``gate_share[k]`` and ``exp(-alpha * loss[k])``. A signal is *available* when it is
    given (not ``None``) and its weight is positive; weights are normalised over the
    available signals (a probed client has no loss: its signal is ``h`` and ``r`` only).

    NaN entries mean "no observation" (e.g. the loss of an expert the client did not
    train). By default an entry is NaN in the output when any available signal is NaN
    there, so every observed entry mixes the same signals on the same scale. With
    ``renormalise=True`` an entry instead mixes the signals observed there (weights
    renormalised per entry), NaN only when none is. Returns ``[K]`` float64; all NaN if
    no signal is available.
    """
    parts: list[tuple[float, np.ndarray]] = []
    for w, v in ((w_hist, hist), (w_gate, gate_share)):
        if v is not None and w > 0:
            parts.append((float(w), np.asarray(v, dtype=np.float64)))
    if loss is not None and w_loss > 0:
        parts.append((float(w_loss), np.exp(-alpha * np.asarray(loss, dtype=np.float64))))
    if not parts:
        size = next((np.size(v) for v in (hist, gate_share, loss) if v is not None), 0)
        return np.full(size, np.nan)
    values = np.stack([v for _, v in parts])  # [S, K]
    weights = np.array([w for w, _ in parts])[:, None]  # [S, 1]
    observed = np.isfinite(values)
    wsum = (weights * observed).sum(axis=0)
    total = (weights * np.where(observed, values, 0.0)).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = total / wsum
    keep = observed.any(axis=0) if renormalise else observed.all(axis=0)
    return np.where(keep, out, np.nan)


def update_fitness(
    state: FitnessState,
    rows: int | np.ndarray,
    signal: np.ndarray,
    trained_mask: np.ndarray,
    observed_mask: np.ndarray | None = None,
    *,
    beta: float = 0.5,
) -> FitnessState:
    """Fold observed signals into ``Q`` and count trained pairs; returns a new state.

    ``rows`` is one row index (then ``signal``/masks are ``[K]``) or ``[M]`` distinct rows
    (then ``[M, K]``). ``observed_mask`` defaults to ``isfinite(signal)``; histogram
    signals are observed for every expert, loss only for trained ones, hence separate
    from ``trained_mask``. Non-finite signal entries are never observed.

    - cold row (``seen`` False): ``Q[row, k] = s[k]`` where observed (probe init); the row
      becomes seen if anything was observed;
    - seen row: ``Q <- (1 - beta) Q + beta s`` where observed; other pairs keep their value;
    - ``n[row, k] += 1`` where trained.
    """
    rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
    signal = np.atleast_2d(np.asarray(signal, dtype=np.float64))
    trained = np.atleast_2d(np.asarray(trained_mask, dtype=bool))
    observed = np.isfinite(signal)
    if observed_mask is not None:
        observed &= np.atleast_2d(np.asarray(observed_mask, dtype=bool))
    if len(np.unique(rows)) != len(rows):
        raise ValueError("update_fitness: rows must be distinct")
    Q, n, seen = state.Q.copy(), state.n.copy(), state.seen.copy()
    old = Q[rows]
    cold = ~seen[rows][:, None]
    ema = (1.0 - beta) * old + beta * np.where(observed, signal, 0.0)
    Q[rows] = np.where(observed, np.where(cold, signal, ema), old)
    n[rows] += trained
    seen[rows] |= observed.any(axis=1)
    return replace(state, Q=Q, n=n, seen=seen)


def exploration_bonus(
    n: np.ndarray, t: int, kappa: float, anneal_rounds: int | None = None
) -> np.ndarray:
    """UCB bonus ``kappa_t * sqrt(ln(t + 1) / (1 + n))`` (same shape as ``n``).

    ``kappa_t = kappa * max(0, 1 - t / anneal_rounds)`` (linear anneal to 0 at round
    ``anneal_rounds``); ``kappa_t = kappa`` when ``anneal_rounds`` is ``None``.
    """
    n = np.asarray(n, dtype=np.float64)
    kappa_t = float(kappa)
    if anneal_rounds is not None:
        kappa_t *= max(0.0, 1.0 - t / max(float(anneal_rounds), 1e-12))
    if kappa_t == 0.0:
        return np.zeros_like(n)
    return kappa_t * np.sqrt(np.log(t + 1.0) / (1.0 + n))


def solver_score(
    state: FitnessState,
    rows: np.ndarray,
    price: np.ndarray | None = None,
    *,
    kappa: float = 0.0,
    anneal_rounds: int | None = None,
) -> np.ndarray:
    """The assignment objective's coefficients ``Q'[c, k] + p[k]`` for cohort ``rows``.

    ``Q' = Q + exploration_bonus(n, t, kappa, anneal_rounds)``; ``price`` (``[K]``) is the
    load dual price (0 if ``None``). Returns ``[len(rows), K]`` float64.
    """
    rows = np.asarray(rows, dtype=np.int64)
    score = state.Q[rows] + exploration_bonus(state.n[rows], state.t, kappa, anneal_rounds)
    if price is not None:
        score = score + np.asarray(price, dtype=np.float64)[None, :]
    return score
