"""What a run writes into its directory, and the summary other tools read.

Files (names are stable; the report and benchmark read them):

- ``metrics.jsonl``: one JSON object per round (round 0 = the initial model) with
  ``round``, ``accuracy`` and ``loss`` (global test set; absent on rounds without
  evaluation), the strategy's round metrics (``bytes_down``, ``bytes_up``, ``bytes_total``,
  ``sim_round_time_s``, ``sim_time_total_s``, ``load_cv``, ``solve_time_s``,
  ``num_dropped``, ``num_rejected``, ``train_loss``, ``personal_accuracy`` ...) and
  ``wall_time_s`` since the start.
- ``summary.json``: see :func:`summarize`.
- ``model.pt``: the final global model's state dict (``torch.save``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np


def _moving_average(values: list[float], window: int) -> list[float]:
    return [float(np.mean(values[max(0, i - window + 1) : i + 1])) for i in range(len(values))]


def to_target(rows: list[dict], target: float, window: int = 3) -> dict:
    """Rounds, bytes and simulated time until the ``window``-eval moving average of the
    global accuracy first reaches ``target``; all None if it never does."""
    evals = [r for r in rows if "accuracy" in r and r["round"] > 0]
    avg = _moving_average([r["accuracy"] for r in evals], window)
    for r, a in zip(evals, avg):
        if a >= target:
            return {"target": target, "rounds": r["round"], "bytes": r.get("bytes_total"), "sim_time_s": r.get("sim_time_total_s")}
    return {"target": target, "rounds": None, "bytes": None, "sim_time_s": None}


def summarize(rows: list[dict], targets: list[float], *, strategy: str, seed: int) -> dict:
    """The run's summary.

    Keys: ``strategy``, ``seed``, ``rounds`` (completed), ``final_accuracy``, ``final_loss``,
    ``final_personal_accuracy`` (None without personalised evaluation), ``accuracy_auc``
    (mean global accuracy over all evaluations after round 0), ``bytes_total``,
    ``sim_time_total`` (seconds), ``load_cv`` (mean over rounds), ``solve_time`` (mean s),
    ``dropped_total``, ``rejected_total``, ``to_target`` (list of :func:`to_target`); with
    differential privacy also ``dp_epsilon`` and ``dp_delta`` (the last round's).
    """
    evals = [r for r in rows if "accuracy" in r and r["round"] > 0]
    trained = [r for r in rows if r["round"] > 0]
    last = trained[-1] if trained else {}
    personal = [r["personal_accuracy"] for r in rows if "personal_accuracy" in r]

    def mean_of(key):
        vals = [r[key] for r in trained if key in r]
        return float(np.mean(vals)) if vals else None

    dp = {k: last[k] for k in ("dp_epsilon", "dp_delta") if k in last}
    return {
        **dp,
        "strategy": strategy,
        "seed": seed,
        "rounds": int(last.get("round", 0)),
        "final_accuracy": evals[-1]["accuracy"] if evals else None,
        "final_loss": evals[-1].get("loss") if evals else None,  # a diverged model has no finite loss
        "final_personal_accuracy": personal[-1] if personal else None,
        "accuracy_auc": float(np.mean([r["accuracy"] for r in evals])) if evals else None,
        "bytes_total": last.get("bytes_total", 0.0),
        "sim_time_total": last.get("sim_time_total_s", 0.0),
        "load_cv": mean_of("load_cv"),
        "solve_time": mean_of("solve_time_s"),
        "dropped_total": float(sum(r.get("num_dropped", 0) for r in trained)),
        "rejected_total": float(sum(r.get("num_rejected", 0) for r in trained)),
        "to_target": [to_target(rows, t) for t in targets],
    }


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({k: _clean(v) for k, v in row.items()}, sort_keys=True) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(path: str | os.PathLike, obj) -> None:
    """Write JSON atomically (temporary file, fsync, rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
