"""Metrics loggers (jsonl, csv, tensorboard, custom), details rows and the progress display."""

import csv
import json

import pytest

from fedmoe_flwr.progress import RoundProgress
from fedmoe_flwr.tracking import CsvLogger, MetricsLogger, make_loggers

ROWS = [
    {"round": 0, "accuracy": 0.1, "loss": 2.3, "wall_time_s": 0.5},
    {"round": 1, "accuracy": 0.4, "loss": 1.9, "bytes_total": 3e6, "load_cv": 0.2, "wall_time_s": 1.0},
    {"round": 2, "bytes_total": 6e6, "load_cv": float("nan"), "wall_time_s": 1.5},
    {"round": 3, "accuracy": 0.6, "loss": 1.2, "bytes_total": 9e6, "personal_accuracy": 0.7, "wall_time_s": 2.0},
]


class ListLogger:
    def __init__(self, out_dir, rows=(), config=None):
        self.rows, self.closed, self.config = list(rows), False, config

    def log_round(self, row):
        self.rows.append(row)

    def close(self):
        self.closed = True


def make_list_logger(out_dir, *, rows, config):
    return ListLogger(out_dir, rows, config)


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_grows_its_header_and_leaves_missing_cells_empty(tmp_path):
    lg = CsvLogger(tmp_path / "m.csv")
    for r in ROWS:
        lg.log_round(r)
    lg.close()
    got = _read_csv(tmp_path / "m.csv")
    assert list(got[0]) == ["round", "accuracy", "bytes_total", "load_cv", "loss", "personal_accuracy", "wall_time_s"]
    assert [g["round"] for g in got] == ["0", "1", "2", "3"]
    assert got[0]["bytes_total"] == "" and float(got[1]["bytes_total"]) == 3e6
    assert got[2]["load_cv"] == "" and got[2]["accuracy"] == ""  # NaN and absent -> empty
    assert float(got[3]["personal_accuracy"]) == 0.7


def test_loggers_on_resume_rewrite_the_kept_rows_then_append(tmp_path):
    first = make_loggers(["csv"], tmp_path)
    for r in ROWS:  # a run that got to round 3 ...
        for lg in first:
            lg.log_round(r)
    # ... and is resumed from a checkpoint of round 1: rows 2 and 3 are redone
    again = make_loggers(["jsonl", "csv"], tmp_path, rows=ROWS[:2])
    assert [type(lg).__name__ for lg in again] == ["JsonlLogger", "CsvLogger"]
    for lg in again:
        lg.log_round({"round": 2, "accuracy": 0.5})
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [0, 1, 2] and lines[2]["accuracy"] == 0.5
    assert [r["round"] for r in _read_csv(tmp_path / "metrics.csv")] == ["0", "1", "2"]


def test_make_loggers_always_writes_jsonl_accepts_factories_and_rejects_unknown_names(tmp_path):
    loggers = make_loggers([f"{__name__}:make_list_logger"], tmp_path, rows=ROWS[:1], config={"seed": 1})
    assert len(loggers) == 2 and isinstance(loggers[1], ListLogger) and loggers[1].config == {"seed": 1}
    assert all(isinstance(lg, MetricsLogger) for lg in loggers)
    assert loggers[1].rows == ROWS[:1]
    with pytest.raises(ValueError, match="unknown logger 'wandb'"):
        make_loggers(["wandb"], tmp_path)


def test_tensorboard_logger_writes_event_files(tmp_path):
    try:
        import torch.utils.tensorboard  # noqa: F401  (needs the tensorboard package)
    except ImportError:
        pytest.skip("tensorboard is not installed (pip install 'fedmoe_flwr[tracking]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (lg,) = [x for x in make_loggers(["tensorboard"], tmp_path) if type(x).__name__ == "TensorBoardLogger"]
    for r in ROWS:
        lg.log_round(r)
    lg.close()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("accuracy")] == [(0, 0.1), (1, 0.4), (3, 0.6)]
    assert [e.step for e in acc.Scalars("load_cv")] == [1]  # NaN is not logged
    assert "round" not in acc.Tags()["scalars"]


def test_mlflow_logger_without_the_extra_says_what_to_install(tmp_path):
    try:
        import mlflow  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="tracking"):
            make_loggers(["mlflow"], tmp_path)
        return
    pytest.skip("mlflow is installed")


