"""fedmoe_flwr on a real Flower deployment: SuperLink and SuperNodes as processes on 127.0.0.1.

The slow tests start ``flower-superlink`` and ``flower-supernode`` processes (each
SuperNode declares its client id, data partition and memory in ``--node-config``) and
submit the app with ``flwr run``; every process is stopped by PID when a test ends, also
on failure (``LoopbackFederation`` is a context manager; ``atexit`` is the last resort).
The fast tests check the pieces: the pyproject app config, the node_config of a real
device, and the ServerApp's message log.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.config import flatten_dict, parse_config_args

from fedmoe_flwr import protocol as P
from fedmoe_flwr.client.app import make_client_app, simulated_device
from fedmoe_flwr.config import Backend, Config, TierConfig, flatten, unflatten
from fedmoe_flwr.deploy import app_config
from fedmoe_flwr.deploy.grid import DeploymentGrid, read_log
from fedmoe_flwr.deploy.launcher import (
    LocalSimulation,
    LoopbackFederation,
    make_node_key,
    node_config_arg,
    write_run_config,
)
from fedmoe_flwr.deploy.launcher import _alive as alive
from fedmoe_flwr.deploy.nodes import fleet_node_configs
from fedmoe_flwr.experiment import build, experiment_for
from fedmoe_flwr.models.slicing import to_array_record
from fedmoe_flwr.server_app import build_strategy
from fedmoe_flwr.sim import LocalGrid
from fedmoe_flwr.simulation import run as simulate

ROOT = Path(__file__).resolve().parents[1]


def deployment_config(rounds: int) -> Config:
    """Tiny and deterministic: digits over 3 clients with 1, 2 and all 4 experts, no dropouts."""
    cfg = Config()
    cfg.num_rounds = rounds
    cfg.quiet = True
    cfg.save_model = True
    cfg.dataset.num_clients = 3
    cfg.model.num_experts = 4
    cfg.model.d_model = cfg.model.d_hidden = 32
    cfg.strategy.name = "aligned"
    cfg.strategy.fraction_train = 1.0
    cfg.strategy.min_train_nodes = 3
    cfg.strategy.pace_margin = 0.0  # no deadline, no pace: every reply is aggregated
    cfg.fleet.deadline_s = None
    cfg.fleet.jitter = 0.0
    cfg.fleet.tiers = [
        TierConfig(name="small", fraction=1 / 3, max_experts=1, samples_per_s=100, uplink_mbps=1, downlink_mbps=4),
        TierConfig(name="mid", fraction=1 / 3, max_experts=2, samples_per_s=400, uplink_mbps=5, downlink_mbps=20),
        TierConfig(name="large", fraction=1 / 3, max_experts=-1, samples_per_s=2000, uplink_mbps=50, downlink_mbps=200),
    ]
    cfg.train.local_epochs = 1
    return cfg


def run_config(cfg: Config, out: Path) -> dict:
    return {**flatten(cfg), "output-dir": str(out), "round-timeout": 300.0}


def metrics(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def declared_budget(node: dict, layout) -> int:
    return int(float(node["memory-mb"]) * 2**20) - layout.shared_nbytes


def check_run(out: Path, cfg: Config, nodes: list[dict]) -> list[dict]:
    """The run's outputs: all rounds with metrics; no node got more expert bytes than it declared."""
    layout = experiment_for(cfg)[3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == cfg.num_rounds
    rows = metrics(out)
    assert [r["round"] for r in rows] == list(range(cfg.num_rounds + 1))
    assert all("accuracy" in r for r in rows)
    assert all(r["num_sent"] == len(nodes) for r in rows[1:])
    log = read_log(out / "messages.jsonl")
    want = {str(n["client-id"]): declared_budget(n, layout) for n in nodes}
    queried = {r["client"]: r["declared_expert_bytes"] for r in log if r["event"] == "reply" and r["type"] == "query"}
    assert queried == want, "each SuperNode reported the budget its node_config declares"
    sends = [r for r in log if r["event"] == "send" and r["type"] == MessageType.TRAIN]
    assert len(sends) == len(nodes) * cfg.num_rounds
    for r in sends:
        assert r["experts"], "every node gets at least one expert"
        assert r["expert_bytes"] <= want[r["client"]], f"{r['client']} received more than it declared"
        assert r["bytes"] == layout.shared_nbytes + r["expert_bytes"], "exactly the shared tensors and its experts"
    held = {c: max(len(r["experts"]) for r in sends if r["client"] == c) for c in want}
    assert sorted(held.values()) == [1, 2, 4], "capacities 1, 2 and all experts were used"
    return log


@pytest.fixture(scope="module")
def loopback(tmp_path_factory):
    """One loopback deployment of 3 rounds, shared by the tests below; all processes stopped after."""
    cfg = deployment_config(rounds=3)
    work = tmp_path_factory.mktemp("loopback")
    nodes = fleet_node_configs(cfg)
    out = work / "out"
    with LoopbackFederation(work, nodes) as fed:
        result = fed.run(ROOT, run_config(cfg, out), timeout=540, done_file=out / "summary.json")
        pids = fed.pids()
    return SimpleNamespace(cfg=cfg, nodes=nodes, out=out, result=result, pids=pids, work=work)


# ------------------------------------------------------------------------ loopback deployment
@pytest.mark.slow
def test_loopback_deployment_runs_and_respects_declared_budgets(loopback):
    assert loopback.result.status == "finished:completed"
    log = check_run(loopback.out, loopback.cfg, loopback.nodes)
    assert metrics(loopback.out)[-1]["accuracy"] > 0.2, "it learns (chance is 0.1)"
    # real devices: compute time measured, transfer time = bytes / declared link speed
    downlink = {n["client-id"]: n[P.DOWNLINK] for n in loopback.nodes}
    replies = [r for r in log if r["event"] == "reply" and r["type"] == MessageType.TRAIN]
    sends = {(r["round"], r["client"]): r for r in log if r["event"] == "send" and r["type"] == MessageType.TRAIN}
    assert len(replies) == len(sends) and not any("error" in r for r in replies)
    for r in replies:
        assert r["train_time_s"] > 0
        assert r["down_time_s"] == pytest.approx(sends[(r["round"], r["client"])]["bytes"] / downlink[r["client"]])
    assert [p for p in loopback.pids if alive(p)] == [], "every process of the federation was stopped"


@pytest.mark.slow
def test_loopback_deployment_equals_simulation(loopback, tmp_path):
    cfg = deployment_config(rounds=3)
    cfg.backend = Backend.local
    simulate(cfg, tmp_path / "sim")
    deployed = torch.load(loopback.out / "model.pt")
    simulated = torch.load(tmp_path / "sim" / "model.pt")
    assert deployed.keys() == simulated.keys()
    for name in simulated:
        torch.testing.assert_close(deployed[name], simulated[name], rtol=1e-5, atol=1e-6, msg=name)
    for d, s in zip(metrics(loopback.out), metrics(tmp_path / "sim")):
        assert d["accuracy"] == pytest.approx(s["accuracy"], abs=1e-9)
        assert d.get("num_aggregated") == s.get("num_aggregated")


@pytest.mark.slow
def test_tls_and_supernode_authentication_on_loopback(tmp_path):
    cfg = deployment_config(rounds=2)
    nodes = fleet_node_configs(cfg, speeds=False)
    out = tmp_path / "out"
    with LoopbackFederation(tmp_path, nodes, tls=True, auth=True) as fed:
        # only registered keys may join, and only clients trusting the CA may connect
        intruder_key, _ = make_node_key(tmp_path / "keys", "intruder")
        intruder = fed.spawn_node(0, key=intruder_key, name="intruder")
        (fed.home / "config.toml").write_text(
            (fed.home / "config.toml").read_text() + f'\n[superlink.untrusted]\naddress = "127.0.0.1:{fed.port}"\n'
        )
        with pytest.raises(RuntimeError, match="unavailable"):
            fed.flwr("ls", "untrusted", "--format", "json")
        result = fed.run(ROOT, run_config(cfg, out), timeout=540, done_file=out / "summary.json")
        intruder.proc.wait(timeout=60)
        pids = fed.pids()
    assert result.status == "finished:completed"
    check_run(out, cfg, nodes)
    assert intruder.proc.returncode != 0 and "Failed to activate SuperNode" in intruder.log(10**6)
    assert [p for p in pids if alive(p)] == []


@pytest.mark.slow
def test_flwr_run_local_simulation_equals_in_process_simulation(tmp_path):
    cfg = deployment_config(rounds=2)
    out = tmp_path / "out"
    with LocalSimulation(tmp_path, num_supernodes=cfg.dataset.num_clients) as sim:
        result = sim.run(ROOT, run_config(cfg, out), timeout=540, done_file=out / "summary.json")
        pids = sim.pids()
    assert pids, "flwr started a local SuperLink"
    assert [p for p in pids if alive(p)] == [], "and it was stopped"
    assert result.status == "finished:completed"
    cfg.backend = Backend.local
    simulate(cfg, tmp_path / "local")
    a, b = torch.load(out / "model.pt"), torch.load(tmp_path / "local" / "model.pt")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------ the pieces, fast
def test_pyproject_app_config_is_the_quickstart_with_every_key():
    assert app_config.main(["--check"]) == 0, "run: python -m fedmoe_flwr.deploy.app_config --write"
    flat = app_config.flat_app_config(ROOT / "pyproject.toml")
    assert set(flatten(Config())) <= set(flat), "flwr run --run-config can override every key"
    run_keys = {k: flat.pop(k) for k in app_config.RUN_KEYS}
    assert run_keys == app_config.RUN_KEYS
    assert unflatten(flat) == app_config.quickstart_config()


def test_node_config_and_run_config_files_parse_as_flower_parses_them(tmp_path):
    node = {"client-id": "edge 7", "partition-id": 3, "memory-mb": 0.1875, "reliability": 0.9, "simulate-fleet": False}
    assert parse_config_args([node_config_arg(node)]) == node
    flat = {**flatten(deployment_config(2)), "output-dir": str(tmp_path)}
    assert parse_config_args([str(write_run_config(tmp_path / "rc.toml", flat))]) == flat


def _message(kind: str, content: RecordDict, node_id: int = 7) -> Message:
    msg = Message(content, dst_node_id=node_id, message_type=kind)
    msg.metadata.__dict__["_message_id"] = f"{kind}-{node_id}"
    return msg


def test_a_supernode_with_declared_capacity_is_a_real_device():
    cfg = deployment_config(rounds=1)
    cfg.fleet.tiers = [TierConfig(name="flaky", max_experts=-1, reliability=0.0)]  # would always drop out if simulated
    cfg, data, model, layout = experiment_for(cfg)
    app = make_client_app(flatten(cfg))
    LocalGrid(app, 1)  # plays Flower's runtime: messages take their run id from it
    node = {"client-id": "edge-a", "partition-id": 1, "memory-mb": (layout.shared_nbytes + 2 * layout.expert_nbytes("L0.E0")) / 2**20,
            P.DOWNLINK: 1e5}
    real = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={"output-dir": "/x", "round-timeout": 5.0})
    simulated = Context(run_id=1, node_id=8, node_config={"partition-id": 1, "num-partitions": 3}, state=RecordDict(), run_config={})
    assert not simulated_device(real) and simulated_device(simulated)
    assert simulated_device(Context(run_id=1, node_id=9, node_config={**node, "simulate-fleet": True}, state=RecordDict(), run_config={}))

    arrays = to_array_record(build(cfg, data).state_dict())
    reply = app(_message(MessageType.QUERY, RecordDict({P.CONFIG: ConfigRecord({"probe": False})})), real)
    prof = reply.content[P.PROFILE]
    assert prof[P.CLIENT_ID] == "edge-a" and prof[P.EXPERT_MEMORY] == 2 * layout.expert_nbytes("L0.E0")
    assert prof[P.DOWNLINK] == 1e5 and P.TIER not in prof

    keys = ["L0.E1", "L0.E3"]
    sent = RecordDict({
        P.ARRAYS: to_array_record({n: torch.from_numpy(arrays[n].numpy()) for n in layout.param_names(keys)}),
        P.CONFIG: ConfigRecord({"server-round": 1, "experts": keys}),
    })
    out = app(_message(MessageType.TRAIN, sent), real)
    assert not out.has_error(), "real devices never drop out on purpose"
    rep = out.content[P.REPORT]
    assert rep[P.TRAIN_TIME] > 0
    assert rep[P.DOWN_TIME] == pytest.approx(P.record_nbytes(sent[P.ARRAYS]) / 1e5) and rep[P.UP_TIME] == 0.0
    dropped = app(_message(MessageType.TRAIN, sent, node_id=8), simulated)
    assert dropped.has_error(), "the simulated fleet's reliability still applies without declared capacity"


