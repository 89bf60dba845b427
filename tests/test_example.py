"""The drop-in example: a standard Flower PyTorch app, and the same app switched to fedmoe_flwr.

``examples/pytorch-fedavg`` uses Flower's stock FedAvg and its own train function;
``examples/pytorch-fedmoe`` is the same app with the AlignedStrategy and the client helper.
Their packages have distinct names (``fedavg_quickstart``, ``fedmoe_quickstart``): a
SuperLink that stays up between runs keeps a package it imported once. Both run here in simulation over the in-process grid (each app's own ServerApp and
ClientApp objects, its own pyproject run config).
"""

from __future__ import annotations

import difflib
import json
import math
import importlib
import sys
from pathlib import Path

import pytest
import tomli
import torch
from flwr.app import Context, MessageType, RecordDict
from flwr.common.config import flatten_dict

from fedmoe_flwr.deployment_grid import DeploymentGrid, read_log
from fedmoe_flwr.models import param_layout
from fedmoe_flwr.sim import LocalGrid

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STOCK, SWITCHED = EXAMPLES / "pytorch-fedavg", EXAMPLES / "pytorch-fedmoe"
PACKAGES = {STOCK: "fedavg_quickstart", SWITCHED: "fedmoe_quickstart"}
NUM_NODES = 6


