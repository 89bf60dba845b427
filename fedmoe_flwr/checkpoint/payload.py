"""What a checkpoint holds in memory, and the checks its contents must pass.

:mod:`.store` turns files into these objects; this module knows their shape: the
strategy state with its array tables split out to a tensor file, the global RNG states,
and the rules a loaded checkpoint must satisfy (row rounds, tensor shapes) before a run
may continue from it. Every check returns the problems it found as sentences, so the
caller can name the file they came from.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TENSORS_KEY = "$tensors"  # marks a strategy-state table whose arrays live in the tensor file


@dataclass
class Checkpoint:
    """One loaded checkpoint.

    Attributes:
        round: the last completed round.
        model: global model tensors in their original order (numpy, original dtypes).
        strategy_state: what ``strategy.load_state_dict`` takes.
        metrics: the ``metrics.jsonl`` rows of rounds ``0 .. round``.
        details: the ``details.jsonl`` rows of rounds ``1 .. round``.
        config: the run's flat config (:func:`fedmoe_flwr.config.flatten`).
        path: the checkpoint directory.
    """

    round: int
    model: "OrderedDict[str, np.ndarray]"
    strategy_state: dict
    metrics: list[dict]
    details: list[dict]
    config: dict
    path: Path
    rng: dict = field(default_factory=dict)
    rng_tensors: dict = field(default_factory=dict)

    def array_record(self):
        """The global model as a Flower ``ArrayRecord`` (same names, order and dtypes)."""
        from flwr.app import Array, ArrayRecord

        return ArrayRecord(OrderedDict((n, Array(np.ascontiguousarray(a))) for n, a in self.model.items()))

    def restore(self, strategy) -> None:
        """Load the strategy state into ``strategy`` and restore the global RNG states."""
        strategy.load_state_dict(self.strategy_state)
        if self.rng:
            restore_rng(self.rng, self.rng_tensors)


# ---------------------------------------------------------------------------- strategy state
def split_strategy_state(sd: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """Move the strategy's array tables (top-level ``*_arrays`` dicts) to a tensor file.

    ``ExpertStrategy.state_dict()`` gives its server-optimizer moments as lists under
    ``alignment_arrays``; ``np.asarray`` of them is exactly what ``load_state_dict`` would
    rebuild, so storing that array loses nothing and keeps the JSON small.
    """
    json_part, tensors = {}, {}
    for key, value in sd.items():
        if key.endswith("_arrays") and isinstance(value, dict):
            json_part[key] = {TENSORS_KEY: sorted(value)}
            for name, arr in value.items():
                tensors[f"{key}/{name}"] = np.asarray(arr)
        else:
            json_part[key] = value
    return json_part, tensors


def _is_table(value) -> bool:
    return isinstance(value, dict) and set(value) == {TENSORS_KEY}


def join_strategy_state(json_part: dict, tensors: Mapping[str, np.ndarray]) -> dict:
    """Inverse of :func:`split_strategy_state`; run :func:`strategy_problems` first."""
    sd = {}
    for key, value in json_part.items():
        if _is_table(value):
            sd[key] = {name: tensors[f"{key}/{name}"] for name in value[TENSORS_KEY]}
        else:
            sd[key] = value
    return sd


def strategy_problems(json_part, tensors: Mapping[str, np.ndarray]) -> list[str]:
    """Why the strategy part of ``state.json`` and the strategy tensor file do not fit together."""
    if not isinstance(json_part, dict):
        return [f"'strategy' is a {type(json_part).__name__}, not an object"]
    problems = []
    for key, value in json_part.items():
        if not _is_table(value):
            continue
        names = value[TENSORS_KEY]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            problems.append(f"strategy table {key!r} does not list tensor names")
            continue
        missing = [n for n in names if f"{key}/{n}" not in tensors]
        if missing:
            problems.append(f"strategy table {key!r} lists tensors the strategy file lacks: {missing[:3]}")
    return problems


# ---------------------------------------------------------------------------- RNG states
def capture_rng() -> tuple[dict, dict[str, np.ndarray]]:
    """numpy's and Python's global RNG states (JSON) and torch's (a tensor)."""
    import torch

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    py = random.getstate()
    js = {
        "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "python": [py[0], list(py[1]), py[2]],
    }
    return js, {"torch": torch.get_rng_state().numpy()}


