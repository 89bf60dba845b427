"""``model=hf`` in run.py: a Hugging Face MoE LM through the ServerApp and the ready ClientApp.

The server sends the wire state (fused experts split per expert) and evaluates after
``load_wire``; clients allocate only their assigned experts (compact clients). fedmoe's own
models keep their names: their wire state is their ``state_dict``.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from fedmoe_flwr.client import app as client_app  # noqa: E402
from fedmoe_flwr.config import Config, DatasetName, ModelName, StrategyName, TierConfig, flatten  # noqa: E402
from fedmoe_flwr.deploy.app_config import quickstart_config  # noqa: E402
from fedmoe_flwr.experiment import build, compact_factory, experiment_for, load_data  # noqa: E402
from fedmoe_flwr.models import build_compact, model_experts, to_wire  # noqa: E402
from fedmoe_flwr.models.adapters.compact import resident_nbytes  # noqa: E402
from fedmoe_flwr.models.hf_lm import HFCausalLM  # noqa: E402
from fedmoe_flwr.models.hf_tiny import hf_config, hf_model_class  # noqa: E402
from fedmoe_flwr.server_app import run_server  # noqa: E402
from fedmoe_flwr.sim import LocalGrid  # noqa: E402

NODES = 4


def hf_cfg(family: str = "mixtral", **model) -> Config:
    cfg = Config(seed=0, num_rounds=2, checkpoint_every=0, save_model=False, report=False, loggers=[])
    cfg.dataset.name, cfg.dataset.partitioner = DatasetName.shakespeare, "natural"
    cfg.dataset.num_clients, cfg.dataset.max_train_samples = NODES, 2000
    m = cfg.model
    m.name, m.family, m.num_experts, m.top_k, m.d_model, m.d_hidden, m.n_head, m.block_size = (
        ModelName.hf, family, 4, 2, 32, 64, 2, 80)
    for k, v in model.items():
        setattr(m, k, v)
    cfg.fleet.tiers = [TierConfig(name="small", fraction=0.5, max_experts=2), TierConfig(name="large", fraction=0.5)]
    cfg.strategy.fraction_train, cfg.strategy.min_train_nodes = 1.0, NODES
    cfg.train.lr, cfg.train.max_batches = 0.5, 5
    return cfg


def test_run_py_composes_model_hf():
    cfg = quickstart_config(["model=hf", "dataset=shakespeare", "model.family=olmoe", "train.lora_rank=4"])
    assert cfg.model.name == ModelName.hf and cfg.model.family == "olmoe" and cfg.train.lora_rank == 4


def test_a_tiny_mixtral_trains_on_shakespeare_roles_with_compact_clients(monkeypatch):
    cfg = hf_cfg()
    _, data, skeleton, layout = experiment_for(cfg)
    assert isinstance(skeleton, HFCausalLM) and skeleton.hf.config.vocab_size == data.num_classes == 81
    assert len(layout.expert_keys) == 8 and all("/E" in n for k in layout.expert_keys for n in layout.expert_params[k])
    built = []  # (experts held per layer, parameter bytes allocated) of each model a client built
    real = client_app.model_for_message

    def spy(msg, factory):
        model = real(msg, factory)
        built.append(([layer.held for layer in model_experts(model).layers], resident_nbytes(model)))
        return model

    monkeypatch.setattr(client_app, "model_for_message", spy)
    summary = run_server(LocalGrid(client_app.make_client_app(flatten(cfg)), NODES, seed=0), cfg, None)
    assert summary["rounds"] == 2 and summary["rejected_total"] == 0
    assert summary["final_loss"] < math.log(81) - 0.3, summary["final_loss"]  # below a uniform guess
    full = resident_nbytes(skeleton)
    small = [b for held, b in built if sum(len(h) for h in held) < 8]
    assert small and all(b < full for b in small), "nodes holding part of the experts allocate less"
    assert all(len(h) >= 1 for held, _ in built for h in held), "every layer keeps an expert"


def test_the_global_state_is_the_wire_state_and_fedmoe_models_keep_their_names():
    cfg = hf_cfg()
    _, data, skeleton, _ = experiment_for(cfg)
    wire = to_wire(build(cfg, data))
    assert any(n.endswith("experts.gate_up_proj/E3") for n in wire) and not any(n.endswith("gate_up_proj") for n in wire)
    own = Config()  # the quickstart's moe_mlp: wire state == state_dict, name for name, bit for bit
    _, own_data, _, _ = experiment_for(own)
    model = build(own, own_data)
    assert list(to_wire(model)) == list(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(to_wire(model).values(), model.state_dict().values()))


def test_a_local_save_pretrained_directory_loads_and_trains(tmp_path):
    torch.manual_seed(1)
    hf = hf_model_class("olmoe")(hf_config("olmoe", 4, 2, hidden=32, inter=64, vocab=96, heads=2))
    hf.save_pretrained(tmp_path / "ckpt")
    cfg = hf_cfg("olmoe", pretrained=str(tmp_path / "ckpt"))
    cfg.num_rounds = 1
    cfg.strategy.trust_samples = 0  # "nothing rejected" below: the trust check may refuse an honest update
    _, data, skeleton, layout = experiment_for(cfg)
    loaded = skeleton.hf.state_dict()
    assert all(torch.equal(loaded[n], t) for n, t in hf.state_dict().items()), "from_pretrained loaded the weights"
    assert skeleton.hf.config.vocab_size == 96 >= data.num_classes
    # compact clients build the checkpoint's architecture only: every tensor arrives in the message
    compact = build_compact(compact_factory(cfg, data), ["L0.E1", "L1.E2"], None)
    assert [layer.held for layer in model_experts(compact).layers] == [(1,), (2,)]
    summary = run_server(LocalGrid(client_app.make_client_app(flatten(cfg)), NODES, seed=0), cfg, None)
    assert summary["rounds"] == 1 and summary["rejected_total"] == 0


@pytest.mark.parametrize("change, message", [
    (dict(family="gpt2"), "model.family='gpt2'"),
    (dict(pretrained="/nonexistent/dir"), "no config.json"),
])
def test_bad_hf_settings_are_named(change, message):
    cfg = hf_cfg(**change)
    with pytest.raises(ValueError, match=message):
        build(cfg, load_data(cfg))


def test_the_dense_baseline_is_the_familys_dense_sibling_and_trains():
    cfg = hf_cfg()
    cfg.strategy.name, cfg.num_rounds = StrategyName.dense, 1
    cfg.strategy.min_train_nodes = 2
    _, data, model, layout = experiment_for(cfg)
    assert type(model.hf).__name__ == "MistralForCausalLM" and layout.expert_keys == []
    assert model.hf.config.intermediate_size == cfg.model.top_k * cfg.model.d_hidden, "the MoE's active width"
    summary = run_server(LocalGrid(client_app.make_client_app(flatten(cfg)), NODES, seed=0), cfg, None)
    assert summary["rounds"] == 1 and summary["final_loss"] < math.log(81), summary
