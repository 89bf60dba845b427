"""The README's drop-in recipe, run as a user would: a stock Flower app switched to fedmoe_flwr.

The two app files come verbatim from the README section "Use the strategy in your own
Flower project"; ``task.py`` is the user's own code (written here): a small MoE classifier
on sklearn's digits, a ``train`` returning a float loss and a ``test`` returning
``(loss, accuracy)``, as Flower's PyTorch template has them. The app runs 5 rounds over the
in-process grid and (slow) in a loopback deployment, without a deadline. Below: a
``strategies.py`` of the user's does not shadow the import, ``run.py`` fails loudly when every
client fails, the report reads the recorded run; the reply contract itself is in
tests/test_reply_contract.py.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from flwr.app import Context, RecordDict

from fedmoe_flwr.sim import LocalGrid

ROOT = Path(__file__).resolve().parents[1]
NUM_NODES, ROUNDS, NUM_EXPERTS = 6, 5, 4  # the experts of TASK's Net
DECLARED = {0: {"max-experts": 3}}  # node 0 declares its own budget; the others get the recipe's capacity_fn
CAPACITY = {pid: DECLARED.get(pid, {}).get("max-experts", 1 + pid % 4) for pid in range(NUM_NODES)}
RUN_CONFIG = {"num-server-rounds": ROUNDS, "fraction-train": 0.5, "local-epochs": 1, "lr": 0.3, "output-dir": ""}
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0"}

TASK = '''"""The user's own model, data and training code (nothing here knows about federated experts)."""

import json
import os

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedmoe_flwr.models import MoELayer, active_expert_keys, aux_loss


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(64, 32)
        self.moe = MoELayer(d_model=32, d_hidden=32, num_experts=4)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.embed(x))
        return self.head(h + self.moe(h))


def _digits():
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    return (x[order] / 16.0).astype(np.float32), y[order].astype(np.int64)


def load_data(partition_id, num_partitions):
    x, y = _digits()
    parts = np.array_split(np.arange(len(y) // 5, len(y)), num_partitions)[partition_id]
    cut = int(0.8 * len(parts))
    train = TensorDataset(torch.from_numpy(x[parts[:cut]]), torch.from_numpy(y[parts[:cut]]))
    val = TensorDataset(torch.from_numpy(x[parts[cut:]]), torch.from_numpy(y[parts[cut:]]))
    trainloader = DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(partition_id))
    valloader = DataLoader(val, batch_size=64)
    trainloader.partition_id = valloader.partition_id = partition_id
    return trainloader, valloader


def load_test_data():
    x, y = _digits()
    n = len(y) // 5
    return DataLoader(TensorDataset(torch.from_numpy(x[:n]), torch.from_numpy(y[:n])), batch_size=256)


def _note(kind, model, loader):
    """The test's instrument (not part of a user's code): which experts the model held."""
    if os.environ.get("DROPIN_LOG") and hasattr(loader, "partition_id"):
        with open(os.environ["DROPIN_LOG"], "a") as f:
            f.write(json.dumps({"kind": kind, "partition": loader.partition_id, "experts": active_expert_keys(model)}) + "\\n")


def train(model, trainloader, epochs, lr):
    _note("train", model, trainloader)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    total, batches = 0.0, 0
    for _ in range(epochs):
        for x, y in trainloader:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y) + aux_loss(model, balance_weight=0.1)
            loss.backward()
            opt.step()
            total, batches = total + loss.item(), batches + 1
    return total / max(batches, 1)


@torch.no_grad()
def test(model, loader):
    _note("evaluate", model, loader)
    model.eval()
    loss, correct, n = 0.0, 0, 0
    for x, y in loader:
        out = model(x)
        loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        n += len(y)
    return loss / n, correct / n