def _rng_parts(js: dict, tensors: Mapping[str, np.ndarray]):
    n, py = js["numpy"], js["python"]
    numpy_state = (n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    python_state = (py[0], tuple(py[1]), py[2])
    torch_state = np.array(tensors["torch"], dtype=np.uint8)
    return numpy_state, python_state, torch_state


def restore_rng(js: dict, tensors: Mapping[str, np.ndarray]) -> None:
    """Set the global RNG states :func:`capture_rng` returned."""
    import torch

    numpy_state, python_state, torch_state = _rng_parts(js, tensors)
    np.random.set_state(numpy_state)
    random.setstate(python_state)
    torch.set_rng_state(torch.from_numpy(torch_state))


def rng_problems(js, tensors: Mapping[str, np.ndarray]) -> list[str]:
    """Why these RNG states cannot be restored; tried on private generators, so the global
    ones are untouched whatever the answer."""
    import torch

    if not js:
        return []
    try:
        numpy_state, python_state, torch_state = _rng_parts(js, tensors)
        np.random.RandomState().set_state(numpy_state)
        random.Random().setstate(python_state)
        torch.Generator().set_state(torch.from_numpy(torch_state))
    except Exception as ex:  # numpy, random and torch each raise their own types
        return [f"its RNG states cannot be restored ({type(ex).__name__}: {ex})"]
    return []


# ---------------------------------------------------------------------------- rows and shapes
def row_problems(rows, what: str, last_round: int, first_round: int = 0) -> list[str]:
    """Rows must be objects whose ``round`` values rise strictly within
    ``first_round .. last_round``: a row past the checkpoint's round, or a repeated one,
    would be written again by the resumed run."""
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        return [f"its {what} rows are not a list of objects"]
    rounds = [r.get("round") for r in rows]
    if not all(type(r) is int for r in rounds):
        return [f"its {what} rows have a missing or non-integer round"]
    if any(b <= a for a, b in zip(rounds, rounds[1:])) or (rounds and not first_round <= rounds[0] <= rounds[-1] <= last_round):
        return [f"its {what} rows are of rounds {rounds[:3]}..{rounds[-3:]}, not rising within {first_round}..{last_round}"]
    return []


def array_spec(a) -> tuple[tuple[int, ...], str]:
    """``(shape, dtype name)`` of a numpy array or a torch tensor ("float32", "int64", ...)."""
    return tuple(int(d) for d in a.shape), str(a.dtype).removeprefix("torch.")


def shape_problems(model: Mapping[str, np.ndarray], strategy_state: dict, expected: Mapping) -> list[str]:
    """How the checkpoint's arrays differ from what the run's model expects.

    ``expected``: the model's tensors (numpy or torch; only shapes and dtypes are read),
    e.g. the freshly built model's ``state_dict()``. The model must have exactly these
    names, shapes and dtypes. Strategy arrays named ``<kind>/<model tensor>`` (the server
    optimizer's moments ``m/<name>``, ``v/<name>``) must have that tensor's shape.
    """
    spec = {name: array_spec(a) for name, a in expected.items()}
    problems = []
    missing, extra = sorted(set(spec) - set(model)), sorted(set(model) - set(spec))
    if missing or extra:
        problems.append(f"its model tensors differ from the run's model (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, arr in model.items():
        if name in spec and array_spec(arr) != spec[name]:
            problems.append(f"model tensor {name!r} is {array_spec(arr)}, the run's model has {spec[name]}")
    for table in strategy_state.values():
        if not isinstance(table, dict):
            continue
        for key, arr in table.items():
            param = key.partition("/")[2]
            if isinstance(arr, np.ndarray) and param in spec and arr.shape != spec[param][0]:
                problems.append(f"strategy array {key!r} has shape {arr.shape}, model tensor {param!r} has {spec[param][0]}")
    return problems
