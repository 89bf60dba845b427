"""Where a run's per-round metrics go: a small logger interface and the built-in loggers.

Every ``metrics.jsonl`` row (see :mod:`fedmoe_flwr.outputs`) is handed to each logger's
``log_round``; ``close`` is called once at the end. Built-in loggers, chosen by the
``loggers`` config list:

- ``jsonl``: ``metrics.jsonl`` (always written: the report, benchmarks and resume read it);
- ``csv``: ``metrics.csv``, one column per metric (the header grows when a new metric appears);
- ``tensorboard``: event files under ``tensorboard/`` (needs the ``tracking`` extra);
- ``mlflow``: an MLflow run (``MLFLOW_TRACKING_URI``, else ``sqlite:///<run dir>/mlflow.db``;
  needs the ``tracking`` extra).

Anything else in the list is read as ``"package.module:factory"``; a factory is called as
``factory(out_dir, rows=..., config=...)`` (``rows``: the rows a resumed run already has,
``config``: the flat config) and returns an object with ``log_round(row)`` and ``close()``.

:func:`round_details` builds the per-round ``details.jsonl`` rows (assignment, per-expert
load, fitness, tiers, dropouts) that the report plots.
"""

from __future__ import annotations

import csv
import io
import math
import numbers
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fedmoe_flwr.outputs import append_jsonl

METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
DETAILS_JSONL = "details.jsonl"
TENSORBOARD_DIR = "tensorboard"
BUILTIN = ("jsonl", "csv", "tensorboard", "mlflow")


@runtime_checkable
class MetricsLogger(Protocol):
    """Receives every metrics row of a run."""

    def log_round(self, row: dict) -> None: ...

    def close(self) -> None: ...


def _clean(v: Any):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _numeric(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k != "round" and isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))}


def _rewrite_jsonl(path: Path, rows: Iterable[dict]) -> None:
    from fedmoe_flwr.checkpoint import atomic_write_bytes
    import json

    text = "".join(json.dumps({k: _clean(v) for k, v in r.items()}, sort_keys=True) + "\n" for r in rows)
    atomic_write_bytes(path, text.encode("utf-8"))


class JsonlLogger:
    """Appends each row to a JSON-lines file; a resumed run first rewrites the rows it keeps."""

    def __init__(self, path: str | os.PathLike, rows: Iterable[dict] = ()):
        self.path = Path(path)
        _rewrite_jsonl(self.path, list(rows))

    def log_round(self, row: dict) -> None:
        append_jsonl(self.path, row)

    def close(self) -> None:
        pass