def test_deployment_grid_caps_timeouts_and_logs_what_each_node_got(tmp_path):
    cfg = deployment_config(rounds=1)
    cfg, data, _, layout = experiment_for(cfg)
    inner = LocalGrid(make_client_app(flatten(cfg)), 3, seed=0)
    seen = []
    inner_sr = inner.send_and_receive
    inner.send_and_receive = lambda msgs, timeout=None: (seen.append(timeout), inner_sr(msgs, timeout=timeout))[1]
    grid = DeploymentGrid(inner, round_timeout=7.0, log_path=tmp_path / "messages.jsonl", layout=layout)
    strategy = build_strategy(cfg, layout)
    strategy.start(grid=grid, initial_arrays=to_array_record(build(cfg, data).state_dict()), num_rounds=1,
                   timeout=3600, train_config=ConfigRecord())
    assert seen and all(t == 7.0 for t in seen)
    log = read_log(tmp_path / "messages.jsonl")
    sends = [r for r in log if r["event"] == "send" and r["type"] == MessageType.TRAIN]
    assert sorted(r["client"] for r in sends) == ["0", "1", "2"]
    for r in sends:
        assert r["experts"] == strategy.last.assignment[r["client"]]
        assert r["expert_bytes"] == sum(layout.expert_nbytes(k) for k in r["experts"])
        assert r["expert_bytes"] <= r["declared_expert_bytes"]
        assert r["tensors"] == len(layout.param_names(r["experts"]))
    assert any(r["event"] == "nodes" and r["count"] == 3 for r in log)


