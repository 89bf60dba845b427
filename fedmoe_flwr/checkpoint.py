"""Checkpoints of a run, and exact resume through Flower's own ``Strategy.start``.

Layout (inside the run directory)::

    checkpoints/
      round-000010/              one complete checkpoint per directory, named by round
        model.safetensors        the global model (the ArrayRecord's tensors, dtypes kept)
        strategy.safetensors     the strategy's large arrays (server-optimizer moments, ...)
        rng.safetensors          torch's global RNG state
        state.json               written last: format, round, SHA-256 of the tensor files,
                                 the strategy state, the metrics and details rows so far,
                                 the flat config, numpy's and Python's global RNG states
      round-000015/
      corrupt/                   checkpoints found unreadable on resume are moved here

A checkpoint is written into ``round-XXXXXX.tmp-<pid>/`` (every file fsync'ed), renamed
into place, then older checkpoints beyond ``keep`` are deleted: the previous checkpoint
survives until the new one is complete. Loading checks every file against the digests in
``state.json``; a corrupt or truncated checkpoint raises :class:`CheckpointError` naming
the file, and :func:`load_latest` falls back to the newest good one (never writing to it).

Resume: the run's randomness derives from ``(seed, round, client)`` and clients are
stateless, so a run continued from round ``r``'s model and strategy state repeats the
uninterrupted run exactly. :class:`ResumedStrategy` forwards every hook with
``server_round + r`` so Flower's ``start()`` (which always counts rounds from 1) drives
rounds ``r+1 .. num_rounds``; :func:`offset_evaluate_fn` does the same for ``evaluate_fn``
and skips the repeated round-0 evaluation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.serverapp.strategy import Strategy

log = logging.getLogger("fedmoe_flwr")

FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
STRATEGY_FILE = "strategy.safetensors"
RNG_FILE = "rng.safetensors"
_NAME = re.compile(r"^round-(\d{6,})$")

# Config keys that do not change what the rounds compute: they may differ on resume.
RUN_CONTROL_KEYS = (
    "resume", "quiet", "verbose", "report", "loggers", "checkpoint_every", "checkpoint_keep",
    "num_rounds", "backend", "num_cpus_per_client", "save_model", "targets",
)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and the reason."""


# ---------------------------------------------------------------------------- file helpers
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``path`` atomically: a temporary file beside it, fsync, rename, fsync the dir."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _write_bytes(tmp, data)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensor_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in arrays.items()})


