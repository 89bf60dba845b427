"""The README's drop-in recipe, run as a user would: a stock Flower app switched to fedmoe_flwr.

The two app files come verbatim from the README section "Use the strategy in your own
Flower project"; ``task.py`` is the user's own code (written here): a small MoE classifier
on sklearn's digits, a ``train`` returning a float loss and a ``test`` returning
``(loss, accuracy)``, as Flower's PyTorch template has them. The app runs 5 rounds over the
in-process grid and (slow) in a loopback deployment, without a deadline. The failures the
recipe must survive or report each have a test below.
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

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from fedmoe_flwr import protocol as P
from fedmoe_flwr.client import expert_evaluate, expert_probe, expert_train, node_profile
from fedmoe_flwr.models import MoELayer, param_layout, to_array_record
from fedmoe_flwr.recording import record_run
from fedmoe_flwr.sim import LocalGrid
from fedmoe_flwr.strategies import AlignedStrategy

ROOT = Path(__file__).resolve().parents[1]
NUM_NODES, ROUNDS, NUM_EXPERTS = 6, 5, 4
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


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


# ------------------------------------------------------------------------ the reply contract
class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.moe = MoELayer(16, 8, num_experts=4)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.out(h + self.moe(h))


@pytest.fixture
def runtime_identity():
    """Messages take their run id from the process's task identity (Flower's runtime sets it)."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _message(kind: str, keys: list[str]) -> Message:
    torch.manual_seed(0)
    model = TinyNet()
    layout = param_layout(model)
    state = {n: t for n, t in model.state_dict().items() if n in set(layout.param_names(keys))}
    content = RecordDict({P.ARRAYS: to_array_record(state), P.CONFIG: ConfigRecord({"experts": keys, "server-round": 1})})
    msg = Message(content, dst_node_id=5, message_type=kind)
    msg.metadata.__dict__["_message_id"] = "m1"
    return msg


def _xy(n: int):
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _sgd(model, x, y, epochs: int = 2, batch: int = 10) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(epochs):
        for i in range(0, len(x), batch):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[i:i + batch]), y[i:i + batch])
            loss.backward()
            opt.step()
    return float(loss.detach())


def test_a_float_returning_train_function_reports_the_samples_it_trained_and_its_loss(runtime_identity):
    x, y = _xy(30)
    seen = []
    reply = expert_train(_message(MessageType.TRAIN, ["L0.E1"]), TinyNet(), lambda m: seen.append(_sgd(m, x, y)) or seen[-1])
    report = P.decode_report(reply.content, NUM_EXPERTS)
    assert report.num_examples == 2 * 30, "samples seen over both epochs, not int(loss)"
    assert report.train_loss == pytest.approx(seen[0]) and report.train_loss != -1.0
    assert set(reply.content[P.REPORT]) <= P.REPORT_KEYS, "no metrics of the user's, no placeholders"


@pytest.mark.parametrize("returned, n, loss", [((0.5, 7), 7, 0.5), (12, 12, None), ({"num-examples": 9, "train-loss": 0.25}, 9, 0.25)])
def test_the_other_train_returns_give_their_own_number_of_examples(runtime_identity, returned, n, loss):
    x, y = _xy(20)

    def fit(m):
        _sgd(m, x, y, epochs=1)
        return returned

    report = P.decode_report(expert_train(_message(MessageType.TRAIN, ["L0.E0"]), TinyNet(), fit).content, NUM_EXPERTS)
    assert report.num_examples == n
    assert (math.isnan(report.train_loss) if loss is None else report.train_loss == pytest.approx(loss))


@pytest.mark.parametrize("bad", [None, "0.3", [0.3, 2], True, (0.3, 2, 1)])
def test_an_unknown_train_return_is_a_type_error(runtime_identity, bad):
    with pytest.raises(TypeError, match="train_fn returned"):
        expert_train(_message(MessageType.TRAIN, ["L0.E0"]), TinyNet(), lambda m: bad)


def test_a_stock_test_function_returning_loss_and_accuracy_evaluates_unchanged(runtime_identity):
    x, y = _xy(25)

    def stock_test(model):  # Flower's template: (loss, accuracy)
        out = model(x)
        return float(nn.functional.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())

    msg = _message(MessageType.EVALUATE, ["L0.E0", "L0.E2"])
    metrics = expert_evaluate(msg, TinyNet(), stock_test).content[P.METRICS]
    assert metrics[P.NUM_EXAMPLES] == 25, "counted from the samples the model saw, not int(accuracy)"
    assert 0 <= metrics["accuracy"] <= 1 and metrics["loss"] > 0
    assert expert_evaluate(msg, TinyNet(), lambda m: (0.4, 11)).content[P.METRICS][P.NUM_EXAMPLES] == 11
    with_extra = expert_evaluate(msg, TinyNet(), lambda m: (0.4, 11, {"f1": 0.7})).content[P.METRICS]
    assert with_extra["f1"] == pytest.approx(0.7) and with_extra[P.NUM_EXAMPLES] == 11
    with pytest.raises(TypeError, match="eval_fn returned"):
        expert_evaluate(msg, TinyNet(), lambda m: "good")
    with pytest.raises(ValueError, match="no samples"):
        expert_evaluate(msg, TinyNet(), lambda m: 0.4)  # nothing ran through the model, nothing declared