def load_app(app_dir: Path):
    """Import an example app's modules (its package is named in its pyproject's components)."""
    package = PACKAGES[app_dir]
    components = tomli.loads((app_dir / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": f"{package}.server_app:app", "clientapp": f"{package}.client_app:app"}
    sys.path.insert(0, str(app_dir))
    try:
        return {m: importlib.import_module(f"{package}.{m}") for m in ("task", "client_app", "server_app")}
    finally:
        sys.path.remove(str(app_dir))


def run_config(app_dir: Path) -> dict:
    return flatten_dict(tomli.loads((app_dir / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])


def run_app(app_dir: Path, work: Path, monkeypatch, memory_mb: dict | None = None):
    """Run the app's ServerApp over NUM_NODES in-process nodes; returns (accuracy, message log, task)."""
    mods = load_app(app_dir)
    rc = run_config(app_dir)
    grid = LocalGrid(mods["client_app"].app, NUM_NODES, seed=0, run_config=rc)
    for node_id in grid.get_node_ids():  # what `flower-supernode --node-config "memory-mb=..."` declares
        nc = grid.node_context(node_id).node_config
        if nc["partition-id"] in (memory_mb or {}):
            nc["memory-mb"] = memory_mb[nc["partition-id"]]
    logged = DeploymentGrid(grid, log_path=work / "messages.jsonl", layout=param_layout(mods["task"].Net()))
    monkeypatch.chdir(work)
    torch.manual_seed(0)
    mods["server_app"].app(logged, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
    model = mods["task"].Net()
    model.load_state_dict(torch.load(work / "final_model.pt"))
    _, accuracy = mods["task"].test(model, mods["task"].load_test_data())
    return accuracy, read_log(work / "messages.jsonl"), mods["task"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def switched_path(rel: Path) -> Path:
    return SWITCHED / str(rel).replace(PACKAGES[STOCK], PACKAGES[SWITCHED])


def test_the_switch_is_a_small_diff():
    """The lines a user changes to switch: the package rename of the two examples does not count."""
    added = removed = 0
    for path in sorted(p for p in STOCK.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        rel = path.relative_to(STOCK)
        other = switched_path(rel)
        assert other.exists(), f"{rel} missing from the switched app"
        ours = other.read_text().replace(PACKAGES[SWITCHED], PACKAGES[STOCK])
        for line in difflib.unified_diff(path.read_text().splitlines(), ours.splitlines(), lineterm="", n=0):
            if line.startswith(("+++", "---")) or not line[1:].strip():
                continue
            added += line.startswith("+")
            removed += line.startswith("-")
    extra = {p.relative_to(SWITCHED) for p in SWITCHED.rglob("*.py")} - {switched_path(p.relative_to(STOCK)).relative_to(SWITCHED) for p in STOCK.rglob("*.py")}
    assert not extra, f"the switched app adds files: {extra}"
    assert 0 < added < 20 and removed < 20, (added, removed)


def test_stock_and_switched_apps_train_and_the_switched_one_respects_node_budgets(tmp_path, monkeypatch):
    (tmp_path / "stock").mkdir()
    (tmp_path / "fedmoe").mkdir()
    stock_acc, stock_log, task = run_app(STOCK, tmp_path / "stock", monkeypatch)

    layout = param_layout(task.Net())
    e = layout.expert_nbytes("L0.E0")
    # partitions 0-1 can hold 1 expert, 2-3 hold 2; 4-5 declare nothing (every expert fits)
    memory = {i: (layout.shared_nbytes + k * e + e // 2) / 2**20 for i, k in enumerate([1, 1, 2, 2])}
    fedmoe_acc, fedmoe_log, _ = run_app(SWITCHED, tmp_path / "fedmoe", monkeypatch, memory_mb=memory)

    rounds = run_config(STOCK)["num-server-rounds"]
    assert stock_acc > 0.5 and fedmoe_acc > 0.5, (stock_acc, fedmoe_acc)  # chance is 0.1

    stock_train = [r for r in stock_log if r["event"] == "send" and r["type"] == MessageType.TRAIN]
    full = layout.shared_nbytes + sum(layout.expert_nbytes(k) for k in layout.expert_keys)
    assert stock_train and all(r["bytes"] == full for r in stock_train), "FedAvg sends the whole model"

    sends = [r for r in fedmoe_log if r["event"] == "send" and r["type"] == MessageType.TRAIN]
    assert {r["round"] for r in sends} == set(range(1, rounds + 1))
    for r in sends:
        assert r["experts"], "every node trains at least one expert"
        assert r["expert_bytes"] <= r["declared_expert_bytes"], r
        assert len(r["experts"]) <= {"0": 1, "1": 1, "2": 2, "3": 2}.get(r["client"], 4)
        assert r["bytes"] == layout.shared_nbytes + r["expert_bytes"]
    assert any(len(r["experts"]) < len(layout.expert_keys) for r in sends), "small nodes got a part of the model"
    per_round_stock = sum(r["bytes"] for r in stock_train) / len(stock_train)
    per_round_fedmoe = sum(r["bytes"] for r in sends) / len(sends)
    assert per_round_fedmoe < per_round_stock
    queried = {r["client"] for r in fedmoe_log if r["event"] == "reply" and r["type"] == MessageType.QUERY}
    assert len(queried) == NUM_NODES, "every node answered the strategy's QUERY through the helper"

    # the switched app records its run (record_run) in the form `python -m fedmoe_flwr.report` reads
    rows = [json.loads(line) for line in (tmp_path / "fedmoe" / "outputs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(rounds + 1))
    for r in rows[1:]:
        assert r["num_aggregated"] >= 1, r
        assert r["personal_failed"] == 0 and 0 < r["personal_accuracy"] <= 1, "evaluate replies succeed"
        assert math.isfinite(r["train_loss"]) and r["train_loss"] > 0, "the float loss of the user's train()"


@pytest.mark.slow
def test_both_apps_run_back_to_back_on_one_local_superlink(tmp_path):
    """`flwr run . local` keeps its SuperLink up between runs: the apps' distinct package names
    keep the second run from finding the first one's modules."""
    import os

    from fedmoe_flwr.deploy.launcher import LocalSimulation

    root = str(Path(__file__).resolve().parents[1])
    with LocalSimulation(tmp_path, num_supernodes=NUM_NODES) as sim:
        sim.env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, sim.env.get("PYTHONPATH")]))  # this checkout
        results = [sim.run(app, {"num-server-rounds": 2}, timeout=400) for app in (STOCK, SWITCHED)]
    assert [r.status for r in results] == ["finished:completed"] * 2, [r.output[-2000:] for r in results]
    rows = [json.loads(line) for line in (tmp_path / "outputs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["num_aggregated"] >= 1 for r in rows[1:])