def test_mlflow_logger_logs_params_and_metrics_and_continues_its_run_on_resume(tmp_path, monkeypatch):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        pytest.skip("mlflow is not installed (pip install 'fedmoe_flwr[tracking]')")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = {"seed": 1, "strategy.name": "aligned"}
    for rows, new in ((), ROWS[:2]), (ROWS[:1], ROWS[1:2]):  # a run, then its resumption
        loggers = make_loggers(["mlflow"], tmp_path, rows=rows, config=config)
        for r in new:
            for lg in loggers:
                lg.log_round(r)
        for lg in loggers:
            lg.close()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run((tmp_path / "mlflow_run_id").read_text())
    assert run.data.params == {"seed": "1", "strategy.name": "aligned"} and run.info.run_name == "aligned-seed1"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "accuracy")] == [(0, 0.1), (1, 0.4), (1, 0.4)]


def test_round_details_of_an_expert_strategy_and_of_dense():
    import numpy as np

    from fedmoe_flwr.tracking import round_details
    from fedmoe_flwr.strategies import RoundLog

    class State:
        expert_keys = ["L0.E0", "L0.E1"]
        client_index = {"b": 1, "a": 0}

        class load:
            clients_last = np.array([2.0, 1.0])
            tokens_last = np.array([30.0, 10.0])

        class fitness:
            Q = np.array([[0.25, 0.75], [np.nan, 0.5]])

        class P:
            def __init__(self, t):
                self.compute_tier = t

        profiles = {"a": P("small"), "b": P("large")}

    last = RoundLog(assignment={"a": ["L0.E0"], "b": ["L0.E0", "L0.E1"]}, dropped={"b": "late"})

    row = round_details(last, State, 3)
    assert row["assignment"] == {"a": ["L0.E0"], "b": ["L0.E0", "L0.E1"]} and row["dropped"] == {"b": "late"}
    assert row["expert_clients"] == [2.0, 1.0] and row["expert_tokens"] == [30.0, 10.0]
    assert row["tiers"] == {"a": "small", "b": "large"}
    assert row["fitness"] == {"clients": ["a", "b"], "Q": [[0.25, 0.75], [None, 0.5]]}
    assert "tiers" not in round_details(last, State, 4, tiers_known=row["tiers"])  # only when it changed
    # dense has no alignment state: its row is the round only
    assert round_details(RoundLog(metrics={"bytes_total": 1.0}), None, 2) == {"round": 2}


def test_progress_plain_lines_show_round_accuracy_bytes_and_eta(capsys):
    with RoundProgress(3, label="aligned seed=0") as p:
        p.tty = False
        for r in ROWS:
            p(r)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3  # rows with an accuracy
    assert out[1].startswith("[aligned seed=0] round   1/3") and "acc 0.4000" in out[1] and "3.0 MB" in out[1]
    assert "eta" in out[1] and "eta" not in out[2]  # the last round has nothing left


def test_progress_quiet_prints_nothing_and_rich_bar_tracks_rounds(capsys):
    with RoundProgress(3, quiet=True) as p:
        for r in ROWS:
            p(r)
    assert capsys.readouterr().out == ""
    bar = RoundProgress(3, label="x")
    bar.tty = True
    with bar:
        for r in ROWS[2:]:  # a resumed run: the first row seen is round 2
            bar(r)
        task = bar._bar.tasks[0]
        assert task.completed == 3 and "9.0 MB" in task.fields["info"] and "acc 0.6000" in task.fields["info"]


def test_details_hold_a_bounded_evenly_spaced_sample_of_a_large_fleets_fitness():
    from types import SimpleNamespace

    import numpy as np

    from fedmoe_flwr.strategies import RoundLog
    from fedmoe_flwr.tracking import FITNESS_MAX_CLIENTS, round_details

    n = 3 * FITNESS_MAX_CLIENTS + 7
    ids = [f"c{i:05d}" for i in range(n)]
    q = np.arange(n * 2, dtype=float).reshape(n, 2) / (2 * n)
    state = SimpleNamespace(
        expert_keys=["L0.E0", "L0.E1"], client_index={c: i for i, c in enumerate(ids)},
        load=SimpleNamespace(clients_last=np.zeros(2), tokens_last=np.zeros(2)),
        fitness=SimpleNamespace(Q=q), profiles={c: SimpleNamespace(compute_tier="t") for c in ids})
    fit = round_details(RoundLog(), state, 10)["fitness"]
    assert len(fit["clients"]) == FITNESS_MAX_CLIENTS and fit["clients"][0] == ids[0] and fit["clients"][-1] == ids[-1]
    rows = [int(c[1:]) for c in fit["clients"]]
    assert rows == sorted(set(rows)), "distinct clients in row order"
    assert fit["Q"][1] == [round(v, 5) for v in q[rows[1]].tolist()]
    assert "fitness" not in round_details(RoundLog(), state, 11), "large fleets: every 10th round"
