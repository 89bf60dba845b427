"""The drop-in example's two variants, 3 rounds each on the in-process grid.

``examples/pytorch-fedmoe-custom``: the user's own MoE (a router ``nn.Linear`` and an
``nn.ModuleList`` of experts) described by one ``MoESpec`` line. ``examples/hf-fedmoe``: a
Hugging Face Mixtral (fused experts) on Shakespeare roles, with compact clients. Each app's
own ServerApp, ClientApp and pyproject run config run as ``flwr run`` would run them.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import tomli
import torch
from flwr.app import Context, MessageType, RecordDict
from flwr.common.config import flatten_dict

from fedmoe_flwr.deployment_grid import DeploymentGrid, read_log
from fedmoe_flwr.models import load_wire, param_layout
from fedmoe_flwr.sim import LocalGrid

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CUSTOM, HF = EXAMPLES / "pytorch-fedmoe-custom", EXAMPLES / "hf-fedmoe"
PACKAGES = {CUSTOM: "fedmoe_custom", HF: "fedmoe_hf"}
NUM_NODES = 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def run_app(app_dir: Path, work: Path, monkeypatch):
    """Run the app over NUM_NODES in-process nodes; returns (modules, run config, message log, rows)."""
    package = PACKAGES[app_dir]
    pyproject = tomli.loads((app_dir / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["components"] == {
        "serverapp": f"{package}.server_app:app", "clientapp": f"{package}.client_app:app"}
    rc = flatten_dict(pyproject["tool"]["flwr"]["app"]["config"])
    sys.path.insert(0, str(app_dir))
    try:
        mods = {m: importlib.import_module(f"{package}.{m}") for m in ("task", "client_app", "server_app")}
    finally:
        sys.path.remove(str(app_dir))
    grid = LocalGrid(mods["client_app"].app, NUM_NODES, seed=0, run_config=rc)
    logged = DeploymentGrid(grid, log_path=work / "messages.jsonl", layout=param_layout(mods["task"].Net()))
    monkeypatch.chdir(work)
    torch.manual_seed(0)
    mods["server_app"].app(logged, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
    rows = [json.loads(line) for line in (work / "outputs" / "metrics.jsonl").read_text().splitlines()]
    return mods, rc, read_log(work / "messages.jsonl"), rows


def check_rounds(rc: dict, log: list[dict], rows: list[dict], layout) -> list[dict]:
    """Every round aggregated and evaluated; nodes got a part of the model; returns the TRAIN sends."""
    rounds = rc["num-server-rounds"]
    assert rounds == 3
    assert [r["round"] for r in rows] == list(range(rounds + 1))
    for r in rows[1:]:
        assert r["num_aggregated"] >= 1 and r["personal_failed"] == 0, r
        assert math.isfinite(r["train_loss"]) and r["train_loss"] > 0, r
    sends = [r for r in log if r["event"] == "send" and r["type"] == MessageType.TRAIN]
    assert {r["round"] for r in sends} == set(range(1, rounds + 1))
    assert all(r["experts"] and r["bytes"] == layout.shared_nbytes + r["expert_bytes"] for r in sends)
    assert any(len(r["experts"]) < len(layout.expert_keys) for r in sends), "small nodes got a part of the model"
    return sends


def test_a_users_own_moe_described_by_moe_spec_trains_in_3_rounds(tmp_path, monkeypatch):
    mods, rc, log, rows = run_app(CUSTOM, tmp_path, monkeypatch)
    task = mods["task"]
    layout = param_layout(task.Net())
    assert layout.expert_keys == [f"L0.E{e}" for e in range(4)], "the MoESpec line finds the 4 experts"
    assert set(layout.router_params) == {"router.weight", "router.bias"}
    sends = check_rounds(rc, log, rows, layout)
    assert {len(r["experts"]) for r in sends} >= {1, 4}, "nodes of 1 to 4 experts"
    model = task.Net()
    model.load_state_dict(torch.load(tmp_path / "final_model.pt"))
    _, accuracy = task.test(model, task.load_test_data())
    assert accuracy > 0.5, accuracy  # chance is 0.1


def test_a_hugging_face_mixtral_trains_in_3_rounds_with_compact_clients(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    mods, rc, log, rows = run_app(HF, tmp_path, monkeypatch)
    task = mods["task"]
    torch.manual_seed(0)
    initial = task.Net()
    layout = param_layout(initial)
    assert len(layout.expert_keys) == 8 and all(
        any("/E" in n for n in layout.expert_params[k]) for k in layout.expert_keys), "fused rows per expert"
    sends = check_rounds(rc, log, rows, layout)
    assert max(len(r["experts"]) for r in sends) <= 6, "capacity_fn caps nodes at 6 of 8 experts"
    # the final wire state loads into a fresh model and beats the initial one on the test text
    test_ids = task.load_test_data(rc["num-partitions"])
    before, _, _ = task.test(initial, test_ids)
    final = task.Net()
    load_wire(final, torch.load(tmp_path / "final_model.pt"))
    after, _, _ = task.test(final, test_ids)
    assert after < before - 0.5, (before, after)
    assert rows[-1]["accuracy"] > rows[0]["accuracy"], "central next-character accuracy improved"
