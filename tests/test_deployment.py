"""fedmoe_flwr on a real Flower deployment: SuperLink and SuperNodes as processes on 127.0.0.1.

The slow tests start ``flower-superlink`` and ``flower-supernode`` processes (each
SuperNode declares its client id, data partition and memory in ``--node-config``) and
submit the app with ``flwr run``; every process is stopped by PID when a test ends, also
on failure (``LoopbackFederation`` is a context manager; ``atexit`` is the last resort).
The fast tests check the pieces: the pyproject app config, the node_config of a real
device, and the ServerApp's message log.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import shlex
import socket
import subprocess
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.config import flatten_dict, parse_config_args

from fedmoe_flwr import protocol as P
from fedmoe_flwr.client.app import make_client_app, simulated_device
from fedmoe_flwr.config import Backend, Config, TierConfig, flatten, unflatten
from fedmoe_flwr.deploy import app_config, commands, tomlio
from fedmoe_flwr.deploy.federation import add_connection, connection
from fedmoe_flwr.deploy.fleet_gateway import create_app as gateway_app
from fedmoe_flwr.deploy.fleet_gateway import parser as gateway_parser
from fedmoe_flwr.deployment_grid import DeploymentGrid, read_log
from fedmoe_flwr.deploy.launcher import (
    LocalSimulation,
    LoopbackFederation,
    free_port,
    make_node_key,
    node_config_arg,
    write_run_config,
)
from fedmoe_flwr.deploy.processes import alive
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


def non_loopback_address() -> str | None:
    """This machine's address on its default route (no packet is sent), or None without one."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: any routable address picks the interface
            addr = s.getsockname()[0]
    except OSError:
        return None
    return None if ipaddress.ip_address(addr).is_loopback else addr


@pytest.mark.slow
def test_tls_and_supernode_authentication_on_loopback(tmp_path):
    cfg = deployment_config(rounds=2)
    nodes = fleet_node_configs(cfg, speeds=False)
    out = tmp_path / "out"
    with LoopbackFederation(tmp_path, nodes, tls=True, auth=True, gateway=True) as fed:
        # only registered keys may join, and only clients trusting the CA may connect
        intruder_key, _ = make_node_key(tmp_path / "keys", "intruder")
        intruder = fed.spawn_node(0, key=intruder_key, name="intruder")
        add_connection(fed.home, "untrusted", {"address": f"127.0.0.1:{fed.port}"})
        with pytest.raises(RuntimeError, match="unavailable"):
            fed.flwr("ls", "untrusted", "--format", "json")
        # the devices' address (the gateway) serves no Control API: no self-registered keys
        _, evil_pub = make_node_key(tmp_path / "keys", "evil")
        add_connection(fed.home, "public", connection(fed.fleet_address, ca=fed.certs["ca"]))
        with pytest.raises(RuntimeError, match="403 Forbidden"):
            fed.flwr("supernode", "register", str(evil_pub), "public")
        # and the SuperLink itself (Control API) is not reachable on another interface
        if (addr := non_loopback_address()) is not None:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((addr, fed.port), timeout=5).close()
        result = fed.run(ROOT, run_config(cfg, out), timeout=540, done_file=out / "summary.json")
        intruder.proc.wait(timeout=60)
        registered = json.loads(fed.flwr("supernode", "ls", fed.connection, "--format", "json"))["nodes"]
        pids = fed.pids()
    assert result.status == "finished:completed"
    check_run(out, cfg, nodes)
    assert intruder.proc.returncode != 0 and "Failed to activate SuperNode" in intruder.log(10**6)
    assert len(registered) == len(nodes), "only the operator's registrations exist"
    assert [p for p in pids if alive(p)] == []


@pytest.mark.slow
def test_the_runbooks_openssl_and_ssh_keygen_commands_make_working_credentials(tmp_path):
    """docs/deployment.md's certificate block and ssh-keygen line, run as written; two nodes join."""
    blocks = runbook_blocks()
    certs_block = next(b for b in blocks if "openssl genrsa" in b)
    subprocess.run(["bash", "-e", "-c", certs_block], cwd=tmp_path, check=True, capture_output=True)
    keygen = next(line for b in blocks for line in b.splitlines() if line.startswith("ssh-keygen"))
    (tmp_path / "keys").mkdir()
    node_keys = []
    for name in ("node0", "node1"):
        argv = shlex.split(keygen.replace("phone-17", name), comments=True)
        subprocess.run(argv, cwd=tmp_path, check=True, capture_output=True)
        node_keys.append((tmp_path / "keys" / name, tmp_path / "keys" / f"{name}.pub"))
    certs = {"ca": tmp_path / "certs" / "ca.crt", "cert": tmp_path / "certs" / "server.pem",
             "key": tmp_path / "certs" / "server.key"}
    nodes = [{"client-id": "a", "partition-id": 0}, {"client-id": "b", "partition-id": 1}]
    with LoopbackFederation(tmp_path / "fed", nodes, tls=True, auth=True, gateway=True, certs=certs,
                            node_keys=node_keys) as fed:
        listed = json.loads(fed.flwr("supernode", "ls", fed.connection, "--format", "json"))["nodes"]
        pids = fed.pids()
    assert sorted(n["status"] for n in listed) == ["online", "online"]
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