'''

PYPROJECT = '''[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "my-app"
version = "1.0.0"
dependencies = ["flwr[simulation]>=1.41,<1.43", "torch>=2.4", "scikit-learn>=1.3", "fedmoe-flwr"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "me"

[tool.flwr.app.components]
serverapp = "my_app.server_app:app"
clientapp = "my_app.client_app:app"

[tool.flwr.app.config]
num-server-rounds = 5
fraction-train = 0.5
local-epochs = 1
lr = 0.3
output-dir = ""
'''


def readme_recipe() -> dict[str, str]:
    """The README section's python blocks, by the file each names in its first line."""
    text = (ROOT / "README.md").read_text()
    start = text.index("### Use the strategy in your own Flower project")
    section = text[start:text.index("\n## ", start)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    files = {b.splitlines()[0].removeprefix("# ").strip(): b for b in blocks if b.startswith("# my_app/")}
    assert set(files) == {"my_app/client_app.py", "my_app/server_app.py"}, sorted(files)
    return files


def make_app(root: Path) -> Path:
    """A Flower app directory: the user's task.py and the README's two app files."""
    (root / "my_app").mkdir(parents=True)
    (root / "my_app" / "__init__.py").write_text('"""my_app: a Flower app."""\n')
    (root / "my_app" / "task.py").write_text(TASK)
    for rel, code in readme_recipe().items():
        (root / rel).write_text(code)
    (root / "pyproject.toml").write_text(PYPROJECT)
    return root


def import_app(app_dir: Path) -> dict:
    sys.path.insert(0, str(app_dir))
    try:
        for name in [m for m in sys.modules if m == "my_app" or m.startswith("my_app.")]:
            del sys.modules[name]
        return {m: importlib.import_module(f"my_app.{m}") for m in ("task", "client_app", "server_app")}
    finally:
        sys.path.remove(str(app_dir))


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_recipe_run(out: Path, notes: Path) -> list[dict]:
    """What the acceptance asks of a drop-in run: every round aggregates, evaluation works,
    no node holds more experts than it declared, the run is recorded."""
    rows = read_rows(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    for r in rows[1:]:
        assert r["num_aggregated"] >= 1, f"round {r['round']} aggregated nothing: {r}"
        assert r["personal_clients"] == NUM_NODES and r["personal_failed"] == 0, "every evaluate reply succeeded"
        assert 0 < r["personal_accuracy"] <= 1
        assert math.isfinite(r["train_loss"]) and r["train_loss"] > 0, "the float the user's train() returned"
    assert rows[-1]["accuracy"] > 0.3, rows[-1]  # chance is 0.1
    assert json.loads((out / "summary.json").read_text())["rounds"] == ROUNDS
    held = [json.loads(line) for line in notes.read_text().splitlines()]
    assert sum(h["kind"] == "evaluate" for h in held) == NUM_NODES * ROUNDS
    assert sum(h["kind"] == "train" for h in held) >= ROUNDS
    for h in held:
        assert 1 <= len(h["experts"]) <= CAPACITY[h["partition"]], h
    assert max(len(h["experts"]) for h in held if h["partition"] == 0) > 1, "node 0's own max-experts beat capacity_fn"
    assert any(len(h["experts"]) < NUM_EXPERTS for h in held if h["kind"] == "train"), "small nodes trained a part"
    return rows


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    """The README recipe, 5 rounds over 6 in-process nodes (LocalGrid)."""
    work = tmp_path_factory.mktemp("dropin")
    app_dir = make_app(work / "app")
    notes, out = work / "notes.jsonl", work / "out"
    before = os.environ.get("DROPIN_LOG")
    os.environ["DROPIN_LOG"] = str(notes)
    try:
        mods = import_app(app_dir)
        rc = {**RUN_CONFIG, "output-dir": str(out)}
        grid = LocalGrid(mods["client_app"].app, NUM_NODES, seed=0, run_config=rc)
        for node_id in grid.get_node_ids():  # what `flower-supernode --node-config` would declare
            nc = grid.node_context(node_id).node_config
            nc.update(DECLARED.get(nc["partition-id"], {}))
        torch.manual_seed(0)
        mods["server_app"].app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
    finally:
        if before is None:
            os.environ.pop("DROPIN_LOG", None)
        else:
            os.environ["DROPIN_LOG"] = before
    return SimpleNamespace(out=out, notes=notes, app_dir=app_dir)


def test_the_readme_recipe_runs_in_process_with_every_round_aggregated(in_process):
    check_recipe_run(in_process.out, in_process.notes)


@pytest.mark.slow
def test_the_readme_recipe_runs_in_a_loopback_deployment(tmp_path):
    from fedmoe_flwr.deploy.launcher import LoopbackFederation

    app_dir = make_app(tmp_path / "app")
    notes, out = tmp_path / "notes.jsonl", tmp_path / "out"
    nodes = [{"partition-id": i, "num-partitions": NUM_NODES, **DECLARED.get(i, {})} for i in range(NUM_NODES)]
    fed = LoopbackFederation(tmp_path / "fed", nodes)
    # the SuperNodes' app processes import this checkout's fedmoe_flwr and write the test's notes
    fed.env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), fed.env.get("PYTHONPATH")])), DROPIN_LOG=str(notes))
    with fed:
        result = fed.run(app_dir, {**RUN_CONFIG, "output-dir": str(out)}, timeout=540, done_file=out / "summary.json")
    assert result.status == "finished:completed", result.output[-3000:]
    check_recipe_run(out, notes)


def _python(args: list[str], cwd: Path, extra_path: list[Path] = (), timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, **FLOWER_ENV, "PYTHONPATH": os.pathsep.join(str(p) for p in [*extra_path, ROOT])}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_users_own_strategies_py_does_not_shadow_the_namespaced_import(tmp_path):
    (tmp_path / "strategies.py").write_text("MINE = True\n")
    (tmp_path / "client.py").write_text("MINE = True\n")
    code = ("import strategies, client; assert strategies.MINE and client.MINE\n"
            "from fedmoe_flwr.strategies import AlignedStrategy\n"
            "from fedmoe_flwr.client import expert_train\n"
            "print(AlignedStrategy.name)\n")
    done = _python(["-c", code], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "aligned"


@pytest.mark.slow
def test_run_py_exits_non_zero_when_every_client_fails(tmp_path):
    done = _python([str(ROOT / "run.py"), "backend=local", "num_rounds=2", "dataset.num_clients=4", "fleet=uniform",
                    "fleet.tiers.0.reliability=0.0", "report=false", "quiet=true", f"hydra.run.dir={tmp_path / 'run'}"],
                   cwd=tmp_path)
    assert done.returncode != 0, done.stdout[-2000:]
    assert "no round aggregated any update" in done.stderr + done.stdout


@pytest.mark.slow
def test_the_report_reads_a_user_apps_recorded_run(in_process, tmp_path):
    done = _python(["-m", "fedmoe_flwr.report", str(in_process.out), "-o", str(tmp_path / "report")], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    html = (tmp_path / "report" / "report.html").read_text()
    assert "aligned" in html and "<img" in html
