"""The ServerApp: build the strategy from the config and run Flower's ``Strategy.start``.

Per-round outputs are written from Flower's own ``evaluate_fn`` hook, which ``start()``
calls after every round: it evaluates the global model on the test set every
``eval_every`` rounds and appends the round's metrics to ``metrics.jsonl``.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedmoe_flwr.client.local_update import evaluate
from fedmoe_flwr.config import Config, StrategyName, flatten, unflatten
from fedmoe_flwr.experiment import build, experiment_for
from fedmoe_flwr.models import set_active_experts
from fedmoe_flwr.models.slicing import from_array_record, to_array_record
from fedmoe_flwr.outputs import summarize, write_json

log = logging.getLogger("fedmoe_flwr")


def build_strategy(cfg: Config, layout):
    """The strategy the config names, with every setting taken from the config."""
    from strategies import STRATEGIES, DenseFedAvg, FitnessSettings

    s = cfg.strategy
    train_config = {
        "local-epochs": cfg.train.local_epochs,
        "batch-size": cfg.train.batch_size,
        "lr": cfg.train.lr,
        "proximal-mu": cfg.train.proximal_mu,
    }
    if s.name == StrategyName.dense:
        return DenseFedAvg(
            seed=cfg.seed, deadline_s=cfg.fleet.deadline_s, train_config=train_config,
            fraction_train=s.fraction_train, min_train_nodes=s.min_train_nodes, min_available_nodes=1,
            fraction_evaluate=s.fraction_evaluate, min_evaluate_nodes=1, evaluate_every=cfg.eval_every,
        )
    common = dict(
        fraction_train=s.fraction_train,
        min_train_nodes=s.min_train_nodes,
        fraction_evaluate=s.fraction_evaluate,
        seed=cfg.seed,
        probe=s.probe,
        deadline_s=cfg.fleet.deadline_s,
        norm_bound=s.norm_bound,
        server_opt=s.server_opt,
        server_lr=s.server_lr,
        fitness=FitnessSettings(
            w_hist=s.w_hist, w_gate=s.w_gate, w_loss=s.w_loss, alpha=s.loss_alpha,
            beta=s.beta, kappa=s.kappa, anneal_rounds=s.anneal_rounds,
        ),
        profile_ema=s.profile_ema,
        train_config=train_config,
        evaluate_every=cfg.eval_every,
    )
    cls = STRATEGIES[s.name.value]
    if s.name == StrategyName.aligned:
        return cls(layout, band=s.band, price_step=s.price_step, use_deadline=s.use_deadline,
                   deadline_slack=s.deadline_slack, pace_margin=s.pace_margin, **common)
    if s.name == StrategyName.flex:
        return cls(layout, band=s.band, **common)
    return cls(layout, **common)


class RunRecorder:
    """Flower's ``evaluate_fn``: global evaluation plus one ``metrics.jsonl`` row per round.

    Each row goes to the ``loggers`` (:mod:`fedmoe_flwr.tracking`; default: those the
    config's ``loggers`` names), a ``details.jsonl`` row is added, and every
    ``checkpoint_every`` rounds a checkpoint is written (:mod:`fedmoe_flwr.checkpoint`).
    ``restored`` (a :class:`~fedmoe_flwr.checkpoint.Checkpoint`) continues its rows.
    """

    def __init__(self, cfg: Config, data, strategy, out_dir: Path | None, progress=None, *,
                 loggers: list | None = None, restored=None):
        from fedmoe_flwr.checkpoint import Checkpointer
        from fedmoe_flwr.tracking import DetailsRecorder, make_loggers

        self.cfg = cfg
        self.data = data
        self.strategy = strategy
        self.out_dir = out_dir
        self.model = build(cfg, data, dense=cfg.strategy.name == StrategyName.dense)
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

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        row: dict = {"round": server_round}
        if server_round > 0:
            last = getattr(self.strategy, "last", None)
            row.update(last.metrics if last is not None else self.strategy.last_metrics)
        result = None
        last_round = server_round == self.cfg.num_rounds
        if server_round == 0 or server_round % self.cfg.eval_every == 0 or last_round:
            self.model.load_state_dict(from_array_record(arrays))
            set_active_experts(self.model, None)
            x, y = self.data.test
            loss, acc, _ = evaluate(self.model, x, y)
            row.update(accuracy=acc, loss=loss)
            result = MetricRecord({"accuracy": acc, "loss": loss})
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
        return result


def run_server(grid: Grid, cfg: Config, out_dir: str | Path | None = None, progress=None) -> dict:
    """Run the whole federated training on ``grid``; returns (and writes) the summary."""
    cfg, data, skeleton, layout = experiment_for(cfg)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    initial = build(cfg, data, dense=cfg.strategy.name == StrategyName.dense)
    strategy = build_strategy(cfg, layout)
    restored = None
    if cfg.resume and out is not None:
        from fedmoe_flwr.checkpoint import prepare_resume

        restored = prepare_resume(out, cfg, strategy)  # None: no checkpoint yet, start afresh
    elif out is not None:
        from fedmoe_flwr.checkpoint import set_aside_checkpoints

        set_aside_checkpoints(out)  # a fresh run in a used directory: keep the old ones apart
    recorder = RunRecorder(cfg, data, strategy, out, progress, restored=restored)
    if restored is None:
        run_strategy, evaluate_fn, initial_arrays, rounds = strategy, recorder, to_array_record(initial.state_dict()), cfg.num_rounds
    else:  # Flower's start() counts from 1: shift its rounds by the checkpoint's
        from fedmoe_flwr.checkpoint import ResumedStrategy, offset_evaluate_fn

        run_strategy, evaluate_fn = ResumedStrategy(strategy, restored.round), offset_evaluate_fn(recorder, restored.round)
        initial_arrays, rounds = restored.array_record(), cfg.num_rounds - restored.round
    try:
        if rounds > 0:
            run_strategy.start(
                grid=grid,
                initial_arrays=initial_arrays,
                num_rounds=rounds,
                timeout=3600,
                train_config=ConfigRecord(),
                evaluate_fn=evaluate_fn,
            )
    finally:
        recorder.close()
    summary = summarize(recorder.rows, list(cfg.targets), strategy=cfg.strategy.name.value, seed=cfg.seed)
    summary["wall_time_total"] = time.perf_counter() - recorder.t0
    if out is not None:
        write_json(out / "summary.json", summary)
        if cfg.save_model and recorder.arrays is not None:
            torch.save(from_array_record(recorder.arrays), out / "model.pt")
    return summary


def make_server_app(defaults: dict | None = None, out_dir: str | None = None, progress=None) -> ServerApp:
    """A ServerApp whose settings are ``defaults`` overridden by Flower's ``run_config``."""
    defaults = dict(defaults or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from fedmoe_flwr.deploy.grid import DeploymentGrid

        run_config = dict(context.run_config)
        run_dir = run_config.pop("output-dir", None)  # run-level keys: fedmoe_flwr.deploy.app_config.RUN_KEYS
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