class CsvLogger:
    """``metrics.csv``: ``round`` first, then the metrics in name order; empty cells where a
    round lacks a metric. When a new metric appears the file is rewritten with the wider header."""

    def __init__(self, path: str | os.PathLike, rows: Iterable[dict] = ()):
        self.path = Path(path)
        self.rows = [dict(r) for r in rows]
        self.columns: list[str] = []
        self._rewrite()

    def _header(self) -> list[str]:
        keys = {k for r in self.rows for k in r}
        return ["round"] + sorted(keys - {"round"})

    def _line(self, row: dict) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(["" if _clean(row.get(c)) is None else row.get(c) for c in self.columns])
        return buf.getvalue()

    def _rewrite(self) -> None:
        from fedmoe_flwr.checkpoint import atomic_write_bytes

        self.columns = self._header()
        text = ",".join(self.columns) + "\n" + "".join(self._line(r) for r in self.rows)
        atomic_write_bytes(self.path, text.encode("utf-8"))

    def log_round(self, row: dict) -> None:
        self.rows.append(dict(row))
        if set(row) - set(self.columns):
            self._rewrite()
        else:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(self._line(row))

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """One scalar per metric per round (step = round) under ``log_dir``.

    A resumed run purges the events after its checkpoint's round, so curves do not double.
    Needs ``tensorboard`` (``pip install 'fedmoe_flwr[tracking]'``).
    """

    def __init__(self, log_dir: str | os.PathLike, rows: Iterable[dict] = ()):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as ex:
            raise ImportError(
                "the 'tensorboard' logger needs the tensorboard package: pip install 'fedmoe_flwr[tracking]'"
            ) from ex
        rows = list(rows)
        purge = rows[-1]["round"] + 1 if rows else None
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge)

    def log_round(self, row: dict) -> None:
        step = int(row["round"])
        for k, v in _numeric(row).items():
            self.writer.add_scalar(k, v, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MlflowLogger:
    """Logs the flat config as parameters and every row's metrics (step = round) to MLflow.

    The MLflow run id is kept in ``<run dir>/mlflow_run_id`` so a resumed run continues
    the same MLflow run. Needs ``mlflow`` (``pip install 'fedmoe_flwr[tracking]'``).
    """

    def __init__(self, out_dir: str | os.PathLike, rows: Iterable[dict] = (), config: dict | None = None,
                 experiment: str = "fedmoe_flwr"):
        try:
            import mlflow
        except ImportError as ex:
            raise ImportError("the 'mlflow' logger needs the mlflow package: pip install 'fedmoe_flwr[tracking]'") from ex
        self.mlflow = mlflow
        out_dir = Path(out_dir)
        if not os.environ.get("MLFLOW_TRACKING_URI"):  # MLflow 3 prefers a database to ./mlruns
            mlflow.set_tracking_uri(f"sqlite:///{(out_dir / 'mlflow.db').resolve()}")
        mlflow.set_experiment(experiment)
        id_file = out_dir / "mlflow_run_id"
        run_id = id_file.read_text().strip() if (list(rows) and id_file.exists()) else None
        config = config or {}
        name = f"{config.get('strategy.name', 'run')}-seed{config.get('seed', '')}"
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else name)
        id_file.write_text(self.run.info.run_id)
        if run_id is None and config:
            mlflow.log_params({k: str(v)[:500] for k, v in config.items()})

    def log_round(self, row: dict) -> None:
        self.mlflow.log_metrics(_numeric(row), step=int(row["round"]))

    def close(self) -> None:
        self.mlflow.end_run()


def make_loggers(names: Iterable[str], out_dir: str | os.PathLike, *, rows: Iterable[dict] = (),
                 config: dict | None = None) -> list[MetricsLogger]:
    """The loggers ``names`` selects (``jsonl`` is always included, first).

    ``rows``: rows already recorded (a resumed run), ``config``: the flat config.
    Raises ValueError for an unknown name and ImportError for a missing optional package.
    """
    out = Path(out_dir)
    rows = list(rows)
    wanted = ["jsonl"] + [n for n in dict.fromkeys(str(n) for n in names) if n != "jsonl"]
    loggers: list[MetricsLogger] = []
    for name in wanted:
        if name == "jsonl":
            loggers.append(JsonlLogger(out / METRICS_JSONL, rows))
        elif name == "csv":
            loggers.append(CsvLogger(out / METRICS_CSV, rows))
        elif name == "tensorboard":
            loggers.append(TensorBoardLogger(out / TENSORBOARD_DIR, rows))
        elif name == "mlflow":
            loggers.append(MlflowLogger(out, rows, config))
        elif ":" in name:
            import importlib

            module, _, attr = name.partition(":")
            factory = getattr(importlib.import_module(module), attr)
            logger = factory(out, rows=rows, config=config or {})
            if not isinstance(logger, MetricsLogger):
                raise TypeError(f"logger {name!r} lacks log_round(row) / close()")
            loggers.append(logger)
        else:
            raise ValueError(f"unknown logger {name!r}; use one of {list(BUILTIN)} or 'package.module:factory'")
    return loggers


# ---------------------------------------------------------------------------- details.jsonl
FITNESS_CELLS_EVERY_ROUND = 5000
"""Fitness matrices up to this many cells go into every details row; larger ones every 10th."""
FITNESS_MAX_CLIENTS = 1000
"""Rows of the fitness matrix a details row holds at most: larger fleets give an evenly spaced
sample of clients (the report draws 40). Every row is kept in memory and in every checkpoint,
so a whole 100,000 x 64 matrix every 10th round would grow them by ~60 MB each time."""