# ---------------------------------------------------------------------------- strategy state
def _split_strategy_state(sd: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """Move the strategy's array tables (top-level ``*_arrays`` dicts) to a tensor file.

    ``ExpertStrategy.state_dict()`` gives its server-optimizer moments as lists under
    ``alignment_arrays``; ``np.asarray`` of them is exactly what ``load_state_dict`` would
    rebuild, so storing that array loses nothing and keeps the JSON small.
    """
    json_part, tensors = {}, {}
    for key, value in sd.items():
        if key.endswith("_arrays") and isinstance(value, dict):
            json_part[key] = {"$tensors": sorted(value)}
            for name, arr in value.items():
                tensors[f"{key}/{name}"] = np.asarray(arr)
        else:
            json_part[key] = value
    return json_part, tensors


def _join_strategy_state(json_part: dict, tensors: dict[str, np.ndarray]) -> dict:
    sd = {}
    for key, value in json_part.items():
        if isinstance(value, dict) and set(value) == {"$tensors"}:
            sd[key] = {name: tensors[f"{key}/{name}"] for name in value["$tensors"]}
        else:
            sd[key] = value
    return sd


def _rng_state() -> tuple[dict, dict[str, np.ndarray]]:
    import torch

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    py = random.getstate()
    js = {
        "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
        "python": [py[0], list(py[1]), py[2]],
    }
    return js, {"torch": torch.get_rng_state().numpy()}


def _set_rng_state(js: dict, tensors: dict[str, np.ndarray]) -> None:
    import torch

    n = js["numpy"]
    np.random.set_state((n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    py = js["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(torch.from_numpy(np.array(tensors["torch"], dtype=np.uint8)))


# ---------------------------------------------------------------------------- checkpoint
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
            _set_rng_state(self.rng, self.rng_tensors)


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories (complete or not), oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    run_dir: str | os.PathLike,
    server_round: int,
    arrays,
    strategy,
    *,
    metrics: list[dict],
    details: list[dict] | None = None,
    config: dict | None = None,
    keep: int = 2,
) -> Path:
    """Write round ``server_round``'s checkpoint atomically; returns its directory.

    ``arrays`` is the global model (a Flower ``ArrayRecord`` or a ``{name: array}`` dict);
    ``strategy`` needs ``state_dict()``. Keeps the newest ``keep`` (>= 1) checkpoints.
    """
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{server_round:06d}"
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    from flwr.app import ArrayRecord

    if isinstance(arrays, ArrayRecord):
        model = OrderedDict((n, a.numpy()) for n, a in arrays.items())
    else:
        model = OrderedDict((n, np.asarray(a)) for n, a in arrays.items())
    strat_json, strat_tensors = _split_strategy_state(strategy.state_dict())
    rng_json, rng_tensors = _rng_state()
    blobs = {MODEL_FILE: _tensor_bytes(model), STRATEGY_FILE: _tensor_bytes(strat_tensors), RNG_FILE: _tensor_bytes(rng_tensors)}
    for name, data in blobs.items():
        _write_bytes(tmp / name, data)
    state = {
        "format": FORMAT_VERSION,
        "round": int(server_round),
        "created": time.time(),
        "files": {name: _sha256(data) for name, data in blobs.items()},
        "model_order": list(model),
        "strategy_class": type(strategy).__name__,
        "strategy": strat_json,
        "metrics": list(metrics),
        "details": list(details or []),
        "config": dict(config or {}),
        "rng": rng_json,
    }
    _write_bytes(tmp / STATE_FILE, json.dumps(state).encode("utf-8"))
    _fsync_dir(tmp)

    old = None
    if final.exists():  # the same round written again (a resumed run repeating it)
        old = root / f"{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    """Delete checkpoints older than the newest ``keep`` complete ones, and stale temporaries."""
    complete = [p for p in list_checkpoints(root.parent) if (p / STATE_FILE).exists()]
    for p in complete[: max(0, len(complete) - max(1, keep))]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.iterdir():
        if (".tmp-" in p.name or ".old-" in p.name) and not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)  # left by a killed process


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load and verify one checkpoint directory; :class:`CheckpointError` names a bad file."""
    from safetensors.numpy import load

    path = Path(path)
    state_path = path / STATE_FILE
    try:
        raw = state_path.read_bytes()
    except OSError as ex:
        raise CheckpointError(f"checkpoint file {state_path} is missing or unreadable ({ex.strerror or ex}): the checkpoint is incomplete") from ex
    try:
        state = json.loads(raw.decode("utf-8"))
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as ex:
        raise CheckpointError(f"checkpoint file {state_path} is corrupt or truncated ({ex})") from ex
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint file {state_path} has format {state.get('format')!r}; this version reads {FORMAT_VERSION}")
    missing = [k for k in ("round", "files", "strategy", "metrics", "config") if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint file {state_path} is corrupt: missing {missing}")
    tensors = {}
    for name, digest in state["files"].items():
        fpath = path / name
        try:
            data = fpath.read_bytes()
        except OSError as ex:
            raise CheckpointError(f"checkpoint file {fpath} is missing or unreadable ({ex.strerror or ex})") from ex
        if _sha256(data) != digest:
            raise CheckpointError(f"checkpoint file {fpath} is corrupt or truncated ({len(data)} bytes; its SHA-256 does not match {STATE_FILE})")
        try:
            tensors[name] = load(data)
        except Exception as ex:  # safetensors raises its own error types
            raise CheckpointError(f"checkpoint file {fpath} is not a readable safetensors file ({ex})") from ex
    model_t = tensors.get(MODEL_FILE, {})
    order = state.get("model_order") or sorted(model_t)
    if set(order) != set(model_t):
        raise CheckpointError(f"checkpoint file {path / MODEL_FILE} does not hold the tensors {STATE_FILE} lists")
    return Checkpoint(
        round=int(state["round"]),
        model=OrderedDict((n, model_t[n]) for n in order),
        strategy_state=_join_strategy_state(state["strategy"], tensors.get(STRATEGY_FILE, {})),
        metrics=list(state["metrics"]),
        details=list(state.get("details", [])),
        config=dict(state["config"]),
        path=path,
        rng=state.get("rng") or {},
        rng_tensors=tensors.get(RNG_FILE, {}),
    )


def load_latest(run_dir: str | os.PathLike, *, quarantine: bool = False) -> Checkpoint | None:
    """The newest good checkpoint of ``run_dir``, or None if it has none at all.

    Unreadable checkpoints are logged (naming the bad file) and skipped in favour of the
    previous one; with ``quarantine`` they are moved to ``checkpoints/corrupt/`` (kept for
    inspection, so a resumed run never writes over them). If every checkpoint is bad,
    raises :class:`CheckpointError` listing them.
    """
    paths = list_checkpoints(run_dir)
    errors = []
    for path in reversed(paths):
        try:
            ck = load_checkpoint(path)
        except CheckpointError as ex:
            errors.append((path, str(ex)))
            log.warning("%s; falling back to the previous checkpoint", ex)
            continue
        if quarantine:
            for bad, _ in errors:
                _quarantine(bad)
        return ck
    if errors:
        listing = "\n  ".join(msg for _, msg in errors)
        raise CheckpointError(f"no usable checkpoint in {checkpoint_dir(run_dir)}:\n  {listing}")
    return None


def _quarantine(path: Path) -> Path:
    dest_root = path.parent / "corrupt"
    dest_root.mkdir(exist_ok=True)
    dest = dest_root / path.name
    n = 1
    while dest.exists():
        dest = dest_root / f"{path.name}-{n}"
        n += 1
    os.replace(path, dest)
    log.warning("moved the unreadable checkpoint %s to %s", path, dest)
    return dest


# ---------------------------------------------------------------------------- config on resume
def config_differences(saved: dict, current: dict, *, ignore: Iterable[str] = RUN_CONTROL_KEYS) -> list[str]:
    """Flat keys whose values differ between two flat configs, run-control keys aside.

    A key the checkpoint lacks (the schema gained it later) counts only if ``current``
    sets it to something other than its default.
    """
    from fedmoe_flwr.config import Config, flatten

    skip = tuple(ignore)
    defaults = flatten(Config())

    def ignored(k: str) -> bool:
        return any(k == s or k.startswith(s + ".") for s in skip)

    def differs(k: str) -> bool:
        if k not in saved and k in defaults:
            return current.get(k) != defaults[k]
        return saved.get(k) != current.get(k)

    return [k for k in sorted(set(saved) | set(current)) if not ignored(k) and differs(k)]


def resume_config(run_dir: str | os.PathLike, cfg, overrides: Iterable[str] = ()):
    """The config a resumed run continues with: the checkpointed run's config, with the
    run-control keys (``num_rounds``, ``quiet``, ``report``, ...) the command line set.

    ``overrides`` are Hydra's task overrides (``key=value``). An override of a key that
    changes what rounds compute (``seed``, ``strategy``, ``train.lr`` ...) to a value other
    than the saved one raises ``ValueError`` naming it. Without a checkpoint, ``cfg``.
    """
    from fedmoe_flwr.config import flatten, unflatten

    ck = load_latest(run_dir)
    if ck is None:
        return cfg
    saved, current = ck.config, flatten(cfg)
    given = [o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o]

    def overridden(k: str) -> bool:
        return any(k == g or k.startswith(g + ".") for g in given)

    def run_control(k: str) -> bool:
        return any(k == s or k.startswith(s + ".") for s in RUN_CONTROL_KEYS)

    merged = {k: v for k, v in saved.items() if not (run_control(k) and overridden(k))}
    for k, v in current.items():
        if run_control(k) and (overridden(k) or k not in saved or k == "resume"):
            merged[k] = v
        elif k not in merged:
            merged[k] = v  # a key the schema gained since the checkpoint
    bad = [k for k in config_differences(saved, current) if overridden(k)]
    if bad:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r}, given {current.get(k)!r}" for k in bad)
        raise ValueError(f"resume continues the checkpointed run's config; these overrides change it: {detail}")
    return unflatten(merged)


def prepare_resume(run_dir: str | os.PathLike, cfg, strategy) -> Checkpoint | None:
    """Load ``run_dir``'s newest good checkpoint into ``strategy`` for a resumed run.

    Returns the checkpoint (its model, rows and round), or None when the run has no
    checkpoint yet (the run then starts from round 0). Unreadable newer checkpoints are
    moved to ``checkpoints/corrupt/``. Raises ValueError when ``cfg`` would compute
    different rounds than the checkpointed run (see :data:`RUN_CONTROL_KEYS`).
    """
    from fedmoe_flwr.config import flatten

    ck = load_latest(run_dir, quarantine=True)
    if ck is None:
        log.warning("resume: %s has no checkpoint; starting from round 0", checkpoint_dir(run_dir))
        return None
    diffs = config_differences(ck.config, flatten(cfg))
    if diffs:
        detail = ", ".join(f"{k}: checkpoint {ck.config.get(k)!r}, now {flatten(cfg).get(k)!r}" for k in diffs)
        raise ValueError(f"resume: the config differs from the checkpoint {ck.path}'s in keys that change the rounds: {detail}")
    if ck.round > cfg.num_rounds:
        raise ValueError(f"resume: checkpoint {ck.path} is at round {ck.round}, past num_rounds={cfg.num_rounds}")
    ck.restore(strategy)
    log.info("resume: continuing after round %d from %s", ck.round, ck.path)
    return ck


def set_aside_checkpoints(run_dir: str | os.PathLike) -> Path | None:
    """Move an earlier run's ``checkpoints/`` to ``checkpoints.earlier-<time>/`` before a fresh
    (not resumed) run in the same directory, so a later resume never mixes the two runs."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir() or not any(root.iterdir()):
        return None
    dest = root.with_name(f"{CHECKPOINT_DIR}.earlier-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while dest.exists():
        dest = dest.with_name(f"{dest.name}-{n}")
        n += 1
    os.replace(root, dest)
    log.warning("%s held checkpoints of an earlier run; moved to %s (resume=true continues a run)", root, dest)
    return dest


def save_resolved_config(cfg, run_dir: str | os.PathLike, subdir: str | None = ".hydra") -> None:
    """Rewrite Hydra's ``config.yaml`` with the config a resumed run really uses (Hydra
    wrote the freshly composed one, which lacks the original run's overrides)."""
    if not subdir:
        return
    from omegaconf import OmegaConf

    path = Path(run_dir) / subdir / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)).encode("utf-8"))


