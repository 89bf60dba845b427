"""Checkpoints: atomic files, corrupt-checkpoint fallback, and SIGKILL-then-resume exactness.

The adversarial cases (project issue 13) rewrite a checkpoint the way an attacker or a
careless edit would, recomputing its digests, and check that resume falls back to the
previous good checkpoint without ever writing over it.
"""

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmoe_flwr.checkpoint import (
    CheckpointError,
    ResumedStrategy,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    offset_evaluate_fn,
    prepare_resume,
    resume_config,
    save_checkpoint,
)
from fedmoe_flwr.config import Config, flatten

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- unit tests
class FakeStrategy:
    def __init__(self, d=None):
        self.d = d or {}

    def state_dict(self):
        return self.d

    def load_state_dict(self, d):
        self.d = d


def _save(run_dir, rnd, keep=2):
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3) + rnd, "b": np.array([rnd], dtype=np.int64)}
    state = {"count": rnd, "alignment_arrays": {"m/w": np.full((2, 3), 0.1 * rnd).tolist()}}
    rows = [{"round": r, "accuracy": 0.1 * r} for r in range(rnd + 1)]
    return save_checkpoint(run_dir, rnd, arrays, FakeStrategy(state), metrics=rows, details=[{"round": rnd}],
                           config={"seed": 3}, keep=keep)


def test_checkpoint_roundtrip_keeps_names_dtypes_order_and_state(tmp_path):
    path = _save(tmp_path, 2)
    assert path.name == "round-000002" and not list(path.parent.glob("*.tmp-*"))
    ck = load_checkpoint(path)
    assert ck.round == 2 and list(ck.model) == ["w", "b"]
    assert ck.model["w"].dtype == np.float32 and ck.model["b"].dtype == np.int64
    np.testing.assert_array_equal(ck.model["w"], np.arange(6, dtype=np.float32).reshape(2, 3) + 2)
    # the *_arrays table went to strategy.safetensors and comes back as exact float64 arrays
    m = ck.strategy_state["alignment_arrays"]["m/w"]
    assert isinstance(m, np.ndarray) and m.dtype == np.float64 and m[0, 0] == 0.1 * 2
    assert ck.strategy_state["count"] == 2 and ck.metrics[-1] == {"round": 2, "accuracy": 0.2}
    assert ck.config == {"seed": 3} and ck.details == [{"round": 2}]
    rec = ck.array_record()
    assert list(rec.keys()) == ["w", "b"] and rec["b"].numpy().dtype == np.int64


def test_rng_states_are_restored(tmp_path):
    torch.manual_seed(5)
    np.random.seed(5)
    path = _save(tmp_path, 1)
    expected = (torch.rand(3), np.random.rand(3))
    torch.manual_seed(99)
    np.random.seed(99)
    load_checkpoint(path).restore(FakeStrategy())
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])


def test_keeps_the_newest_complete_checkpoints(tmp_path):
    for r in (1, 2, 3, 4):
        _save(tmp_path, r, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round-000003", "round-000004"]
    # a temporary directory left by a killed writer is never taken for a checkpoint, and is cleaned up
    (tmp_path / "checkpoints" / "round-000005.tmp-1").mkdir()
    assert load_latest(tmp_path).round == 4
    _save(tmp_path, 5)
    assert not (tmp_path / "checkpoints" / "round-000005.tmp-1").exists()


@pytest.mark.parametrize("damage", ["truncate_model", "garbage_state", "missing_state", "flip_strategy_byte"])
def test_corrupt_checkpoint_names_the_file_and_falls_back(tmp_path, caplog, damage):
    good = _save(tmp_path, 2)
    bad = _save(tmp_path, 4)
    if damage == "truncate_model":
        f = bad / "model.safetensors"
        f.write_bytes(f.read_bytes()[:40])
    elif damage == "garbage_state":
        f = bad / "state.json"
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    elif damage == "missing_state":
        f = bad / "state.json"
        f.unlink()
    else:
        f = bad / "strategy.safetensors"
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=str(f).replace(".", r"\.")):
        load_checkpoint(bad)
    good_bytes = {p.name: p.read_bytes() for p in good.iterdir()}
    with caplog.at_level(logging.WARNING, logger="fedmoe_flwr"):
        ck = load_latest(tmp_path, quarantine=True)
    assert ck.round == 2
    assert str(f) in caplog.text and "falling back" in caplog.text
    # the good checkpoint is untouched, the bad one kept aside for inspection
    assert {p.name: p.read_bytes() for p in good.iterdir()} == good_bytes
    assert not bad.exists() and (tmp_path / "checkpoints" / "corrupt" / bad.name).is_dir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round-000002"]