def round_details(last, state, server_round: int, *, final: bool = False, tiers_known: dict | None = None) -> dict:
    """One ``details.jsonl`` row: what the round did, per client and per expert.

    ``last`` is the strategy's :class:`~fedmoe_flwr.strategies.RoundLog`, ``state`` its
    :class:`~fedmoe_flwr.core.AlignmentState` (None for ``dense``, whose row is the round only).
    Keys: ``round``,
    ``expert_keys``, ``assignment`` (client id -> expert keys sent), ``dropped`` and
    ``rejected`` (client id -> reason), ``expert_clients`` and ``expert_tokens`` (per expert,
    this round's aggregated updates), ``weights`` (client id -> ``shared`` and expert key ->
    the aggregation weight the server gave it, after the robust caps), ``trust`` (client id ->
    the cosine of its delta with the server's reference update, when the trust check ran),
    ``refused_claims`` (node id -> [client id it claimed, fresh id it trains under], when a node
    claimed an id bound to another connected node: docs/robustness.md#identity), ``tiers`` (client id -> device tier, on the first row
    and whenever it changed since ``tiers_known``), ``fitness`` (``clients`` in row order and
    ``Q`` rounded to 5 decimals; every round for small fleets, else every 10th and the final;
    at most :data:`FITNESS_MAX_CLIENTS` clients, evenly spaced in row order).
    """
    row: dict[str, Any] = {"round": int(server_round)}
    if state is None:
        return row
    row["expert_keys"] = list(state.expert_keys)
    row["assignment"] = {str(c): list(v) for c, v in last.assignment.items()}
    row["dropped"] = {str(c): str(v) for c, v in last.dropped.items()}
    row["rejected"] = {str(c): str(v) for c, v in last.rejected.items()}
    row["expert_clients"] = [float(v) for v in state.load.clients_last]
    row["expert_tokens"] = [float(v) for v in state.load.tokens_last]
    weights = getattr(last, "weights", None) or {}
    row["weights"] = {str(c): {k: _clean(round(float(v), 6)) for k, v in w.items()} for c, w in weights.items()}
    trust = getattr(last, "trust", None) or {}
    if trust:
        row["trust"] = {str(c): _clean(round(float(v), 4)) for c, v in trust.items()}
    refused = getattr(last, "refused_claims", None) or {}
    if refused:
        row["refused_claims"] = {str(n): [str(claimed), str(given)] for n, (claimed, given) in refused.items()}
    tiers = {str(c): (p.compute_tier or "") for c, p in state.profiles.items()}
    if tiers != (tiers_known or {}):
        row["tiers"] = tiers
    q = state.fitness.Q
    if q.size and (final or q.size <= FITNESS_CELLS_EVERY_ROUND or server_round % 10 == 0):
        order = sorted(state.client_index, key=state.client_index.get)
        if len(order) > FITNESS_MAX_CLIENTS:
            order = [order[int(i)] for i in np.linspace(0, len(order) - 1, FITNESS_MAX_CLIENTS).round()]
        row["fitness"] = {
            "clients": order,
            "Q": [[_clean(round(float(v), 5)) for v in q[state.client_index[c]]] for c in order],
        }
    return row


class DetailsRecorder:
    """Collects :func:`round_details` rows and appends them to ``details.jsonl``."""

    def __init__(self, strategy, out_dir: str | os.PathLike | None, num_rounds: int, rows: Iterable[dict] = ()):
        self.strategy = strategy
        self.num_rounds = int(num_rounds)
        self.rows = [dict(r) for r in rows]
        self.tiers: dict = {}
        for r in self.rows:
            self.tiers = r.get("tiers", self.tiers)
        self.path = None if out_dir is None else Path(out_dir) / DETAILS_JSONL
        if self.path is not None:
            _rewrite_jsonl(self.path, self.rows)

    def record(self, server_round: int) -> dict | None:
        if server_round <= 0:
            return None
        row = round_details(self.strategy.last, self.strategy.state, server_round,
                            final=server_round == self.num_rounds, tiers_known=self.tiers)
        self.tiers = row.get("tiers", self.tiers)
        self.rows.append(row)
        if self.path is not None:
            append_jsonl(self.path, row)
        return row
