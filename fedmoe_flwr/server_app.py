"""The ServerApp: build the strategy from the config and run Flower's ``Strategy.start``.

Per-round outputs are written from Flower's own ``evaluate_fn`` hook, which ``start()``
calls after every round: it evaluates the global model on the test set every
``eval_every`` rounds and appends the round's metrics to ``metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedmoe_flwr.models.evaluate import evaluate
from fedmoe_flwr.config import Config, flatten, unflatten
from fedmoe_flwr.core.fitness import FitnessSettings
from fedmoe_flwr.core.privacy import DPSettings
from fedmoe_flwr.core.robust import RobustSettings
from fedmoe_flwr.experiment import build_for_strategy, experiment_for
from fedmoe_flwr.models import load_wire, set_active_experts, to_wire
from fedmoe_flwr.models.slicing import from_array_record, to_array_record
from fedmoe_flwr.outputs import summarize, write_json
from fedmoe_flwr.recording import RecordedStrategy, no_progress

log = logging.getLogger("fedmoe_flwr")


def _parameters(cls) -> set[str]:
    """Keyword arguments a strategy class accepts, over its whole MRO."""
    names: set[str] = set()
    for c in cls.__mro__:
        if "__init__" in vars(c):
            names |= set(inspect.signature(c.__init__).parameters)
    return names


def build_strategy(cfg: Config, layout):
    """The strategy the config names: each ``strategy.*`` setting reaches the constructor
    argument of the same name (one declaration per setting: :class:`StrategyConfig`)."""
    from fedmoe_flwr.experiment import moe_layout
    from fedmoe_flwr.strategies import STRATEGIES, DenseFedAvg, WidthFedAvg

    s = cfg.strategy
    cls = STRATEGIES[s.name.value]
    accepted = _parameters(cls)
    settings = {f.name: getattr(s, f.name) for f in dataclasses.fields(s) if f.name in accepted}
    train_config = {"local-epochs": cfg.train.local_epochs, "batch-size": cfg.train.batch_size, "lr": cfg.train.lr,
                    "proximal-mu": cfg.train.proximal_mu}
    common = dict(seed=cfg.seed, deadline_s=cfg.fleet.deadline_s, train_config=train_config, evaluate_every=cfg.eval_every)
    if issubclass(cls, WidthFedAvg):  # capacities are shares of the MoE's experts (same fleet for all)
        total = sum(moe_layout(cfg).expert_nbytes(k) for k in moe_layout(cfg).expert_keys)
        return cls(**common, **settings, moe_expert_bytes=total, min_available_nodes=1, min_evaluate_nodes=1)
    if issubclass(cls, DenseFedAvg):
        return cls(**common, **settings, min_available_nodes=1, min_evaluate_nodes=1)
    fitness, robust, dp = (kind(**{f.name: getattr(s, f.name) for f in dataclasses.fields(kind)})
                           for kind in (FitnessSettings, RobustSettings, DPSettings))
    reference_fn = None
    if robust.trust_samples > 0:  # the server's own update on its root sample (docs/robustness.md#trust)
        from fedmoe_flwr.server_reference import root_reference

        reference_fn = root_reference(cfg, experiment_for(cfg)[1])
    return cls(layout, **common, **settings, fitness=fitness, robust=robust, dp=dp, reference_fn=reference_fn)


class RunRecorder:
    """The outputs of a ``run.py`` run: central evaluation and one row per round.

    :meth:`evaluate` is Flower's ``evaluate_fn`` (the global model on the test set every
    ``eval_every`` rounds and on the last); :meth:`record` receives each round's row from
    :class:`~fedmoe_flwr.recording.RecordedStrategy` and hands it to the ``loggers``
    (:mod:`fedmoe_flwr.tracking`; default: those the config's ``loggers`` names), appends a
    ``details.jsonl`` row, and every ``checkpoint_every`` rounds writes a checkpoint
    (:mod:`fedmoe_flwr.checkpoint`). ``restored`` (a checkpoint) continues its rows.
    """

    def __init__(self, cfg: Config, data, strategy, out_dir: Path | None, progress=None, *,
                 loggers: list | None = None, restored=None):
        from fedmoe_flwr.checkpoint import Checkpointer
        from fedmoe_flwr.tracking import DetailsRecorder, make_loggers

        self.cfg = cfg
        self.data = data
        self.strategy = strategy
        self.out_dir = out_dir
        self.model = build_for_strategy(cfg, data)
        self.rows: list[dict] = [dict(r) for r in restored.metrics] if restored is not None else []
        # wall time continues from the checkpoint's last row on resume
        self.t0 = time.perf_counter() - (self.rows[-1].get("wall_time_s", 0.0) if self.rows else 0.0)
        self.progress = progress
        self.arrays = restored.array_record() if restored is not None else None
        self.loggers = list(loggers or [])
        self.details = DetailsRecorder(strategy, out_dir, cfg.num_rounds, restored.details if restored is not None else ())
        self.checkpointer = None
        if out_dir is not None:
            if loggers is None:
                self.loggers = make_loggers(cfg.loggers, out_dir, rows=self.rows, config=flatten(cfg))
            self.checkpointer = Checkpointer(out_dir, cfg.checkpoint_every, cfg.num_rounds,
                                             keep=cfg.checkpoint_keep, config=flatten(cfg))

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's ``evaluate_fn``: the global model on the test set, on evaluation rounds."""
        if not (server_round == 0 or server_round % self.cfg.eval_every == 0 or server_round == self.cfg.num_rounds):
            return None
        load_wire(self.model, from_array_record(arrays))  # fused experts travel per expert
        set_active_experts(self.model, None)
        x, y = self.data.test
        loss, acc, _ = evaluate(self.model, x, y)
        return MetricRecord({"accuracy": acc, "loss": loss})

    def record(self, server_round: int, arrays: ArrayRecord, row: dict) -> None:
        """One round's row (see :class:`~fedmoe_flwr.recording.RecordedStrategy`) into the outputs."""
        row["wall_time_s"] = time.perf_counter() - self.t0
        self.rows.append(row)
        self.arrays = arrays
        for lg in self.loggers:
            lg.log_round(row)
        self.details.record(server_round)
        if self.checkpointer is not None:
            self.checkpointer.maybe_save(server_round, arrays, self.strategy, self.rows, self.details.rows)
        if self.progress is not None:
            self.progress(row)


def run_server(grid: Grid, cfg: Config, out_dir: str | Path | None = None, progress=None) -> dict:
    """Run the whole federated training on ``grid``; returns (and writes) the summary.

    Raises :class:`RuntimeError` when no round aggregated any update (every client failed).
    """
    cfg, data, skeleton, layout = experiment_for(cfg)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    initial = build_for_strategy(cfg, data)
    strategy = build_strategy(cfg, layout)
    restored = None
    if cfg.resume and out is not None:
        from fedmoe_flwr.checkpoint import prepare_resume

        restored = prepare_resume(out, cfg, strategy)  # None: no checkpoint yet, start afresh
    elif out is not None:
        from fedmoe_flwr.checkpoint import set_aside_checkpoints

        set_aside_checkpoints(out)  # a fresh run in a used directory: keep the old ones apart
    recorder = RunRecorder(cfg, data, strategy, out, progress, restored=restored)
    offset = 0 if restored is None else restored.round
    if restored is None:
        run_strategy, initial_arrays = strategy, to_array_record(to_wire(initial))
    else:  # Flower's start() counts from 1: shift its rounds by the checkpoint's
        from fedmoe_flwr.checkpoint import ResumedStrategy

        run_strategy, initial_arrays = ResumedStrategy(strategy, offset), restored.array_record()
    recorded = RecordedStrategy(run_strategy, recorder.record, round_offset=offset)
    try:
        if cfg.num_rounds - offset > 0:
            recorded.start(grid=grid, initial_arrays=initial_arrays, num_rounds=cfg.num_rounds - offset, timeout=3600,
                           train_config=ConfigRecord(), evaluate_fn=recorder.evaluate)
    finally:
        recorder.close()
    summary = summarize(recorder.rows, list(cfg.targets), strategy=cfg.strategy.name.value, seed=cfg.seed)
    summary["wall_time_total"] = time.perf_counter() - recorder.t0
    if out is not None:
        write_json(out / "summary.json", summary)
        if cfg.save_model and recorder.arrays is not None:
            torch.save(from_array_record(recorder.arrays), out / "model.pt")
    if (why := no_progress(recorder.rows)) is not None:
        raise RuntimeError(why)
    return summary


def make_server_app(defaults: dict | None = None, out_dir: str | None = None, progress=None) -> ServerApp:
    """A ServerApp whose settings are ``defaults`` overridden by Flower's ``run_config``."""
    defaults = dict(defaults or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from fedmoe_flwr.deployment_grid import DeploymentGrid

        run_config = dict(context.run_config)
        run_dir = run_config.pop("output-dir", None)  # run-level keys: fedmoe_flwr.config.RUN_KEYS
        timeout = float(run_config.pop("round-timeout", 0) or 0)
        target_dir = run_dir or out_dir
        cfg = unflatten({**defaults, **run_config})
        if run_dir or timeout > 0:  # `flwr run`: cap round waits, log what each node was sent
            layout = experiment_for(cfg)[3]
            log = Path(run_dir) / "messages.jsonl" if run_dir else None
            grid = DeploymentGrid(grid, round_timeout=timeout or None, log_path=log, layout=layout)
        run_server(grid, cfg, target_dir, progress)

    return app


# For `flwr run` (pyproject's [tool.flwr.app.components]).
app = make_server_app(flatten(Config()))
