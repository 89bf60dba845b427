"""Checkpoint files: the on-disk format, atomic writes, verification, listing, quarantine.

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
      corrupt/                   checkpoints found unusable, each with a ``.reason.txt``
      replaced/                  a checkpoint directory a later save of the same round met

A checkpoint is written into ``round-XXXXXX.tmp-<pid>/`` (every file fsync'ed) and renamed
into place; an existing directory of that round is moved to ``replaced/``, never deleted.
Retention then deletes what is older than the newest ``keep`` *verified* checkpoints at or
below the saved round: a bad checkpoint, or one newer than the run's own, never counts, so
it never costs a good one its place.

Loading trusts nothing in ``state.json``: its round must be the directory's, the tensor
files must be exactly the three above, inside the directory, with matching digests, and the
rows, strategy tables and RNG states must fit together (optionally the tensor shapes must
match the run's model). Any failure raises :class:`CheckpointError` naming the file;
:func:`load_latest` then falls back to the next older checkpoint, never writing to it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from .payload import (
    Checkpoint,
    array_spec,
    capture_rng,
    join_strategy_state,
    rng_problems,
    row_problems,
    shape_problems,
    split_strategy_state,
    strategy_problems,
)

log = logging.getLogger("fedmoe_flwr")

FORMAT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
QUARANTINE_DIR = "corrupt"
REPLACED_DIR = "replaced"
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
STRATEGY_FILE = "strategy.safetensors"
RNG_FILE = "rng.safetensors"
TENSOR_FILES = (MODEL_FILE, STRATEGY_FILE, RNG_FILE)
_NAME = re.compile(r"^round-(\d{6,})$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


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


def _tensor_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in arrays.items()})


# ---------------------------------------------------------------------------- listing
def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def checkpoint_round(path: str | os.PathLike) -> int | None:
    """The round a checkpoint directory's name gives (``round-000012`` -> 12), else None."""
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories (complete or not, good or not), oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(checkpoint_round(p), p) for p in root.iterdir() if p.is_dir() and checkpoint_round(p) is not None]
    return [p for _, p in sorted(found)]


def set_aside(path: Path, folder: str, reason: str) -> Path:
    """Move a checkpoint directory into ``checkpoints/<folder>/`` (never over another) and
    write ``<name>.reason.txt`` beside it; returns where it went."""
    dest_root = path.parent / folder
    dest_root.mkdir(exist_ok=True)
    dest = dest_root / path.name
    n = 1
    while dest.exists() or dest.with_name(dest.name + ".reason.txt").exists():
        dest = dest_root / f"{path.name}-{n}"
        n += 1
    os.replace(path, dest)
    _fsync_dir(path.parent)
    atomic_write_bytes(dest.with_name(dest.name + ".reason.txt"), (reason.rstrip() + "\n").encode("utf-8"))
    return dest


def quarantine_checkpoint(path: str | os.PathLike, reason: str) -> Path:
    """Move an unusable checkpoint to ``checkpoints/corrupt/`` with its reason; logged."""
    dest = set_aside(Path(path), QUARANTINE_DIR, reason)
    log.warning("moved the unusable checkpoint %s to %s (reason in %s.reason.txt)", path, dest, dest.name)
    return dest


