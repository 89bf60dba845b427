"""Build an experiment's data and model from a :class:`~fedmoe_flwr.config.Config`.

Used by both sides (the ClientApp and the ServerApp's evaluation), so they build the same
model with the same parameter names. Cached per process: Flower rebuilds apps often.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from fedmoe_flwr.config import Config, DatasetName, ModelName, flatten, unflatten
from fedmoe_flwr.data import load_federated
from fedmoe_flwr.models import build_model, param_layout
from fedmoe_flwr.variants import num_moe_layers, smallest_expert_count, strategy_variant, variant_ffn


def load_data(cfg: Config):
    """The federated dataset the config names (cached by the data package)."""
    d = cfg.dataset
    if d.name == DatasetName.custom:
        from fedmoe_flwr.data.custom import load_custom

        return load_custom(d.loader, d.num_clients, d.partitioner, d.alpha, cfg.seed, d.holdout_fraction,
                           d.max_train_samples, feature_column=d.feature_column, label_column=d.label_column,
                           id_column=d.id_column)
    return load_federated(
        d.name.value,
        num_clients=d.num_clients,
        partitioner=d.partitioner,
        alpha=d.alpha,
        seed=cfg.seed,
        holdout_fraction=d.holdout_fraction,
        max_train_samples=d.max_train_samples,
        **({"num_domains": d.num_domains} if d.partitioner == "domain" else {}),
        **({"max_test_samples": d.max_test_samples} if d.max_test_samples is not None else {}),
    )


def model_kwargs(cfg: Config, data) -> tuple[str, dict]:
    """The zoo name and constructor arguments for the config's model on this data."""
    m = cfg.model
    common = dict(
        num_experts=m.num_experts,
        top_k=m.top_k,
        d_hidden=m.d_hidden,
        shared_expert=m.shared_expert,
        d_model=m.d_model,
    )
    in_dim = 1
    for s in data.input_shape:
        in_dim *= int(s)
    if m.name == ModelName.custom:
        return "custom", dict(common, in_dim=in_dim, input_shape=tuple(int(s) for s in data.input_shape),
                              num_classes=data.num_classes)
    if m.name == ModelName.moe_mlp:
        return "moe_mlp", dict(common, in_dim=in_dim, num_classes=data.num_classes, num_moe_layers=m.num_moe_layers)
    if m.name == ModelName.moe_cnn:
        return "moe_cnn", dict(common, num_classes=data.num_classes)
    if m.name == ModelName.hf:
        return "hf", dict(vocab_size=data.num_classes, d_model=m.d_model, d_hidden=m.d_hidden, n_layer=m.n_layer,
                          n_head=m.n_head, num_experts=m.num_experts, top_k=m.top_k, block_size=m.block_size,
                          family=m.family, pretrained=m.pretrained)
    if m.name == ModelName.moe_lm:
        return "moe_lm", dict(
            common, vocab_size=data.num_classes, block_size=m.block_size, n_layer=m.n_layer, n_head=m.n_head
        )
    raise ValueError(f"unknown model {m.name!r}")


def _construct(cfg: Config, data, dense: bool, weights: bool = True) -> torch.nn.Module:
    name, kwargs = model_kwargs(cfg, data)
    if name == "custom":
        from fedmoe_flwr.models.custom import build_custom

        return build_custom(cfg.model.factory, kwargs, dense=dense)
    if name == "hf":
        from fedmoe_flwr.models.hf_lm import build_hf_lm

        family, vocab = kwargs.pop("family"), kwargs.pop("vocab_size")
        return build_hf_lm(family, vocab, dense=dense, weights=weights, **kwargs)
    return build_model(name, dense=dense, **kwargs)


def variant_kwargs(cfg: Config, data, variant: str) -> tuple[str, dict]:
    """:func:`model_kwargs` for one model variant (:mod:`fedmoe_flwr.variants`)."""
    name, kwargs = model_kwargs(cfg, data)
    m = cfg.model
    layers = num_moe_layers(m.name.value, m.n_layer, m.num_moe_layers)
    k_min = smallest_expert_count(cfg.fleet.tiers, layers * m.num_experts)
    ffn = variant_ffn(variant, num_experts=m.num_experts, d_hidden=m.d_hidden, top_k=m.top_k,
                      shared_expert=m.shared_expert, layers=layers, k_min=k_min)
    return name, {**kwargs, **ffn}


def build(cfg: Config, data, *, dense: bool = False, variant: str | None = None) -> torch.nn.Module:
    """A freshly initialised model; the initial weights depend only on ``cfg.seed``.

    ``variant`` (``moe``, ``dense``, ``dense-small``, ``dense-large``) overrides ``dense``;
    :func:`build_for_strategy` builds the one the config's strategy trains. The width
    variants exist for the shipped models only. With ``train.lora_rank > 0`` the model
    carries LoRA adapters (A seeded by ``cfg.seed``) and only they and the routers travel
    (:mod:`fedmoe_flwr.models.adapters.lora`).
    """
    torch.manual_seed(cfg.seed)
    if variant in (None, "moe", "dense"):
        model = _construct(cfg, data, dense if variant is None else variant == "dense")
    elif cfg.model.name.value in ("custom", "hf"):
        raise ValueError(f"strategy {cfg.strategy.name.value!r} needs the {variant} variant of a shipped model, "
                         f"not model={cfg.model.name.value}")
    else:
        name, kwargs = variant_kwargs(cfg, data, variant)
        model = build_model(name, **kwargs)
    if cfg.train.lora_rank > 0:
        from fedmoe_flwr.models.adapters.lora import apply_lora

        apply_lora(model, rank=cfg.train.lora_rank, alpha=cfg.train.lora_alpha, seed=cfg.seed)
    return model


def build_for_strategy(cfg: Config, data) -> torch.nn.Module:
    """The model the config's strategy trains (:func:`fedmoe_flwr.variants.strategy_variant`)."""
    return build(cfg, data, variant=strategy_variant(cfg.strategy.name.value))


@lru_cache(maxsize=8)
def _moe_layout(flat_items: tuple):
    cfg = unflatten(dict(flat_items))
    return param_layout(build(cfg, load_data(cfg), variant="moe"))


def moe_layout(cfg: Config):
    """The expert layout of the config's MoE, whatever model the strategy trains: device
    budgets (``fleet``) and the width strategies' capacities are counted in its experts."""
    return _moe_layout(tuple(sorted(flatten(cfg).items())))


def compact_factory(cfg: Config, data):
    """A builder of the config's model for compact clients (``client.compact``), or None.

    Hugging Face models without LoRA: every tensor a client holds arrives in its message,
    so it allocates only its experts. Other models use the shared skeleton (LoRA clients
    need the frozen base weights, which do not travel).
    """
    if cfg.model.name != ModelName.hf or cfg.train.lora_rank > 0:
        return None
    return lambda: _construct(cfg, data, cfg.strategy.name.value == "dense", weights=False)


@lru_cache(maxsize=8)
def _cached(flat_items: tuple):
    cfg = unflatten(dict(flat_items))
    data = load_data(cfg)
    model = build_for_strategy(cfg, data)
    return cfg, data, model, param_layout(model)


def experiment_for(cfg: Config):
    """``(cfg, data, model, layout)`` for this config, built once per process.

    The model is a shared skeleton: callers load the state they need into it each time.
    """
    return _cached(tuple(sorted(flatten(cfg).items())))
