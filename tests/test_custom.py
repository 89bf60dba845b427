"""Your own data and model in ``run.py``: ``dataset=custom dataset.loader=...`` and
``model=custom model.factory=...``, defined in a module outside the package (written here
into a temporary directory put on ``sys.path`` / ``PYTHONPATH``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmoe_flwr.config import Config, DatasetName, ModelName
from fedmoe_flwr.data.custom import load_custom
from fedmoe_flwr.experiment import build, experiment_for
from fedmoe_flwr.models import param_layout

ROOT = Path(__file__).resolve().parents[1]

DATA = '''"""The user's data: sklearn digits, as arrays, with ids, or as a datasets.Dataset."""
import numpy as np
from sklearn.datasets import load_digits


def load():
    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y


def load_with_writers(seed=0):
    x, y = load()
    writers = np.random.default_rng(seed).choice(["ann", "bo", "cy", "di", "ed"], size=len(y))
    return x, y, writers


def load_hf():
    from datasets import Dataset

    x, y = load()
    return Dataset.from_dict({"pixels": x[:600].tolist(), "digit": y[:600].tolist(), "writer": (np.arange(600) % 4).tolist()})


def load_bad_shape():
    x, y = load()
    return x, y[:-1]


def load_text():
    return "not data"

NOT_CALLABLE = 3
'''

MODELS = '''"""The user's model: an MoE classifier of its own."""
import torch
from torch import nn

from fedmoe_flwr.models import MoELayer


class Net(nn.Module):
    def __init__(self, in_dim, num_classes, num_experts=4, dense=False):
        super().__init__()
        self.embed = nn.Linear(in_dim, 32)
        self.ffn = nn.Linear(32, 32) if dense else MoELayer(32, 32, num_experts=num_experts)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        h = torch.relu(self.embed(x.reshape(len(x), -1)))
        return self.head(h + self.ffn(h))


def build(in_dim, num_classes, num_experts):
    return Net(in_dim, num_classes, num_experts)


def plain(in_dim, num_classes):
    return nn.Linear(in_dim, num_classes)


def needs_vocab(vocab):
    return None
