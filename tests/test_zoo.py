"""Model zoo: shapes, dense twins' active parameters, build_model errors."""

import pytest
import torch

from fedmoe_flwr.models import (
    MODEL_CONFIGS,
    MODEL_NAMES,
    MoECNNConfig,
    MoELM,
    MoELMConfig,
    MoEMLPConfig,
    active_param_count,
    aux_loss,
    build_model,
    expert_keys,
    moe_layers,
    set_active_experts,
)

INPUTS = {
    "mlp": lambda: torch.randn(6, 64),
    "cnn": lambda: torch.randn(6, 1, 28, 28),
    "lm": lambda: torch.randint(0, 80, (3, 16)),
}
OUT = {"mlp": (6, 10), "cnn": (6, 10), "lm": (3, 16, 80)}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_backward_shapes(name):
    torch.manual_seed(0)
    kind = name.split("_")[1]
    model = build_model(name)
    y = model(INPUTS[kind]())
    assert y.shape == OUT[kind] and torch.isfinite(y).all()
    (y.float().square().mean() + aux_loss(model)).backward()
    n_moe = len(moe_layers(model))
    if name.startswith("dense"):
        assert n_moe == 0
    else:
        assert n_moe == (2 if kind == "lm" else 1)
        assert all(m.last.num_tokens == (48 if kind == "lm" else 6) for m in moe_layers(model))


def test_alternative_input_shapes():
    torch.manual_seed(0)
    cnn = build_model("moe_cnn")
    x = torch.randn(4, 1, 28, 28)
    y = cnn(x)
    assert torch.allclose(cnn(x.reshape(4, 28, 28)), y) and torch.allclose(cnn(x.reshape(4, 784)), y)
    rgb = build_model("moe_cnn", in_channels=3, image_size=32, channels=[8, 8, 16], num_classes=5)
    assert rgb(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    mlp = build_model("moe_mlp", in_dim=784, num_moe_layers=2, num_experts=4, top_k=2)
    assert mlp(x).shape == (4, 10) and len(moe_layers(mlp)) == 2
    assert expert_keys(mlp)[-1] == "L1.E3"


def _extra_params(cfg, n_layers):
    """What an MoE model uses per token beyond its dense twin: the router (E*d + E) and the
    fc2 biases of the k experts (+ shared) that a single dense FFN has only once."""
    d, E, k = cfg.d_model, cfg.num_experts, cfg.top_k
    return n_layers * (E * d + E + (k - 1 + int(cfg.shared_expert)) * d)


def _ffn_matrix_params(model):
    """Per-token FFN weight-matrix parameters (experts visited + shared expert / dense FFN)."""
    total = 0
    for name, p in model.named_parameters():
        if p.dim() < 2 or "ffn" not in name or ".router." in name:
            continue
        if ".experts." in name:
            layer_of = [m for m in moe_layers(model) if any(p is q for q in m.parameters())][0]
            total += p.numel() * layer_of.top_k / layer_of.num_experts
        else:
            total += p.numel()
    return int(total)


@pytest.mark.parametrize("base", ["mlp", "cnn", "lm"])
@pytest.mark.parametrize("k,shared", [(1, False), (2, False), (1, True), (2, True)])
def test_dense_twin_matches_active_parameters(base, k, shared):
    kw = dict(num_experts=4, top_k=k, shared_expert=shared, d_model=32, d_hidden=24)
    moe, dense = build_model(f"moe_{base}", **kw), build_model(f"dense_{base}", **kw)
    n_layers = len(moe_layers(moe))
    assert _ffn_matrix_params(moe) == _ffn_matrix_params(dense)
    assert active_param_count(dense) == sum(p.numel() for p in dense.parameters())
    assert active_param_count(moe) - active_param_count(dense) == _extra_params(moe.config, n_layers)


def test_active_param_count_follows_the_mask():
    model = build_model("moe_mlp", num_experts=4, top_k=2)
    full = active_param_count(model)
    set_active_experts(model, ["L0.E2"])  # one held expert: k drops to 1
    per_expert = sum(p.numel() for p in moe_layers(model)[0].experts[0].parameters())
    assert active_param_count(model) == full - per_expert


def test_build_model_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet'.*moe_mlp"):
        build_model("resnet")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['width'\].*d_model"):
        build_model("moe_mlp", width=3)
    with pytest.raises(ValueError, match="dense"):
        build_model("dense_lm", dense=False)
    assert set(MODEL_CONFIGS) == {"moe_mlp", "moe_cnn", "moe_lm"}
    assert MODEL_CONFIGS["moe_cnn"] is MoECNNConfig and MODEL_CONFIGS["moe_mlp"] is MoEMLPConfig
    m = build_model("dense_cnn", channels=[8, 16])
    assert m.config.dense and m.config.channels == (8, 16)


def test_lm_is_causal_and_checks_length():
    torch.manual_seed(0)
    lm = MoELM(MoELMConfig(block_size=16))
    idx = torch.randint(0, 80, (2, 16))
    y = lm(idx)
    idx2 = idx.clone()
    idx2[:, 10] = (idx2[:, 10] + 1) % 80
    y2 = lm(idx2)
    assert torch.allclose(y[:, :10], y2[:, :10], atol=1e-6) and not torch.allclose(y[:, 10:], y2[:, 10:])
    with pytest.raises(ValueError, match="block_size"):
        lm(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        MoELM(MoELMConfig(d_model=30, n_head=4))


def test_seeded_build_is_reproducible():
    torch.manual_seed(7)
    a = build_model("moe_lm").state_dict()
    torch.manual_seed(7)
    b = build_model("moe_lm").state_dict()
    assert list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a)