def test_a_real_device_keeps_its_partition_in_context_state(monkeypatch):
    """A new ClientApp process per message: the second message must not rebuild the dataset."""
    import fedmoe_flwr.experiment as experiment
    from fedmoe_flwr.client.node_cache import ARRAYS_KEY, node_experiment

    cfg = deployment_config(rounds=1)
    full = experiment_for(cfg)[1]
    ctx = Context(run_id=1, node_id=7, node_config={"client-id": "a", "partition-id": 2}, state=RecordDict(), run_config={})
    _, data, model, layout = node_experiment(cfg, ctx, 2)
    assert ARRAYS_KEY in ctx.state.array_records
    state = RecordDict({k: v for k, v in ctx.state.items()})  # what the SuperNode hands the next process
    monkeypatch.setattr(experiment, "experiment_for", lambda *_: pytest.fail("rebuilt the dataset"))
    _, cached, model2, layout2 = node_experiment(cfg, Context(run_id=1, node_id=7, node_config=ctx.node_config,
                                                               state=state, run_config={}), 2)
    for got, want in ((cached.client_train(2), full.client_train(2)), (cached.client_holdout(2), full.client_holdout(2))):
        assert all(np.array_equal(g, w) and g.dtype == w.dtype for g, w in zip(got, want))
    assert layout2.expert_keys == experiment_for(cfg)[3].expert_keys
    assert set(model2.state_dict()) == set(experiment_for(cfg)[2].state_dict())
    with pytest.raises(ValueError, match="partition 2"):
        cached.client_train(1)