'''


@pytest.fixture(scope="module")
def user_pkg(tmp_path_factory):
    """``my_pkg`` with ``data.py`` and ``models.py``, importable for this module's tests."""
    root = tmp_path_factory.mktemp("user")
    (root / "my_pkg").mkdir()
    (root / "my_pkg" / "__init__.py").write_text("")
    (root / "my_pkg" / "data.py").write_text(DATA)
    (root / "my_pkg" / "models.py").write_text(MODELS)
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))
    for name in [m for m in sys.modules if m == "my_pkg" or m.startswith("my_pkg.")]:
        del sys.modules[name]


def custom_config(loader: str = "my_pkg.data:load", factory: str = "my_pkg.models:build", **dataset) -> Config:
    cfg = Config()
    cfg.dataset.name, cfg.dataset.loader, cfg.dataset.num_clients = DatasetName.custom, loader, 5
    cfg.model.name, cfg.model.factory, cfg.model.num_experts = ModelName.custom, factory, 4
    for k, v in dataset.items():
        setattr(cfg.dataset, k, v)
    return cfg


def test_a_custom_loader_and_factory_give_a_split_dataset_and_an_moe_model(user_pkg):
    cfg, data, model, layout = experiment_for(custom_config())
    assert data.num_clients == 5 and data.num_classes == 10 and data.input_shape == (64,)
    x_test, y_test = data.test
    assert abs(len(y_test) - 0.2 * 1797) < 10 and x_test.dtype == np.float32
    seen = np.concatenate([np.concatenate([data.train_indices[i], data.holdout_indices[i]]) for i in range(5)])
    assert len(set(seen.tolist()) & set(data.test_indices.tolist())) == 0, "test samples never go to clients"
    assert len(seen) + len(y_test) == 1797
    assert layout.expert_keys == ["L0.E0", "L0.E1", "L0.E2", "L0.E3"]
    assert model(torch.from_numpy(x_test[:3])).shape == (3, 10)


def test_natural_ids_from_arrays_and_columns_of_a_hugging_face_dataset(user_pkg):
    writers = load_custom("my_pkg.data:load_with_writers", 5, "natural", seed=0)
    assert sorted(writers.client_names) == ["ann", "bo", "cy", "di", "ed"]
    hf = load_custom("my_pkg.data:load_hf", 4, "natural", feature_column="pixels", label_column="digit", id_column="writer")
    assert hf.num_clients == 4 and hf.input_shape == (64,) and hf.num_classes == 10
    x, y = hf.client_train(0)
    assert x.dtype == np.float32 and len(x) == len(y) > 50
    iid = load_custom("my_pkg.data:load_hf", 3, "iid", label_column="digit", id_column="writer")  # pixels: the one left
    assert sum(len(t) + len(h) for t, h in zip(iid.train_indices, iid.holdout_indices)) + len(iid.test_indices) == 600


@pytest.mark.parametrize("loader, kwargs, message", [
    ("my_pkg.nowhere:load", {}, "cannot import module 'my_pkg.nowhere'"),
    ("my_pkg.data:lod", {}, "has no attribute 'lod'"),
    ("my_pkg", {}, "is not an import string"),
    ("my_pkg.data", {}, "names a module, not a function"),
    ("my_pkg.data:NOT_CALLABLE", {}, "not a function"),
    ("my_pkg.data:load_bad_shape", {}, r"returned shapes \[\(1797, 64\), \(1796,\)\]"),
    ("my_pkg.data:load_text", {}, "returned str; expected"),
    ("my_pkg.data:load", {"partitioner": "natural"}, "needs client ids"),
    ("my_pkg.data:load_hf", {"label_column": "digit"}, "set dataset.feature_column"),
    ("my_pkg.data:load_hf", {}, "no column 'label'"),
])
def test_a_loader_that_cannot_be_imported_or_returns_the_wrong_thing_is_named(user_pkg, loader, kwargs, message):
    partitioner = kwargs.pop("partitioner", "iid")
    with pytest.raises(ValueError, match=message) as info:
        load_custom(loader, 3, partitioner, **kwargs)
    assert "dataset.loader" in str(info.value)


@pytest.mark.parametrize("factory, message", [
    ("my_pkg.models:plain", "without experts"),
    ("my_pkg.models:needs_vocab", r"requires \['vocab'\]"),
    ("my_pkg.models:missing", "has no attribute"),
])
def test_a_factory_that_gives_no_moe_model_is_named(user_pkg, factory, message):
    cfg = custom_config(factory=factory)
    data = load_custom("my_pkg.data:load", 5, "dirichlet")
    with pytest.raises((ValueError, TypeError), match=message) as info:
        build(cfg, data)
    assert "model.factory" in str(info.value)


def test_the_dense_baseline_needs_a_factory_that_takes_dense(user_pkg):
    data = load_custom("my_pkg.data:load", 5, "dirichlet")
    with pytest.raises(ValueError, match="dense=True"):
        build(custom_config(), data, dense=True)
    dense = build(custom_config(factory="my_pkg.models:Net"), data, dense=True)
    assert not param_layout(dense).expert_keys


@pytest.mark.slow
def test_a_two_strategy_sweep_runs_on_a_users_loader_and_model(user_pkg, tmp_path):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(user_pkg), str(ROOT)])}
    argv = [sys.executable, str(ROOT / "run.py"), "-m", "strategy=aligned,random", "dataset=custom",
            "dataset.loader=my_pkg.data:load", "model=custom", "model.factory=my_pkg.models:build", "model.num_experts=4",
            "dataset.num_clients=6", "num_rounds=2", "backend=local", "report=false", "quiet=true", "checkpoint_every=0",
            f"hydra.sweep.dir={sweep}"]
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = {json.loads(p.read_text())["strategy"]: json.loads(p.read_text()) for p in sweep.rglob("summary.json")}
    assert set(summaries) == {"aligned", "random"}
    for s in summaries.values():
        assert s["rounds"] == 2 and 0.1 < s["final_accuracy"] <= 1
    configs = [p.read_text() for p in sweep.rglob(".hydra/config.yaml")]
    assert len(configs) == 2 and all("loader: my_pkg.data:load" in c and "factory: my_pkg.models:build" in c for c in configs)
