"""Find run directories and read what a run wrote (metrics, details, summary, config)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from fedmoe_flwr.outputs import summarize

STRATEGY_ORDER = ["aligned", "flex", "greedy", "random", "full", "dense"]
_SKIP_DIRS = {"report", "checkpoints", "tensorboard", "mlruns", ".hydra"}
# overrides that do not tell runs apart in a legend
_NOT_DISTINGUISHING = {"seed", "strategy", "strategy.name", "quiet", "verbose", "report", "loggers", "resume",
                       "checkpoint_every", "checkpoint_keep", "backend", "save_model", "num_cpus_per_client",
                       "num_workers", "ray_address"}


@dataclass
class Run:
    """One run directory, read."""

    path: Path
    rows: list[dict]
    details: list[dict]
    summary: dict
    config: dict  # nested, as in .hydra/config.yaml (may be empty)
    overrides: dict[str, str] = field(default_factory=dict)
    strategy: str = "?"
    seed: int | None = None
    group: str = ""
    label: str = ""

    @property
    def evals(self) -> list[dict]:
        return [r for r in self.rows if r.get("accuracy") is not None]


def find_runs(paths: list[str | os.PathLike]) -> list[Path]:
    """Run directories (those holding ``metrics.jsonl``) at or under each path, sorted, unique."""
    found: dict[Path, None] = {}
    for p in map(Path, paths):
        if (p / "metrics.jsonl").is_file():
            found[p.resolve()] = None
            continue
        if not p.is_dir():
            raise FileNotFoundError(f"{p} is neither a run directory (with metrics.jsonl) nor a directory of runs")
        for f in sorted(p.rglob("metrics.jsonl")):
            if not _SKIP_DIRS & set(f.relative_to(p).parts[:-1]):
                found[f.parent.resolve()] = None
    if not found:
        raise FileNotFoundError(f"no run directory (with metrics.jsonl) under {', '.join(map(str, paths))}")
    return list(found)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    if not path.is_file():
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a run killed mid-write: keep the complete lines
    return rows


def _read_config(path: Path) -> tuple[dict, dict]:
    cfg, over = {}, {}
    hydra = path / ".hydra"
    try:
        from omegaconf import OmegaConf

        if (hydra / "config.yaml").is_file():
            cfg = OmegaConf.to_container(OmegaConf.load(hydra / "config.yaml"), resolve=False) or {}
        if (hydra / "overrides.yaml").is_file():
            for o in OmegaConf.to_container(OmegaConf.load(hydra / "overrides.yaml")) or []:
                if "=" in str(o):
                    k, v = str(o).split("=", 1)
                    over[k.lstrip("+~")] = v
    except Exception:  # a hand-edited or partial config: labels fall back to the summary
        pass
    return cfg, over


def load_run(path: str | os.PathLike) -> Run:
    path = Path(path)
    rows = _read_jsonl(path / "metrics.jsonl")
    details = _read_jsonl(path / "details.jsonl")
    cfg, over = _read_config(path)
    strategy = str((cfg.get("strategy") or {}).get("name", "?"))
    seed = cfg.get("seed")
    targets = list(cfg.get("targets") or [])
    summary = {}
    if (path / "summary.json").is_file():
        try:
            summary = json.loads((path / "summary.json").read_text())
        except json.JSONDecodeError:
            summary = {}
    if not summary:  # a run still going, or killed: summarise what it wrote
        summary = summarize(rows, targets, strategy=strategy, seed=seed if seed is not None else -1)
        summary["partial"] = True
    strategy = str(summary.get("strategy") or strategy)
    seed = summary.get("seed", seed)
    return Run(path=path, rows=rows, details=details, summary=summary, config=cfg, overrides=over,
               strategy=strategy, seed=None if seed is None else int(seed))


def load_runs(paths: list[str | os.PathLike]) -> list[Run]:
    """Every run under ``paths``, labelled ``strategy[, what else differs] s<seed>`` and sorted."""
    runs = [load_run(p) for p in find_runs(paths)]
    varying = set()
    keys = {k for r in runs for k in r.overrides} - _NOT_DISTINGUISHING
    for k in keys:
        if len({r.overrides.get(k) for r in runs}) > 1:
            varying.add(k)
    for r in runs:
        extra = ", ".join(f"{k}={r.overrides[k]}" for k in sorted(varying) if k in r.overrides)
        r.group = r.strategy + (f" [{extra}]" if extra else "")
        r.label = r.group + (f" s{r.seed}" if r.seed is not None else "")
    seen: dict[str, int] = {}
    for r in runs:  # still ambiguous (e.g. the same run twice): add the directory name
        seen[r.label] = seen.get(r.label, 0) + 1
    for r in runs:
        if seen[r.label] > 1:
            r.label = f"{r.label} ({r.path.name})"
    order = {s: i for i, s in enumerate(STRATEGY_ORDER)}
    runs.sort(key=lambda r: (order.get(r.strategy, len(order)), r.group, r.seed if r.seed is not None else -1, str(r.path)))
    return runs


def series(run: Run, x_key: str, y_key: str, scale: float = 1.0) -> tuple[list[float], list[float]]:
    """``(x, y)`` over the rows that have ``y_key``; ``x`` missing at round 0 counts as 0."""
    xs, ys = [], []
    for r in run.rows:
        y = r.get(y_key)
        if y is None or (isinstance(y, float) and not math.isfinite(y)):
            continue
        x = r.get(x_key, 0.0 if r.get("round") == 0 else None)
        if x is None:
            continue
        xs.append(float(x) * scale)
        ys.append(float(y))
    return xs, ys