# ---------------------------------------------------------------------------- save
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
    ``strategy`` needs ``state_dict()``. Keeps the newest ``keep`` (>= 1) good checkpoints.
    """
    if isinstance(server_round, bool) or not isinstance(server_round, (int, np.integer)) or server_round < 0:
        raise ValueError(f"server_round must be an integer >= 0, got {server_round!r}")
    server_round = int(server_round)
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
    strat_json, strat_tensors = split_strategy_state(strategy.state_dict())
    rng_json, rng_tensors = capture_rng()
    blobs = {MODEL_FILE: _tensor_bytes(model), STRATEGY_FILE: _tensor_bytes(strat_tensors), RNG_FILE: _tensor_bytes(rng_tensors)}
    for name, data in blobs.items():
        _write_bytes(tmp / name, data)
    state = {
        "format": FORMAT_VERSION,
        "round": server_round,
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

    if final.exists():  # only a stale or foreign directory can be here: keep it for inspection
        dest = set_aside(final, REPLACED_DIR, f"a new checkpoint of round {server_round} was written at {time.ctime()}")
        log.warning("checkpoint %s already existed; moved it to %s", final, dest)
    os.replace(tmp, final)
    _fsync_dir(root)
    _prune(root, keep, server_round, model)
    return final


def _prune(root: Path, keep: int, saved_round: int, model: Mapping[str, np.ndarray]) -> None:
    """Delete checkpoints older than the newest ``keep`` good ones at or below ``saved_round``
    (the one just written counts; older ones count once they load and match its tensor
    shapes), and temporaries left by killed processes. Newer directories are not this
    run's lineage and are left alone; a resume quarantines them."""
    ours = [p for p in list_checkpoints(root.parent) if checkpoint_round(p) <= saved_round]
    good = 0
    for p in reversed(ours):
        if good >= max(1, keep):
            shutil.rmtree(p, ignore_errors=True)
        elif checkpoint_round(p) == saved_round or _verifies(p, model):
            good += 1
    for p in root.iterdir():
        if (".tmp-" in p.name or ".old-" in p.name) and not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)  # left by a killed process


def _verifies(path: Path, expected: Mapping) -> bool:
    try:
        load_checkpoint(path, expected=expected)
    except CheckpointError as ex:
        log.warning("retention does not count %s: %s", path, ex)
        return False
    return True


# ---------------------------------------------------------------------------- load
def load_checkpoint(path: str | os.PathLike, *, expected: Mapping | None = None) -> Checkpoint:
    """Load and verify one checkpoint directory; :class:`CheckpointError` names a bad file.

    ``expected``: the run's model tensors (see :func:`.payload.shape_problems`); when given,
    the checkpoint's model and moments must match their shapes and dtypes.
    """
    path = Path(path)
    state_path = path / STATE_FILE
    try:
        return _load(path, state_path, expected)
    except CheckpointError:
        raise
    except Exception as ex:  # whatever else a damaged file provokes is still a bad checkpoint
        raise CheckpointError(f"checkpoint {path} is unusable ({type(ex).__name__}: {ex})") from ex


def _inside(path: Path, fpath: Path) -> bool:
    return fpath.resolve().is_relative_to(path.resolve())