def test_the_evaluated_model_holds_only_the_assigned_experts(runtime_identity):
    from fedmoe_flwr.models import active_expert_keys

    held = []
    expert_evaluate(_message(MessageType.EVALUATE, ["L0.E3"]), TinyNet(), lambda m: held.append(active_expert_keys(m)) or 0.1,
                    num_examples=4)
    assert held == [["L0.E3"]]


def test_capacity_fn_fills_in_what_a_node_does_not_declare():
    model = TinyNet()
    layout = param_layout(model)
    e = layout.expert_nbytes("L0.E0")
    ctx = lambda nc: Context(run_id=1, node_id=9, node_config=nc, state=RecordDict(), run_config={})
    fleet = lambda c: {"max-experts": 1 + c.node_config["partition-id"] % 4}
    assert node_profile(ctx({"partition-id": 2}), model, capacity_fn=fleet).expert_memory_bytes == 3 * e
    assert node_profile(ctx({"partition-id": 2}), model, capacity_fn=lambda c: 2).expert_memory_bytes == 2 * e
    own = {"partition-id": 2, "memory-mb": (layout.shared_nbytes + e) / 2**20}
    assert node_profile(ctx(own), model, capacity_fn=fleet).expert_memory_bytes == e, "the node's memory-mb wins whole"
    assert node_profile(ctx({"partition-id": 2, "max-experts": 4}), model, capacity_fn=fleet).expert_memory_bytes == 4 * e
    assert node_profile(ctx({"partition-id": 2, "num-examples": 40}), model).num_examples == 40
    with pytest.raises(TypeError, match="capacity_fn returned"):
        node_profile(ctx({"partition-id": 2}), model, capacity_fn=lambda c: "2")


# ------------------------------------------------------------------------ metrics and failures
def _tiny_client_app(fit_result=None, fail: bool = False) -> ClientApp:
    """A user's ClientApp on TinyNet; ``fit_result(loss)`` shapes the train return."""
    app = ClientApp()

    def data(context):
        return _xy(20 + int(context.node_config["partition-id"]))

    @app.train()
    def train(msg, context):
        if fail:
            raise RuntimeError("the user's training crashed")
        x, y = data(context)
        return expert_train(msg, TinyNet(), lambda m: fit_result(_sgd(m, x, y, epochs=1), len(x)))

    @app.query()
    def query(msg, context):
        model = TinyNet()
        return expert_probe(msg, model, profile=node_profile(context, model, capacity_fn=lambda c: 2), stats_inputs=data(context)[0].numpy())

    return app


def _start(app: ClientApp, out: Path, rounds: int = 2):
    torch.manual_seed(0)
    model = TinyNet()
    strategy = record_run(AlignedStrategy(param_layout(model), fraction_train=1.0, fraction_evaluate=0.0), out)
    result = strategy.start(grid=LocalGrid(app, 4, seed=0), initial_arrays=to_array_record(model.state_dict()),
                            num_rounds=rounds, train_config=ConfigRecord({"lr": 0.1}))
    return strategy, result


def test_user_metrics_reach_the_aggregated_train_metrics_and_server_figures_stay_apart(tmp_path):
    app = _tiny_client_app(lambda loss, n: {"train-loss": loss, "grad-steps": 2.0, "num-examples": n})
    strategy, result = _start(app, tmp_path)
    for rnd in (1, 2):
        client = dict(result.train_metrics_clientapp[rnd])
        assert client["grad-steps"] == pytest.approx(2.0) and client["train_loss"] > 0
        assert not {"bytes_total", "solve_time_s", "num_aggregated"} & set(client), "server-side figures kept apart"
    assert strategy.last.metrics["num_aggregated"] == 4
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [r["grad-steps"] for r in rows[1:]] == [2.0, 2.0] and all(r["bytes_total"] > 0 for r in rows[1:])


def test_a_user_app_whose_every_client_fails_raises_after_recording(tmp_path):
    with pytest.raises(RuntimeError, match="no round aggregated any update"):
        _start(_tiny_client_app(fail=True), tmp_path)
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [r["num_aggregated"] for r in rows[1:]] == [0, 0]
    assert (tmp_path / "summary.json").exists()


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
