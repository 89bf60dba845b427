"""The alignment state carried across rounds, and its exact (de)serialisation.

One object holds everything a strategy learns (profiles, fitness, load and prices,
server-optimizer moments) so a run can checkpoint and resume. Clients get a stable row
index the first time they appear; rows are never reused or removed.

Serialisation: :func:`state_to_dict` returns ``(json_dict, arrays)``: ``json_dict`` is
JSON-serialisable (the ``[K]`` load arrays as lists, float64 values round-trip exactly
through ``json``), ``arrays`` holds the arrays that grow with the clients (``"fitness/Q"``,
``"fitness/n"``, ``"fitness/seen"``) and the server-optimizer tensors (``"m/<name>"``,
``"v/<name>"``) for a tensor file (e.g. safetensors): as JSON text a 100,000-client ``Q``
took seconds to write and read. :func:`state_from_dict` inverts it, and also reads
schema 1, which kept the fitness arrays in ``json_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

import numpy as np

from .aggregate import ServerOptState
from .fitness import FitnessState, grow_fitness, init_fitness
from .load import LoadState, init_load
from .profiles import ClientProfile

__all__ = [
    "AlignmentState",
    "advance_round",
    "client_rows",
    "ensure_client",
    "ensure_clients",
    "init_state",
    "state_from_dict",
    "state_to_dict",
]

SCHEMA_VERSION = 2
FITNESS_ARRAYS = {"Q": np.float64, "n": np.int64, "seen": np.bool_, "influence": np.float64}
"""Fitness arrays (one row per known client) stored in ``arrays`` as ``"fitness/<name>"``."""


@dataclass(frozen=True, eq=False)
class AlignmentState:
    """Everything the aligned strategy carries across rounds.

    Attributes:
        expert_keys: column order of every ``[.., K]`` array (``ParamLayout.expert_keys``).
        client_index: client id -> row in the fitness arrays.
        profiles: client id -> :class:`ClientProfile`.
        fitness: ``Q``, ``n``, ``seen``, ``t``.
        load: per-expert counts, staleness and prices.
        round: the last completed round (0 before the first).
        opt_state: server-optimizer moments, ``None`` for plain averaging.
    """

    expert_keys: list[str]
    client_index: dict[str, int] = field(default_factory=dict)
    profiles: dict[str, ClientProfile] = field(default_factory=dict)
    fitness: FitnessState | None = None
    load: LoadState | None = None
    round: int = 0
    opt_state: ServerOptState | None = None


def init_state(expert_keys: Iterable[str], *, q0: float | None = None) -> AlignmentState:
    """A state with no clients; ``q0`` is the prior fitness of cold pairs (default 1/K)."""
    keys = list(expert_keys)
    return AlignmentState(
        expert_keys=keys,
        fitness=init_fitness(0, len(keys), q0),
        load=init_load(len(keys)),
    )


def ensure_clients(
    state: AlignmentState,
    client_ids: Iterable[str],
    declared: Mapping[str, ClientProfile] | None = None,
    *,
    q0: float | None = None,
) -> tuple[AlignmentState, np.ndarray]:
    """Give unknown clients a row (cold fitness) and a profile; returns (state, rows).

    ``declared[client_id]`` is a profile with declared values: a new client starts from
    it; a known client takes its declared fields (memory, tier, ``declared_*``) and keeps
    its measurements. Clients without a declared profile start from ``ClientProfile()``.
    Arrays grow once per call, so pass a whole cohort at a time.
    """
    ids = list(client_ids)
    declared = declared or {}
    index = dict(state.client_index)
    profiles = dict(state.profiles)
    for cid in ids:
        if cid not in index:
            index[cid] = len(index)
            profiles[cid] = declared.get(cid, ClientProfile())
        elif cid in declared:
            profiles[cid] = _merge_declared(profiles[cid], declared[cid])
    fitness = grow_fitness(state.fitness, len(index), q0)
    new = replace(state, client_index=index, profiles=profiles, fitness=fitness)
    return new, np.array([index[c] for c in ids], dtype=np.int64)


def ensure_client(
    state: AlignmentState, client_id: str, declared: ClientProfile | None = None
) -> tuple[AlignmentState, int]:
    """:func:`ensure_clients` for one client; returns (state, row)."""
    new, rows = ensure_clients(state, [client_id], {client_id: declared} if declared else None)
    return new, int(rows[0])


DECLARED_FIELDS = ("memory_bytes", "compute_tier", "declared_samples_per_s", "declared_uplink_Bps",
                   "declared_downlink_Bps", "declared_reliability")
"""The fields of a :class:`ClientProfile` a client declares (the others are measured)."""


def _merge_declared(old: ClientProfile, decl: ClientProfile) -> ClientProfile:
    return replace(old, **{f: getattr(decl, f) for f in DECLARED_FIELDS})


def client_rows(state: AlignmentState, client_ids: Iterable[str]) -> np.ndarray:
    """Rows of known clients (``KeyError`` naming an unknown one)."""
    try:
        return np.array([state.client_index[c] for c in client_ids], dtype=np.int64)
    except KeyError as e:
        raise KeyError(f"unknown client {e.args[0]!r}; call ensure_clients first") from None


def advance_round(state: AlignmentState, round: int | None = None) -> AlignmentState:
    """Mark a round completed: ``round`` (default ``state.round + 1``), and ``fitness.t``."""
    r = state.round + 1 if round is None else int(round)
    return replace(state, round=r, fitness=replace(state.fitness, t=r))


def _arr(a: np.ndarray) -> dict:
    return {"dtype": str(a.dtype), "shape": list(a.shape), "data": a.ravel().tolist()}


def _unarr(d: Mapping) -> np.ndarray:
    return np.array(d["data"], dtype=d["dtype"]).reshape(d["shape"])


def state_to_dict(state: AlignmentState) -> tuple[dict, dict[str, np.ndarray]]:
    """``(json_dict, arrays)``; see the module docstring."""
    f, ld = state.fitness, state.load
    d = {
        "schema": SCHEMA_VERSION,
        "expert_keys": list(state.expert_keys),
        "client_index": dict(state.client_index),
        "profiles": {cid: p.to_dict() for cid, p in state.profiles.items()},
        "fitness": {"t": int(f.t), "q0": float(f.q0)},
        "load": {k: _arr(getattr(ld, k)) for k in (
            "tokens_total", "clients_total", "tokens_last", "clients_last",
            "last_trained_round", "price")},
        "round": int(state.round),
        "opt_state": None if state.opt_state is None else {"step": int(state.opt_state.step)},
    }
    arrays = {f"fitness/{name}": getattr(f, name) for name in FITNESS_ARRAYS}
    if state.opt_state is not None:
        arrays.update(state.opt_state.to_arrays())
    return d, arrays


def state_from_dict(d: Mapping, arrays: Mapping[str, np.ndarray] | None = None) -> AlignmentState:
    """Inverse of :func:`state_to_dict`."""
    if d.get("schema") not in (1, SCHEMA_VERSION):
        raise ValueError(f"unsupported alignment-state schema {d.get('schema')!r}")
    f = d["fitness"]
    rows, cols = len(d["client_index"]), len(d["expert_keys"])

    def fitness(name: str) -> np.ndarray | None:
        if name == "influence" and f"fitness/{name}" not in (arrays or {}) and name not in f:
            return None  # a checkpoint from before the capture cap: no influence recorded yet
        if d["schema"] == 1:
            return _unarr(f[name])
        # the shape is restored because arrays that passed through lists lose it when empty
        shape = (rows,) if name == "seen" else (rows, cols)
        a = np.asarray((arrays or {})[f"fitness/{name}"])
        if a.size and a.dtype != FITNESS_ARRAYS[name]:
            raise ValueError(f"fitness/{name} has dtype {a.dtype}, expected {np.dtype(FITNESS_ARRAYS[name])}")
        if a.size != int(np.prod(shape)):
            raise ValueError(f"fitness/{name} has shape {a.shape}, expected {shape}")
        return a.astype(FITNESS_ARRAYS[name], copy=False).reshape(shape)

    opt = None
    if d.get("opt_state") is not None:
        opt = ServerOptState.from_arrays(dict(arrays or {}), d["opt_state"]["step"])
    return AlignmentState(
        expert_keys=list(d["expert_keys"]),
        client_index={k: int(v) for k, v in d["client_index"].items()},
        profiles={cid: ClientProfile.from_dict(p) for cid, p in d["profiles"].items()},
        fitness=FitnessState(Q=fitness("Q"), n=fitness("n"), seen=fitness("seen"), t=int(f["t"]), q0=float(f["q0"]),
                             influence=fitness("influence")),
        load=LoadState(**{k: _unarr(v) for k, v in d["load"].items()}),
        round=int(d["round"]),
        opt_state=opt,
    )