# ------------------------------------------------------------------------ the runbook's commands
def runbook_blocks() -> list[str]:
    """The ```bash blocks of docs/deployment.md."""
    return re.findall(r"```bash\n(.*?)```", (ROOT / "docs" / "deployment.md").read_text(), re.S)


def runbook_command(*prefix: str) -> list[str]:
    """The one command of the runbook that starts with ``prefix``, as its argv."""
    found = []
    for block in runbook_blocks():
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv[: len(prefix)] == list(prefix):
                found.append(argv)
    assert len(found) == 1, f"{prefix}: {len(found)} commands in docs/deployment.md"
    return found[0]


RUNBOOK_CERTS = {"ca": "certs/ca.crt", "cert": "certs/server.pem", "key": "certs/server.key"}


def test_the_runbook_binds_the_fleet_api_publicly_and_the_control_api_to_loopback():
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink

    superlink = runbook_command("flower-superlink")
    gateway = runbook_command("python", "-m", commands.GATEWAY_MODULE)
    node = runbook_command("flower-supernode")
    # the runbook's commands are the launcher's (the loopback tests run these)
    assert superlink == commands.superlink_argv(8000, certs=RUNBOOK_CERTS, auth=True, database="state.db")
    assert gateway == commands.gateway_argv(9092, 8000, certs=RUNBOOK_CERTS)
    declared = {"client-id": "phone-17", "partition-id": 17, "memory-mb": 0.09, P.DOWNLINK: 2.5e6, P.UPLINK: 6.25e5}
    assert node == commands.supernode_argv("superlink.example.org:9092", declared, ca="certs/ca.crt", key="keys/phone-17")
    # where each API listens, as the programs themselves parse their arguments
    link = _parse_args_run_superlink().parse_args(superlink[1:])
    gw = gateway_parser().parse_args(gateway[3:])
    assert ipaddress.ip_address(link.host).is_loopback, "Control (and Runtime) API: this machine only"
    assert link.enable_supernode_auth and not link.insecure
    assert not ipaddress.ip_address(gw.host).is_loopback, "Fleet API: reachable from the devices"
    assert (gw.host, gw.port) != (link.host, link.port) and gw.superlink == f"{link.host}:{link.port}"
    assert node[node.index("--superlink") + 1].endswith(f":{gw.port}"), "SuperNodes connect to the gateway"
    # the operator's connection is the Control API on loopback (through the SSH tunnel)
    toml_block = re.search(r"```toml\n(.*?)```", (ROOT / "docs" / "deployment.md").read_text(), re.S).group(1)
    conn = tomllib.loads(toml_block)["superlink"]["fedmoe-prod"]
    assert conn["address"] == f"127.0.0.1:{link.port}"


@pytest.mark.parametrize("tls,auth", [(False, False), (True, False), (True, True)])
def test_the_launchers_superlink_serves_its_control_api_on_loopback_only(tmp_path, tls, auth):
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink

    fed = LoopbackFederation(tmp_path, [{"client-id": "a"}], tls=tls, auth=auth, port=8123,
                             certs=RUNBOOK_CERTS if tls else {})
    args = _parse_args_run_superlink().parse_args(fed.superlink_argv()[1:])
    assert (args.host, args.port) == ("127.0.0.1", 8123)
    assert args.insecure == (not tls) and args.enable_supernode_auth == auth
    with pytest.raises(ValueError, match="needs TLS"):
        commands.superlink_argv(8123, auth=True)


def test_the_fleet_gateway_forwards_the_fleet_api_and_refuses_the_rest():
    from starlette.testclient import TestClient

    closed = free_port()  # nothing listens there: a forwarded call gets 502, a refused one 403
    with TestClient(gateway_app(f"127.0.0.1:{closed}", insecure=True)) as client:
        for method, path in [("POST", "/v1/control/register-node"), ("POST", "/v1/control/start-run"),
                             ("POST", "/v1/runtime/acquire-task"), ("GET", "/v1/fleet/pull-messages"),
                             ("POST", "/v1/fleetx"), ("GET", "/docs")]:
            reply = client.request(method, path, content=b"")
            assert reply.status_code == 403, (method, path)
            assert "only the Fleet API" in reply.text
        forwarded = client.post("/v1/fleet/pull-messages", content=b"\x00")
        assert forwarded.status_code == 502 and f"127.0.0.1:{closed}" in forwarded.text


def test_nest_refuses_a_key_that_is_both_a_value_and_a_table():
    assert tomlio.nest({"a.b": 1, "a.c.d": "x", "e": True}) == {"a": {"b": 1, "c": {"d": "x"}}, "e": True}
    with pytest.raises(ValueError, match="'a' is a value"):
        tomlio.nest({"a": 1, "a.b": 2})
    with pytest.raises(ValueError, match="is a table"):
        tomlio.nest({"a.b": 2, "a": 1})


_node_keys = st.text(alphabet="abcxyz019-_", min_size=1, max_size=8)
_node_values = st.one_of(st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False), st.text(max_size=20))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_node_keys, _node_values, max_size=6))
def test_node_config_text_parses_back_as_flower_parses_it(node):
    def passable(v):
        return not isinstance(v, str) or '"' not in v or ("'" not in v and not any(ord(c) < 32 or ord(c) == 127 for c in v))

    if all(passable(v) for v in node.values()):
        assert parse_config_args([node_config_arg(node)]) == node
    else:
        with pytest.raises(ValueError, match="quote kinds"):
            node_config_arg(node)
