"""End to end: run.py's path through Flower's Ray simulation engine and the in-process grid."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedmoe_flwr.config import Backend, Config, TierConfig
from fedmoe_flwr.simulation import run

ROOT = Path(__file__).resolve().parents[1]


def integration_config(backend: Backend) -> Config:
    cfg = Config()
    cfg.backend = backend
    cfg.num_rounds = 4
    cfg.quiet = True
    cfg.save_model = False
    cfg.dataset.num_clients = 20
    cfg.dataset.alpha = 0.3
    cfg.model.num_experts = 8
    cfg.strategy.fraction_train = 0.5
    cfg.fleet.deadline_s = None
    cfg.fleet.tiers = [
        TierConfig(name="small", fraction=0.4, max_experts=2, samples_per_s=100, uplink_mbps=1, downlink_mbps=4, reliability=0.9),
        TierConfig(name="mid", fraction=0.4, max_experts=4, samples_per_s=400, uplink_mbps=5, downlink_mbps=20),
        TierConfig(name="large", fraction=0.2, max_experts=-1, samples_per_s=2000, uplink_mbps=50, downlink_mbps=200),
    ]
    return cfg


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        for k in [k for k in r if "time" in k and "sim" not in k]:
            r.pop(k)  # wall-clock timings differ between runs
    return rows


@pytest.mark.slow
def test_ray_simulation_learns_trains_every_expert_and_is_reproducible(tmp_path):
    cfg = integration_config(Backend.ray)
    a = run(cfg, tmp_path / "a")
    rows = _metrics(tmp_path / "a")
    assert a["rounds"] == 4
    assert a["final_accuracy"] > 0.3, "well above chance (0.1) after 4 rounds"
    assert rows[-1]["experts_trained_total"] == 8
    # the same seed through the in-process grid gives identical metrics
    cfg_local = integration_config(Backend.local)
    run(cfg_local, tmp_path / "b")
    assert _metrics(tmp_path / "b") == rows


def test_same_seed_same_metrics_local(tmp_path):
    cfg = integration_config(Backend.local)
    cfg.num_rounds = 2
    run(cfg, tmp_path / "a")
    run(cfg, tmp_path / "b")
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")
    cfg.seed = 1
    run(cfg, tmp_path / "c")
    assert _metrics(tmp_path / "c") != _metrics(tmp_path / "a")


def test_run_py_writes_outputs_and_rejects_bad_keys(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "run.py"), f"hydra.run.dir={out}", "num_rounds=2", "quiet=true"]
    # the timeouts only catch a hang: a Ray start on 2 shared cores once took over 300 s
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("final_accuracy", "rounds", "bytes_total", "sim_time_total", "to_target"):
        assert key in summary
    assert (out / ".hydra" / "config.yaml").exists() and (out / "model.pt").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    bad = subprocess.run(cmd[:2] + ["strategy.nme=1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "nme" in bad.stderr
    bad = subprocess.run(cmd[:2] + ["strategy=bogus"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "aligned" in bad.stderr


def _model(out: Path) -> dict:
    import torch

    return torch.load(out / "model.pt")


def test_parallel_workers_give_the_sequential_metrics_and_final_model(tmp_path):
    cfg = integration_config(Backend.local)
    cfg.num_rounds = 2
    cfg.save_model = True
    run(cfg, tmp_path / "sequential")
    cfg.num_workers = 2
    run(cfg, tmp_path / "parallel")
    assert _metrics(tmp_path / "parallel") == _metrics(tmp_path / "sequential")
    seq, par = _model(tmp_path / "sequential"), _model(tmp_path / "parallel")
    assert list(par) == list(seq)
    assert all(par[k].equal(seq[k]) for k in seq), "bit-identical final model"


def _counting_app():
    """A ClientApp that counts its calls in ``context.state`` and fails on partition 0."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg, context):
        calls = context.state.config_records.get("calls", ConfigRecord({"n": 0}))["n"] + 1
        context.state["calls"] = ConfigRecord({"n": calls})
        if context.node_config["partition-id"] == 0:
            raise ValueError("boom")
        return Message(RecordDict({"metrics": MetricRecord({"calls": calls})}), reply_to=msg)

    return app


def _two_batches(workers: int) -> list:
    from flwr.app import Message, MessageType, RecordDict

    from fedmoe_flwr.sim import LocalGrid

    with LocalGrid(_counting_app(), 5, seed=3, workers=workers) as grid:
        nodes = sorted(grid.get_node_ids(), key=lambda n: grid.node_context(n).node_config["partition-id"])
        out = []
        for _ in range(2):
            msgs = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes + [12345]]
            out.append([r.error.reason.splitlines()[0] if r.has_error() else r.content["metrics"]["calls"]
                        for r in grid.send_and_receive(msgs)])
    return out


def test_worker_processes_keep_node_state_and_turn_failures_into_error_replies():
    parallel = _two_batches(workers=3)
    assert parallel[1][1:5] == [2, 2, 2, 2], "context.state written in a worker comes back to the grid"
    assert parallel[1][0] == "ValueError: boom" and parallel[1][5] == "node 12345 is not connected"
    assert parallel == _two_batches(workers=1)


def test_ray_backend_config_joins_the_configured_cluster_with_per_client_cpus():
    from fedmoe_flwr.simulation import ray_backend_config

    cfg = Config()
    cfg.num_cpus_per_client = 2.0
    own = ray_backend_config(cfg)
    assert "address" not in own["init_args"] and own["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.0}
    cfg.ray_address = "10.0.0.5:6379"
    assert ray_backend_config(cfg)["init_args"]["address"] == "10.0.0.5:6379"
