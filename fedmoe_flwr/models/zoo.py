"""The model zoo: small MoE models (and their dense twins) that train fast on CPU.

| name      | config        | input                          | output          |
|-----------|---------------|--------------------------------|-----------------|
| moe_mlp   | MoEMLPConfig  | [B, in_dim] (or [B, ...] that flattens to in_dim) | [B, classes] |
| moe_cnn   | MoECNNConfig  | [B, C, S, S], [B, S, S] or [B, C*S*S] | [B, classes] |
| moe_lm    | MoELMConfig   | [B, T] token ids               | [B, T, vocab]   |

``dense_<x>`` builds the same model with ``dense=True``: every MoE layer becomes one FFN
of width ``d_hidden * top_k`` (+ ``d_hidden`` for a shared expert), the same FFN weights
per token. Models return plain logits; MoE statistics live on each layer's ``last``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from fedmoe_flwr.models.lm import MoELM, MoELMConfig
from fedmoe_flwr.models.moe import make_ffn


@dataclass
class MoEMLPConfig:
    in_dim: int = 64
    num_classes: int = 10
    d_model: int = 128
    d_hidden: int = 128
    num_experts: int = 8
    top_k: int = 1
    shared_expert: bool = False
    num_moe_layers: int = 1
    dense: bool = False


@dataclass
class MoECNNConfig:
    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    channels: tuple[int, ...] = (16, 32)
    d_model: int = 128
    d_hidden: int = 128
    num_experts: int = 8
    top_k: int = 1
    shared_expert: bool = False
    dense: bool = False


class ResidualFFN(nn.Module):
    """``x + ffn(LayerNorm(x))``, the ffn being an MoE layer or its dense twin."""

    def __init__(self, d_model, d_hidden, num_experts, top_k, shared_expert, dense):
        super().__init__()
        self.ln = nn.LayerNorm(d_model)
        self.ffn = make_ffn(d_model, d_hidden, num_experts, top_k, shared_expert, dense)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(self.ln(x))


def _ffn_blocks(cfg, n: int) -> nn.ModuleList:
    return nn.ModuleList(
        ResidualFFN(
            cfg.d_model, cfg.d_hidden, cfg.num_experts, cfg.top_k, cfg.shared_expert, cfg.dense
        )
        for _ in range(n)
    )


class MoEMLP(nn.Module):
    """in_dim -> d_model (shared backbone) -> residual MoE blocks -> LayerNorm -> classes."""

    def __init__(self, cfg: MoEMLPConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Sequential(nn.Linear(cfg.in_dim, cfg.d_model), nn.GELU())
        self.blocks = _ffn_blocks(cfg, cfg.num_moe_layers)
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)  # [B, in_dim]
        h = self.embed(x)  # [B, d]
        for block in self.blocks:
            h = block(h)  # [B, d]
        return self.head(self.ln_f(h))  # [B, classes]


class MoECNN(nn.Module):
    """(conv3x3 -> ReLU -> maxpool2) per ``channels`` entry -> d_model -> MoE block -> classes."""

    def __init__(self, cfg: MoECNNConfig):
        super().__init__()
        self.config = cfg
        layers, c_in, size = [], cfg.in_channels, cfg.image_size
        for c_out in cfg.channels:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c_in, size = c_out, size // 2
        self.features = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Linear(c_in * size * size, cfg.d_model), nn.GELU())
        self.blocks = _ffn_blocks(cfg, 1)
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C, S = self.config.in_channels, self.config.image_size
        x = x.reshape(x.shape[0], C, S, S)  # [B, C, S, S]; also from [B, S, S] or [B, C*S*S]
        h = self.features(x).flatten(1)  # [B, c_last * s * s]
        h = self.embed(h)  # [B, d]
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))  # [B, classes]


MODEL_CONFIGS = {"moe_mlp": MoEMLPConfig, "moe_cnn": MoECNNConfig, "moe_lm": MoELMConfig}
_MODELS = {"moe_mlp": MoEMLP, "moe_cnn": MoECNN, "moe_lm": MoELM}
_DENSE = {"dense_mlp": "moe_mlp", "dense_cnn": "moe_cnn", "dense_lm": "moe_lm"}
MODEL_NAMES = tuple(MODEL_CONFIGS) + tuple(_DENSE)


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a zoo model by name; ``kwargs`` are fields of its config dataclass.

    ``dense_mlp`` / ``dense_cnn`` / ``dense_lm`` are the ``dense=True`` twins. Raises
    ValueError on an unknown name or config field. Seed torch before calling for a
    reproducible initialisation.
    """
    base = _DENSE.get(name, name)
    if base not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; allowed: {list(MODEL_NAMES)}")
    cfg_cls = MODEL_CONFIGS[base]
    fields = [f.name for f in dataclasses.fields(cfg_cls)]
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for model {name!r}; allowed: {fields}")
    if name in _DENSE:
        if kwargs.get("dense", True) is False:
            raise ValueError(f"model {name!r} is dense; it cannot take dense=False")
        kwargs["dense"] = True
    if "channels" in kwargs:  # Hydra/TOML give lists
        kwargs["channels"] = tuple(kwargs["channels"])
    model = _MODELS[base](cfg_cls(**kwargs))
    if model.config.dense:
        model.fedmoe_dense = True  # dense on purpose: an empty expert layout is no mistake
    return model
