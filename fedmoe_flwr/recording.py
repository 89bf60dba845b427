"""One recorded-results path: a strategy wrapper that captures what Flower's hooks return.

:class:`RecordedStrategy` delegates every hook to the strategy it wraps and, after each
round (round 0 = the initial model), hands a row to ``on_round(round, arrays, row)``:

- ``round`` and the server-side figures of the wrapped strategy (``strategy.last.metrics``:
  bytes, simulated time, solve time, counts; every fedmoe strategy keeps one);
- the aggregated ClientApp-side train metrics (``train_loss`` and the user's own scalars);
- the aggregated evaluate metrics (``personal_accuracy`` ...);
- what the central ``evaluate_fn`` returned (``accuracy``, ``loss``).

``run.py``'s ServerApp records through it, and so can any ServerApp, in one line
(:func:`record_run`), so ``python -m fedmoe_flwr.report`` reads a user's own app's runs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import Result

from fedmoe_flwr.protocol import scalars
from fedmoe_flwr.strategies.wrapper import StrategyWrapper

RowSink = Callable[[int, ArrayRecord, dict], None]


class RecordedStrategy(StrategyWrapper):
    """Wraps ``inner``; see the module doc. Attributes not defined here are ``inner``'s."""

    def __init__(self, inner, on_round: RowSink, *, round_offset: int = 0) -> None:
        super().__init__(inner)
        self.on_round = on_round
        self.round_offset = int(round_offset)  # a resumed run: Flower's round 1 is offset + 1
        self._row: dict = {}
        self.result: Result | None = None

    def configure_train(self, server_round, arrays, config, grid):
        self._row = {}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        self._row.update(_scalars(metrics))
        return arrays, metrics

    def aggregate_evaluate(self, server_round, replies):
        metrics = super().aggregate_evaluate(server_round, replies)
        self._row.update(_scalars(metrics))
        return metrics

    def start(self, grid, initial_arrays, num_rounds=3, timeout=3600, train_config=None, evaluate_config=None,
              evaluate_fn=None) -> Result:
        """Flower's ``Strategy.start`` with a row recorded after every round; keeps the Result."""

        def record(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if flower_round == 0 and self.round_offset > 0:
                return None  # a resumed run: round 0 was recorded before the checkpoint
            server_round = flower_round + self.round_offset
            res = evaluate_fn(server_round, arrays) if evaluate_fn is not None else None
            row = {"round": server_round}
            last = getattr(self.inner, "last", None)  # a user's own strategy may keep none
            if server_round > 0 and last is not None:
                row.update(last.metrics)
            row.update(self._row)
            row.update(_scalars(res))
            self._row = {}
            self.on_round(server_round, arrays, row)
            return res

        self.result = super().start(grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, record)
        return self.result


def _scalars(record: MetricRecord | None) -> dict:
    return {} if record is None else scalars(record)


def no_progress(rows: list[dict]) -> str | None:
    """Why a recorded run trained nothing (every round aggregated no update), else None.

    Rows without ``num_aggregated`` (a strategy that keeps no server-side figures) never fail.
    """
    trained = [r for r in rows if r.get("round", 0) > 0 and "num_aggregated" in r]
    if trained and not any(r["num_aggregated"] > 0 for r in trained):
        return (f"no round aggregated any update ({len(trained)} rounds): every client failed or was dropped; "
                "see the log for each client's reason")
    return None


class RecordedRun(RecordedStrategy):
    """What :func:`record_run` returns: a :class:`RecordedStrategy` that keeps its rows and
    whose :meth:`start` raises RuntimeError when no round aggregated any update (a run
    where every client failed must not look like a finished one)."""

    def __init__(self, inner, on_round: RowSink, on_end: Callable[[], None] | None = None) -> None:
        self.rows: list[dict] = []
        self.on_end = on_end

        def keep(rnd: int, arrays: ArrayRecord, row: dict) -> None:
            on_round(rnd, arrays, row)
            self.rows.append(row)

        super().__init__(inner, keep)

    def start(self, *args, **kwargs) -> Result:
        try:
            result = super().start(*args, **kwargs)
        finally:
            if self.on_end is not None:
                self.on_end()
        if (why := no_progress(self.rows)) is not None:
            raise RuntimeError(why)
        return result


def record_run(strategy, out_dir: str | os.PathLike, *, loggers: tuple[str, ...] = ("jsonl", "csv")) -> RecordedRun:
    """Wrap any Flower strategy so its run writes ``metrics.jsonl`` (and ``metrics.csv``) to
    ``out_dir`` after every round and ``summary.json`` at the end, readable by ``python -m fedmoe_flwr.report out_dir``::

        strategy = record_run(AlignedStrategy(layout), "outputs/my-run")
        strategy.start(grid=grid, initial_arrays=arrays, num_rounds=5)

    ``start`` raises RuntimeError (after writing the rows) when no round aggregated any update.
    """
    from fedmoe_flwr.tracking import make_loggers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sinks = make_loggers(list(loggers), out)
    t0 = time.perf_counter()

    def on_round(_round: int, _arrays: ArrayRecord, row: dict) -> None:
        row["wall_time_s"] = time.perf_counter() - t0
        for sink in sinks:
            sink.log_round(row)

    def close() -> None:  # the run's summary, as run.py writes it (the report labels runs by it)
        from fedmoe_flwr.outputs import summarize, write_json

        for sink in sinks:
            sink.close()
        summary = summarize(recorded.rows, [], strategy=getattr(strategy, "name", type(strategy).__name__),
                            seed=int(getattr(strategy, "seed", -1)))
        summary["wall_time_total"] = time.perf_counter() - t0
        write_json(out / "summary.json", summary)

    recorded = RecordedRun(strategy, on_round, close)
    return recorded