# ---------------------------------------------------------------------------- resume wrapper
class ResumedStrategy(Strategy):
    """Delegates every hook to ``inner`` with the round shifted by ``offset``.

    Flower's ``start()`` counts rounds from 1; wrapped, its round 1 is the inner strategy's
    round ``offset + 1``, so the round loop stays Flower's. Other attributes are the inner
    strategy's.
    """

    def __init__(self, inner, offset: int):
        self.inner = inner
        self.offset = int(offset)

    def __getattr__(self, name):
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def summary(self) -> None:
        self.inner.summary()
        log.info("resuming %s after round %d", type(self.inner).__name__, self.offset)

    def configure_train(self, server_round, arrays, config, grid):
        return self.inner.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        return self.inner.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.inner.aggregate_evaluate(server_round + self.offset, replies)


def offset_evaluate_fn(fn: Callable, offset: int) -> Callable:
    """``evaluate_fn`` for a resumed run: rounds shifted by ``offset``; round 0 (already
    evaluated and recorded before the checkpoint) is skipped."""

    def evaluate_fn(server_round: int, arrays):
        if server_round == 0:
            return None
        return fn(server_round + offset, arrays)

    return evaluate_fn


class Checkpointer:
    """Saves a checkpoint every ``every`` rounds and after the last round (``every`` <= 0: never)."""

    def __init__(self, run_dir: str | os.PathLike, every: int, num_rounds: int, *, keep: int = 2, config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.every = int(every)
        self.num_rounds = int(num_rounds)
        self.keep = keep
        self.config = dict(config or {})
        self.saved: list[int] = []

    def due(self, server_round: int) -> bool:
        return self.every > 0 and server_round > 0 and (server_round % self.every == 0 or server_round == self.num_rounds)

    def maybe_save(self, server_round: int, arrays, strategy, metrics: list[dict], details: list[dict]) -> Path | None:
        if not self.due(server_round):
            return None
        path = save_checkpoint(self.run_dir, server_round, arrays, strategy, metrics=metrics, details=details,
                               config=self.config, keep=self.keep)
        self.saved.append(server_round)
        return path
