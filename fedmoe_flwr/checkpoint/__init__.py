"""Checkpoints of a run, and exact resume through Flower's own ``Strategy.start``.

- :mod:`.store`: the files (format, atomic writes, digests, verification, listing,
  quarantine of bad checkpoints, retention).
- :mod:`.payload`: what a checkpoint holds in memory (strategy state, RNG states) and the
  consistency checks a loaded one must pass.
- :mod:`.resume`: the resume policy (config, which checkpoint, fallback) and the Flower
  wrappers that continue a run from it.

Where checkpoints sit among a run's outputs: docs/architecture.md#architecture.
"""

from .payload import Checkpoint
from .resume import (
    RUN_CONTROL_KEYS,
    Checkpointer,
    ResumedStrategy,
    config_differences,
    model_tensors_for,
    offset_evaluate_fn,
    prepare_resume,
    resume_config,
    save_resolved_config,
    set_aside_checkpoints,
)
from .store import (
    CHECKPOINT_DIR,
    FORMAT_VERSION,
    MODEL_FILE,
    QUARANTINE_DIR,
    REPLACED_DIR,
    RNG_FILE,
    STATE_FILE,
    STRATEGY_FILE,
    TENSOR_FILES,
    CheckpointError,
    atomic_write_bytes,
    checkpoint_dir,
    checkpoint_round,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    quarantine_checkpoint,
    save_checkpoint,
)

__all__ = [
    "CHECKPOINT_DIR", "FORMAT_VERSION", "MODEL_FILE", "QUARANTINE_DIR", "REPLACED_DIR", "RNG_FILE",
    "RUN_CONTROL_KEYS", "STATE_FILE", "STRATEGY_FILE", "TENSOR_FILES", "Checkpoint", "CheckpointError",
    "Checkpointer", "ResumedStrategy", "atomic_write_bytes", "checkpoint_dir", "checkpoint_round",
    "config_differences", "list_checkpoints", "load_checkpoint", "load_latest", "model_tensors_for",
    "offset_evaluate_fn", "prepare_resume", "quarantine_checkpoint", "resume_config",
    "save_checkpoint", "save_resolved_config", "set_aside_checkpoints",
]