def _load(path: Path, state_path: Path, expected: Mapping | None) -> Checkpoint:
    from safetensors.numpy import load

    def bad(reason: str, file: Path = state_path) -> CheckpointError:
        return CheckpointError(f"checkpoint file {file} {reason}")

    if path.is_symlink():  # its files would all lie outside the run directory
        raise CheckpointError(f"checkpoint directory {path} is a symbolic link; only real directories are read")
    try:
        if not _inside(path, state_path):
            raise bad("points outside its checkpoint directory")
        raw = state_path.read_bytes()
    except OSError as ex:
        raise bad(f"is missing or unreadable ({ex.strerror or ex}): the checkpoint is incomplete") from ex
    try:
        state = json.loads(raw.decode("utf-8"))
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as ex:
        raise bad(f"is corrupt or truncated ({ex})") from ex
    if state.get("format") != FORMAT_VERSION:
        raise bad(f"has format {state.get('format')!r}; this version reads {FORMAT_VERSION}")
    missing = [k for k in ("round", "files", "strategy", "metrics", "config") if k not in state]
    if missing:
        raise bad(f"is corrupt: missing {missing}")
    rnd, named = state["round"], checkpoint_round(path)
    if type(rnd) is not int or rnd < 0:
        raise bad(f"is corrupt: round {rnd!r} is not an integer >= 0")
    if named is not None and rnd != named:
        raise bad(f"says round {rnd} but its directory is {path.name}: the checkpoint is inconsistent")
    files = state["files"]
    if not isinstance(files, dict) or sorted(files) != sorted(TENSOR_FILES):
        listed = sorted(files) if isinstance(files, dict) else files
        raise bad(f"lists the tensor files {listed!r}; a checkpoint has exactly {list(TENSOR_FILES)}")
    tensors = {}
    for name in TENSOR_FILES:
        fpath, digest = path / name, files[name]
        if not isinstance(digest, str) or not _DIGEST.match(digest):
            raise bad(f"gives {name} the digest {digest!r}, not a SHA-256 hex digest")
        if not _inside(path, fpath):
            raise bad("points outside its checkpoint directory (only files inside it are read)", fpath)
        try:
            data = fpath.read_bytes()
        except OSError as ex:
            raise bad(f"is missing or unreadable ({ex.strerror or ex})", fpath) from ex
        if _sha256(data) != digest:
            raise bad(f"is corrupt or truncated ({len(data)} bytes; its SHA-256 does not match {STATE_FILE})", fpath)
        try:
            tensors[name] = load(data)
        except Exception as ex:  # safetensors raises its own error types
            raise bad(f"is not a readable safetensors file ({ex})", fpath) from ex
    model_t = tensors[MODEL_FILE]
    order = state.get("model_order") or sorted(model_t)
    if not isinstance(order, list) or not all(isinstance(n, str) for n in order) or sorted(order) != sorted(model_t):
        raise bad(f"does not hold the tensors {STATE_FILE} lists", path / MODEL_FILE)
    details = state.get("details", [])
    problems = (strategy_problems(state["strategy"], tensors[STRATEGY_FILE])
                + row_problems(state["metrics"], "metrics", rnd)
                + row_problems(details, "details", rnd, first_round=1)
                + ([] if isinstance(state["config"], dict) else ["its config is not an object"])
                + rng_problems(state.get("rng") or {}, tensors[RNG_FILE]))
    if problems:
        raise bad("is inconsistent: " + "; ".join(problems))
    ck = Checkpoint(
        round=rnd,
        model=OrderedDict((n, model_t[n]) for n in order),
        strategy_state=join_strategy_state(state["strategy"], tensors[STRATEGY_FILE]),
        metrics=list(state["metrics"]),
        details=list(details),
        config=dict(state["config"]),
        path=path,
        rng=state.get("rng") or {},
        rng_tensors=tensors[RNG_FILE],
    )
    if expected is not None and (problems := shape_problems(ck.model, ck.strategy_state, expected)):
        raise CheckpointError(f"checkpoint {path} does not fit the run's model: " + "; ".join(problems))
    return ck


def load_latest(
    run_dir: str | os.PathLike,
    *,
    quarantine: bool = False,
    expected: Mapping | None = None,
    check: Callable[[Checkpoint], None] | None = None,
) -> Checkpoint | None:
    """The newest good checkpoint of ``run_dir``, or None if it has none at all.

    A checkpoint that fails to load (any error, see :func:`load_checkpoint`; ``expected``
    as there) or that ``check`` raises on is logged, naming the bad file, and skipped in
    favour of the previous one. With ``quarantine`` each skipped one is moved to
    ``checkpoints/corrupt/`` with its reason (kept for inspection, and so a resumed run
    never writes over it). If every checkpoint is bad, raises :class:`CheckpointError`
    listing them (after quarantining them, with ``quarantine``).
    """
    errors = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            ck = load_checkpoint(path, expected=expected)
            if check is not None:
                check(ck)
        except Exception as ex:  # any failure: this checkpoint is bad, try the one before
            msg = str(ex) if isinstance(ex, CheckpointError) else f"checkpoint {path} is unusable ({type(ex).__name__}: {ex})"
            errors.append((path, msg))
            log.warning("%s; falling back to the previous checkpoint", msg)
            continue
        _quarantine_all(errors, quarantine)
        return ck
    _quarantine_all(errors, quarantine)
    if errors:
        listing = "\n  ".join(msg for _, msg in errors)
        raise CheckpointError(f"no usable checkpoint in {checkpoint_dir(run_dir)}:\n  {listing}")
    return None


def _quarantine_all(errors: list[tuple[Path, str]], enabled: bool) -> None:
    if enabled:
        for bad, msg in errors:
            quarantine_checkpoint(bad, msg)