def test_no_good_checkpoint_raises_listing_them(tmp_path):
    assert load_latest(tmp_path) is None  # no checkpoint at all: a fresh start
    p = _save(tmp_path, 1)
    (p / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        load_latest(tmp_path)


def test_resumed_strategy_shifts_every_hook():
    calls = []

    class Inner:
        name = "inner"

        def summary(self):
            calls.append("summary")

        def configure_train(self, rnd, arrays, config, grid):
            calls.append(("ct", rnd))
            return []

        def aggregate_train(self, rnd, replies):
            calls.append(("at", rnd))
            return None, None

        def configure_evaluate(self, rnd, arrays, config, grid):
            calls.append(("ce", rnd))
            return []

        def aggregate_evaluate(self, rnd, replies):
            calls.append(("ae", rnd))

    class Grid:
        def send_and_receive(self, messages, timeout=None):
            return []

    from flwr.app import ArrayRecord

    seen = []
    ResumedStrategy(Inner(), 4).start(Grid(), ArrayRecord(), num_rounds=2,
                                      evaluate_fn=offset_evaluate_fn(lambda r, a: seen.append(r), 4))
    assert [c for c in calls if c != "summary"] == [("ct", 5), ("at", 5), ("ce", 5), ("ae", 5),
                                                      ("ct", 6), ("at", 6), ("ce", 6), ("ae", 6)]
    assert seen == [5, 6]  # round 0 is not evaluated again
    assert ResumedStrategy(Inner(), 4).name == "inner"


def test_resume_config_keeps_the_saved_run_and_refuses_changes(tmp_path):
    saved = Config(seed=7, num_rounds=6)
    saved.strategy.beta = 0.25
    save_checkpoint(tmp_path, 2, {"w": np.zeros(1)}, FakeStrategy(), metrics=[], config=flatten(saved))
    composed = Config(resume=True)  # `run.py resume=true`: the defaults, not the original overrides
    cfg = resume_config(tmp_path, composed, ["resume=true"])
    assert (cfg.seed, cfg.num_rounds, cfg.strategy.beta, cfg.resume) == (7, 6, 0.25, True)
    composed.num_rounds, composed.quiet = 9, True  # run-control keys may change
    cfg = resume_config(tmp_path, composed, ["resume=true", "num_rounds=9", "quiet=true"])
    assert (cfg.num_rounds, cfg.quiet, cfg.seed) == (9, True, 7)
    composed.seed = 8
    with pytest.raises(ValueError, match="seed"):
        resume_config(tmp_path, composed, ["resume=true", "seed=8"])


# ---------------------------------------------------------------------------- SIGKILL and resume
ROUNDS = 6
EVERY = 2
ARGS = ["backend=local", f"num_rounds={ROUNDS}", f"checkpoint_every={EVERY}", "quiet=true", "report=false",
        "dataset.num_clients=20", "train.local_epochs=1", "seed=3"]


def _cmd(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "run.py"), f"hydra.run.dir={run_dir}", *extra]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _rows_without_timings(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    timing = lambda k: "wall" in k or (k.endswith("_time_s") and not k.startswith("sim_"))  # noqa: E731
    return [{k: v for k, v in r.items() if not timing(k)} for r in rows]


def _rounds_done(run_dir: Path) -> int:
    try:
        return len((run_dir / "metrics.jsonl").read_text().splitlines()) - 1
    except FileNotFoundError:
        return -1


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run; one SIGKILLed mid-run (after a checkpoint, between checkpoints);
    and two resumptions of copies of the killed run (the second after truncating its newest
    checkpoint), run side by side to save time."""
    base = tmp_path_factory.mktemp("resume")
    full, killed = base / "full", base / "killed"
    p_full = subprocess.Popen(_cmd(full, *ARGS), cwd=base, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    p_kill = subprocess.Popen(_cmd(killed, *ARGS), cwd=base, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # kill once a checkpoint exists and the run is past it (round 2*EVERY+1 recorded: checkpoints
    # 2 and 4 exist, round 5 is done, round 6 in flight); the metrics file then holds a row that
    # the resumed run must drop and redo
    deadline = time.monotonic() + 240
    while _rounds_done(killed) < 2 * EVERY + 1 and p_kill.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(p_kill.pid, signal.SIGKILL)
    assert p_kill.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert list_checkpoints(killed), "killed before the first checkpoint"
    killed_at = _rounds_done(killed)
    assert int(list_checkpoints(killed)[-1].name.split("-")[1]) < killed_at < ROUNDS

    plain, corrupt = base / "resumed", base / "resumed-corrupt"
    shutil.copytree(killed, plain)
    shutil.copytree(killed, corrupt)
    *older, newest = list_checkpoints(corrupt)
    assert older, "needs two checkpoints"
    fallback = {p.name: p.read_bytes() for p in older[-1].iterdir()}
    model = newest / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])  # truncated
    # the resume command names nothing but the directory: the config comes from the checkpoint
    procs = [subprocess.Popen(_cmd(d, "resume=true"), cwd=base, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for d in (plain, corrupt)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    _, err = p_full.communicate(timeout=300)
    assert p_full.returncode == 0, err.decode()[-3000:]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return {"full": full, "plain": plain, "corrupt": corrupt, "corrupt_log": logs[1], "bad_file": model,
            "fallback": (older[-1], fallback), "newest": newest.name}


def _assert_same_run(full: Path, resumed: Path) -> None:
    a, b = _rows_without_timings(full / "metrics.jsonl"), _rows_without_timings(resumed / "metrics.jsonl")
    assert [r["round"] for r in b] == list(range(ROUNDS + 1))
    assert a == b
    assert (full / "details.jsonl").read_text() == (resumed / "details.jsonl").read_text()
    ma, mb = torch.load(full / "model.pt"), torch.load(resumed / "model.pt")
    assert list(ma) == list(mb)
    for k in ma:
        assert ma[k].dtype == mb[k].dtype and torch.equal(ma[k], mb[k]), f"{k} differs"
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (full, resumed))
    for s in (sa, sb):
        s.pop("wall_time_total"), s.pop("solve_time")  # wall-clock timings
    assert sa == sb
    csv_rows = (resumed / "metrics.csv").read_text().splitlines()
    assert len(csv_rows) == ROUNDS + 2  # header + rounds 0..ROUNDS, the killed run's extra row dropped


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(runs):
    _assert_same_run(runs["full"], runs["plain"])


@pytest.mark.slow
def test_resume_falls_back_past_a_corrupt_checkpoint_and_is_still_exact(runs):
    assert str(runs["bad_file"]) in runs["corrupt_log"] and "falling back" in runs["corrupt_log"]
    kept = runs["corrupt"] / "checkpoints" / "corrupt" / runs["newest"] / "model.safetensors"
    assert len(kept.read_bytes()) == 100, "the corrupt checkpoint is kept aside, as it was"
    _assert_same_run(runs["full"], runs["corrupt"])
    # the fallback checkpoint was read, never written (it may be pruned once newer ones exist)
    path, before = runs["fallback"]
    if path.exists():
        assert {p.name: p.read_bytes() for p in path.iterdir()} == before


# ---------------------------------------------------------------------------- in-process resume
@pytest.mark.parametrize("strategy,server_opt", [("dense", "avg"), ("aligned", "fedadam")])
def test_in_process_resume_is_exact_for_dense_and_server_optimizer_state(tmp_path, strategy, server_opt):
    from fedmoe_flwr.config import Backend, StrategyName
    from fedmoe_flwr.simulation import run

    def cfg(resume=False):
        c = Config(backend=Backend.local, num_rounds=3, quiet=True, checkpoint_every=1, resume=resume, seed=1)
        c.strategy.name = StrategyName(strategy)
        c.strategy.server_opt = server_opt
        c.strategy.server_lr = 0.05
        c.dataset.num_clients = 10
        c.train.local_epochs = 1
        return c

    full = tmp_path / "full"
    run(cfg(), full)
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "round-000003")  # as if stopped during round 3
    (part / "summary.json").unlink()
    ck = load_latest(part)
    assert ck.round == 2
    if server_opt == "fedadam":  # the optimizer moments travel in strategy.safetensors
        assert any(k.startswith("m/") for k in ck.strategy_state["alignment_arrays"])
    run(cfg(resume=True), part)
    assert _rows_without_timings(full / "metrics.jsonl") == _rows_without_timings(part / "metrics.jsonl")
    ma, mb = torch.load(full / "model.pt"), torch.load(part / "model.pt")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    # resuming a finished run redoes nothing and keeps its results
    before = _rows_without_timings(full / "metrics.jsonl")
    run(cfg(resume=True), full)
    assert _rows_without_timings(full / "metrics.jsonl") == before
    assert all(torch.equal(ma[k], v) for k, v in torch.load(full / "model.pt").items())


def test_a_fresh_run_in_a_used_directory_sets_the_old_checkpoints_aside(tmp_path):
    from fedmoe_flwr.checkpoint import set_aside_checkpoints

    assert set_aside_checkpoints(tmp_path) is None
    _save(tmp_path, 6)
    moved = set_aside_checkpoints(tmp_path)
    assert moved.name.startswith("checkpoints.earlier-") and (moved / "round-000006" / "state.json").is_file()
    assert load_latest(tmp_path) is None


# ---------------------------------------------------------------------------- adversarial checkpoints (issue 13)
def _rewrite(ck_dir: Path, edit=None, tensors=None) -> None:
    """Rewrite a checkpoint as an adversary would: replace tensor files (``{file: arrays}``),
    edit ``state.json`` (``edit(state)``) and recompute the digests, so only consistency
    checks can tell."""
    from safetensors.numpy import save

    state = json.loads((ck_dir / "state.json").read_text())
    for name, arrays in (tensors or {}).items():
        data = save({k: np.ascontiguousarray(v) for k, v in arrays.items()})
        (ck_dir / name).write_bytes(data)
        state["files"][name] = hashlib.sha256(data).hexdigest()
    if edit is not None:
        edit(state)
    (ck_dir / "state.json").write_text(json.dumps(state))


def _tensors(ck_dir: Path, name: str) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(ck_dir / name))


def _grow(arrays: dict, prefix: str = "") -> dict:
    """The first tensor whose name starts with ``prefix`` gets an extra axis (same bytes, new shape)."""
    key = next(k for k in arrays if k.startswith(prefix))
    return {**arrays, key: arrays[key][..., None]}


def _outside_entry(bad: Path, good: Path) -> None:
    # an extra entry: a valid tensor file outside the checkpoint, by absolute path, with its true digest
    outside = bad.parent.parent / "outside.safetensors"
    outside.write_bytes((good / "model.safetensors").read_bytes())
    _rewrite(bad, lambda s: s["files"].update({str(outside): hashlib.sha256(outside.read_bytes()).hexdigest()}))


def _symlinked_model(bad: Path, good: Path) -> None:
    (bad / "model.safetensors").unlink()
    (bad / "model.safetensors").symlink_to(good / "model.safetensors")
    _rewrite(bad, lambda s: s["files"].update({"model.safetensors": hashlib.sha256((good / "model.safetensors").read_bytes()).hexdigest()}))


# each: (bad checkpoint dir, good older dir) -> None; the finding of issue 13 it reproduces in the comment
DAMAGES = {
    # 1: state.json's round edited: must equal the directory's round and be >= 0
    "round_earlier": lambda bad, good: _rewrite(bad, lambda s: s.update(round=s["round"] - 2)),
    "round_negative": lambda bad, good: _rewrite(bad, lambda s: s.update(round=-5)),
    # 2: non-digest errors fall back instead of crashing
    "round_text": lambda bad, good: _rewrite(bad, lambda s: s.update(round="abc")),
    "files_empty": lambda bad, good: _rewrite(bad, lambda s: s.update(files={})),
    "model_wrong_shape": lambda bad, good: _rewrite(bad, tensors={"model.safetensors": _grow(_tensors(bad, "model.safetensors"))}),
    "model_wrong_dtype": lambda bad, good: _rewrite(bad, tensors={"model.safetensors": {
        k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in _tensors(bad, "model.safetensors").items()}}),
    "moment_wrong_shape": lambda bad, good: _rewrite(bad, tensors={
        "strategy.safetensors": _grow(_tensors(bad, "strategy.safetensors"), "alignment_arrays/m/")}),
    "rng_garbage": lambda bad, good: _rewrite(bad, lambda s: s["rng"]["numpy"].update(keys=[1, 2, 3])),
    "strategy_not_object": lambda bad, good: _rewrite(bad, lambda s: s.update(strategy=["x"])),
    # 4: rows past the checkpoint's round would be written twice; missing rows would leave a gap
    "metrics_repeat_round": lambda bad, good: _rewrite(bad, lambda s: s["metrics"].append(dict(s["metrics"][-1]))),
    "metrics_missing_rows": lambda bad, good: _rewrite(bad, lambda s: s.update(metrics=s["metrics"][:1])),
    # 3: tensor files must resolve inside the checkpoint directory
    "files_outside": _outside_entry,
    "files_symlink": _symlinked_model,
}
REFERENCE = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(1, np.int64)}  # what _save's model must look like


def _files_of(ck_dir: Path) -> dict:
    return {p.name: p.read_bytes() for p in ck_dir.iterdir()}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_resume_quarantines_any_bad_checkpoint_and_falls_back(tmp_path, caplog, damage):
    good = _save(tmp_path, 2, keep=5)
    bad = _save(tmp_path, 4, keep=5)
    DAMAGES[damage](bad, good)
    before = _files_of(good)
    strategy = FakeStrategy()
    with caplog.at_level(logging.WARNING, logger="fedmoe_flwr"):
        ck = prepare_resume(tmp_path, Config(seed=3), strategy, expected=REFERENCE)
    assert ck.round == 2 and strategy.d["count"] == 2  # the older checkpoint, restored
    assert str(bad) in caplog.text and "falling back" in caplog.text
    moved = tmp_path / "checkpoints" / "corrupt" / bad.name
    assert moved.is_dir() and not bad.exists()
    reason = (moved.parent / f"{bad.name}.reason.txt").read_text()
    assert str(bad) in reason
    assert _files_of(good) == before and [p.name for p in list_checkpoints(tmp_path)] == [good.name]


@pytest.mark.parametrize("value", [1, -5, "abc", 3.0, True, None])
def test_state_round_must_be_the_directory_round(tmp_path, value):
    bad = _save(tmp_path, 3)
    _rewrite(bad, lambda s: s.update(round=value))
    with pytest.raises(CheckpointError, match=rf"state\.json .*round"):
        load_checkpoint(bad)


def test_files_outside_the_checkpoint_are_never_read(tmp_path, monkeypatch):
    good, bad = _save(tmp_path, 2), _save(tmp_path, 4)
    _outside_entry(bad, good)
    read = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: read.append(self.name) or real(self))
    with pytest.raises(CheckpointError, match="tensor files"):
        load_checkpoint(bad)
    assert read == ["state.json"]  # refused before opening any listed file


def test_a_symlinked_checkpoint_directory_is_refused(tmp_path):
    _save(tmp_path, 2)
    elsewhere = tmp_path / "elsewhere"
    os.replace(_save(tmp_path / "other", 4), elsewhere)  # a valid round-4 checkpoint outside the run
    (tmp_path / "checkpoints" / "round-000004").symlink_to(elsewhere, target_is_directory=True)
    assert load_latest(tmp_path, quarantine=True).round == 2
    assert (elsewhere / "state.json").is_file()  # the link was moved aside, not what it points to
    assert (tmp_path / "checkpoints" / "corrupt" / "round-000004").is_symlink()


def test_without_any_good_checkpoint_resume_starts_fresh_and_keeps_the_bad_ones(tmp_path, caplog):
    for r in (2, 4):
        DAMAGES["round_text"](_save(tmp_path, r, keep=5), None)
    strategy = FakeStrategy({"count": "fresh"})
    with caplog.at_level(logging.WARNING, logger="fedmoe_flwr"):
        assert prepare_resume(tmp_path, Config(seed=3), strategy, expected=REFERENCE) is None
    assert "starting from round 0" in caplog.text and strategy.d == {"count": "fresh"}
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "corrupt").iterdir() if p.is_dir()) == ["round-000002", "round-000004"]
    assert list_checkpoints(tmp_path) == []
    cfg = Config(seed=5)
    assert resume_config(tmp_path, cfg, ["resume=true"]) is cfg  # nothing to continue: the given config


def test_retention_never_counts_a_bad_or_newer_checkpoint(tmp_path):
    # a newer bad checkpoint (round 4) must not push the good round 2 out when round 3 is saved
    good = _save(tmp_path, 2, keep=5)
    DAMAGES["files_empty"](_save(tmp_path, 4, keep=5), good)
    _save(tmp_path, 3, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round-000002", "round-000003", "round-000004"]
    # nor an older bad one: round 6 is bad, so saving 7 keeps 5 as the second good checkpoint
    for r in (5, 6):
        _save(tmp_path, r, keep=5)
    DAMAGES["model_wrong_shape"](list_checkpoints(tmp_path)[-1], None)
    _save(tmp_path, 7, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round-000005", "round-000006", "round-000007"]
    _save(tmp_path, 8, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round-000007", "round-000008"]


def test_writing_a_round_again_moves_the_old_directory_aside(tmp_path):
    first = _save(tmp_path, 4)
    before = _files_of(first)
    _save(tmp_path, 4)
    kept = tmp_path / "checkpoints" / "replaced" / "round-000004"
    assert _files_of(kept) == before and (kept.parent / "round-000004.reason.txt").is_file()
    assert load_checkpoint(first).round == 4


# ---------------------------------------------------------------------------- adversarial checkpoints in a real run
def _run_cfg(resume=False):
    from fedmoe_flwr.config import Backend, StrategyName

    c = Config(backend=Backend.local, num_rounds=4, quiet=True, checkpoint_every=1, checkpoint_keep=5, resume=resume, seed=1)
    c.strategy.name = StrategyName.aligned
    c.strategy.server_opt, c.strategy.server_lr = "fedadam", 0.05  # moments travel in strategy.safetensors
    c.dataset.num_clients, c.train.local_epochs = 10, 1
    return c


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    from fedmoe_flwr.simulation import run

    full = tmp_path_factory.mktemp("adversarial") / "full"
    run(_run_cfg(), full)
    return full


REAL_DAMAGES = {
    **DAMAGES,
    # 2: a strategy state the real strategy cannot load (ExpertStrategy.load_state_dict raises)
    "strategy_unloadable": lambda bad, good: _rewrite(bad, lambda s: s["strategy"].pop("alignment")),
}


# a few damages run by default; the rest (same code paths as the unit test above) are marked slow
_QUICK = {"round_earlier", "model_wrong_shape", "moment_wrong_shape", "strategy_unloadable", "every_checkpoint"}


@pytest.mark.parametrize("damage", [pytest.param(d, marks=() if d in _QUICK else pytest.mark.slow)
                                    for d in sorted(REAL_DAMAGES) + ["every_checkpoint"]])
def test_a_real_run_resumes_past_a_bad_checkpoint_exactly(full_run, tmp_path, damage):
    from fedmoe_flwr.simulation import run

    part = tmp_path / "part"
    shutil.copytree(full_run, part)
    root = part / "checkpoints"
    shutil.rmtree(root / "round-000004")  # as if stopped during round 4
    (part / "summary.json").unlink()
    if damage == "every_checkpoint":  # nothing to fall back to: a fresh start (which repeats the run)
        bad = list_checkpoints(part)
        for p in bad:
            DAMAGES["round_text"](p, None)
    else:
        bad = [root / "round-000003"]
        REAL_DAMAGES[damage](bad[0], root / "round-000002")
    untouched = {p.name: _files_of(p) for p in list_checkpoints(part) if p not in bad}
    run(_run_cfg(resume=True), part)
    # rows continue from the restored round: rounds 0..4 once each, as in the uninterrupted run
    assert _rows_without_timings(part / "metrics.jsonl") == _rows_without_timings(full_run / "metrics.jsonl")
    assert (part / "details.jsonl").read_text() == (full_run / "details.jsonl").read_text()
    ma, mb = torch.load(full_run / "model.pt"), torch.load(part / "model.pt")
    assert list(ma) == list(mb) and all(torch.equal(ma[k], mb[k]) for k in ma)
    # the good checkpoints were never written over; the bad ones are kept aside with a reason
    assert {name: _files_of(root / name) for name in untouched} == untouched
    assert sorted(p.name for p in (root / "corrupt").glob("*.reason.txt")) == sorted(f"{p.name}.reason.txt" for p in bad)
    assert [p.name for p in list_checkpoints(part)] == [f"round-{r:06d}" for r in range(1, 5)]
