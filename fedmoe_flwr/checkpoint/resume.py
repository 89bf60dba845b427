"""Resume policy: which checkpoint a run continues from, with which config, and the Flower
wrappers that continue it through Flower's own ``Strategy.start``.

The run's randomness derives from ``(seed, round, client)`` and clients are stateless, so a
run continued from round ``r``'s model and strategy state repeats the uninterrupted run
exactly. :class:`ResumedStrategy` forwards every hook with ``server_round + r`` so Flower's
``start()`` (which always counts rounds from 1) drives rounds ``r+1 .. num_rounds``;
:func:`offset_evaluate_fn` does the same for ``evaluate_fn`` and skips the repeated round-0
evaluation. :func:`prepare_resume` picks the newest checkpoint that loads, fits the run's
model and restores into the strategy; every newer one is quarantined, so the rounds the
resumed run writes again never meet a checkpoint directory of their own.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from fedmoe_flwr.strategies.wrapper import StrategyWrapper

from .payload import Checkpoint, capture_rng, restore_rng
from .store import CHECKPOINT_DIR, CheckpointError, atomic_write_bytes, checkpoint_dir, load_latest, save_checkpoint

log = logging.getLogger("fedmoe_flwr")

# Config keys that do not change what the rounds compute: they may differ on resume.
RUN_CONTROL_KEYS = (
    "resume", "quiet", "verbose", "report", "loggers", "checkpoint_every", "checkpoint_keep",
    "num_rounds", "backend", "num_cpus_per_client", "num_workers", "ray_address", "save_model", "targets",
)


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
    than the saved one raises ``ValueError`` naming it. Without a usable checkpoint, ``cfg``
    (the run then starts afresh; :func:`prepare_resume` sets the bad ones aside).
    """
    from fedmoe_flwr.config import flatten, unflatten

    try:
        ck = load_latest(run_dir)
    except CheckpointError as ex:
        log.warning("resume: %s; the run starts from round 0 with the config of this command line "
                    "(the checkpointed run's own overrides are not recovered from bad checkpoints)", ex)
        return cfg
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


def model_tensors_for(cfg) -> dict:
    """The tensors of the model ``cfg`` builds (the per-process skeleton the ServerApp also
    uses, so no second model is built): what a checkpoint's model must match in shape."""
    from fedmoe_flwr.experiment import experiment_for

    return dict(experiment_for(cfg)[2].state_dict())


def prepare_resume(run_dir: str | os.PathLike, cfg, strategy, *, expected: Mapping | None = None) -> Checkpoint | None:
    """Load ``run_dir``'s newest good checkpoint into ``strategy`` for a resumed run.

    A checkpoint is good when it loads (see :func:`.store.load_checkpoint`), its model
    matches ``expected`` (the run's model tensors; default :func:`model_tensors_for`),
    its metrics rows are exactly rounds ``0 .. round`` and ``strategy`` accepts its state.
    Newer checkpoints that are not are moved to ``checkpoints/corrupt/`` with the reason
    (logged). Returns the checkpoint (its model, rows and round), or None when the run has
    no usable checkpoint (the run then starts from round 0 with ``strategy`` as it was).
    Raises ValueError when ``cfg`` would compute different rounds than the checkpointed
    run (see :data:`RUN_CONTROL_KEYS`).
    """
    from fedmoe_flwr.config import flatten

    if expected is None:
        expected = model_tensors_for(cfg)
    pristine, rng_before = strategy.state_dict(), capture_rng()

    def restores(ck: Checkpoint) -> None:
        rounds = [row["round"] for row in ck.metrics]
        if rounds != list(range(ck.round + 1)):
            raise CheckpointError(f"checkpoint {ck.path} holds metrics rows of rounds {rounds}, not 0..{ck.round}: "
                                  "the resumed run would repeat or skip rows")
        try:
            ck.restore(strategy)
        except Exception as ex:  # strategies raise whatever their state's parsing raises
            raise CheckpointError(f"checkpoint {ck.path}'s strategy state does not load into "
                                  f"{type(strategy).__name__} ({type(ex).__name__}: {ex})") from ex

    try:
        ck = load_latest(run_dir, quarantine=True, expected=expected, check=restores)
    except CheckpointError as ex:  # every checkpoint was bad (each is now quarantined)
        log.warning("resume: %s", ex)
        strategy.load_state_dict(pristine)  # undo what a rejected checkpoint may have loaded
        restore_rng(*rng_before)
        ck = None
    if ck is None:
        log.warning("resume: %s has no usable checkpoint; starting from round 0", checkpoint_dir(run_dir))
        return None
    current = flatten(cfg)
    diffs = config_differences(ck.config, current)
    if diffs:
        detail = ", ".join(f"{k}: checkpoint {ck.config.get(k)!r}, now {current.get(k)!r}" for k in diffs)
        raise ValueError(f"resume: the config differs from the checkpoint {ck.path}'s in keys that change the rounds: {detail}")
    if ck.round > cfg.num_rounds:
        raise ValueError(f"resume: checkpoint {ck.path} is at round {ck.round}, past num_rounds={cfg.num_rounds}")
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


# ---------------------------------------------------------------------------- Flower wrappers
class ResumedStrategy(StrategyWrapper):
    """Delegates every hook to ``inner`` with the round shifted by ``offset``.

    Flower's ``start()`` counts rounds from 1; wrapped, its round 1 is the inner strategy's
    round ``offset + 1``, so the round loop stays Flower's. Other attributes are the inner
    strategy's.
    """

    def __init__(self, inner, offset: int):
        super().__init__(inner)
        self.offset = int(offset)

    def inner_round(self, server_round: int) -> int:
        return server_round + self.offset

    def summary(self) -> None:
        self.inner.summary()
        log.info("resuming %s after round %d", type(self.inner).__name__, self.offset)


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
