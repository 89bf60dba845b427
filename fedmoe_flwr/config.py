"""Structured config schemas (Hydra/OmegaConf) and their flat form for Flower's run_config.

The dataclasses are the schema: Hydra composes ``conf/`` on top of them, so a wrong key or
a value of the wrong type fails with a message naming it. Enums list the allowed values.
:func:`register_configs` is called by ``run.py`` (no registration at import time).
Flower carries configuration as a flat ``run_config`` of scalars, so :func:`flatten` and
:func:`unflatten` convert a whole :class:`Config` to and from dotted keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from omegaconf import OmegaConf

from fedmoe_flwr.core.fitness import FitnessSettings
from fedmoe_flwr.core.robust import RobustSettings


class _Name(str, Enum):
    """A string enum that prints as its value (so ``${strategy.name}`` in a path reads well)."""

    def __str__(self) -> str:
        return str(self.value)


class StrategyName(_Name):
    aligned = "aligned"
    flex = "flex"
    greedy = "greedy"
    random = "random"
    full = "full"
    dense = "dense"
    rolling = "rolling"
    dense_small = "dense-small"
    dense_large_exclusive = "dense-large-exclusive"
    heterofl = "heterofl"
    fjord = "fjord"
    fedrolex = "fedrolex"


# OmegaConf looks enum values up by member *name*; the dashed strategy names (``dense-small``)
# are not identifiers, so they are registered as aliases of their members.
for _member in StrategyName:
    StrategyName._member_map_.setdefault(_member.value, _member)


class DatasetName(_Name):
    digits = "digits"
    mnist5k = "mnist5k"
    fashion_mnist = "fashion_mnist"
    synthetic = "synthetic"
    shakespeare = "shakespeare"


class ModelName(_Name):
    moe_mlp = "moe_mlp"
    moe_cnn = "moe_cnn"
    moe_lm = "moe_lm"


class Backend(_Name):
    ray = "ray"  # Flower's simulation engine (run_simulation, Ray backend)
    local = "local"  # Strategy.start over fedmoe_flwr.sim.LocalGrid, in this process


@dataclass
class DatasetConfig:
    name: DatasetName = DatasetName.digits
    num_clients: int = 20
    partitioner: str = "dirichlet"  # iid | dirichlet | shards | domain | natural
    alpha: float = 0.3
    holdout_fraction: float = 0.2
    max_train_samples: Optional[int] = None
    num_domains: int = 4
    max_test_samples: Optional[int] = None  # shakespeare: cap on global test windows (None = the source's 10,000)


@dataclass
class ModelConfig:
    name: ModelName = ModelName.moe_mlp
    num_experts: int = 8
    top_k: int = 1
    d_model: int = 64
    d_hidden: int = 64
    shared_expert: bool = False
    num_moe_layers: int = 1  # moe_mlp only; moe_lm uses n_layer
    n_layer: int = 2
    n_head: int = 4
    block_size: int = 64


@dataclass
class TierConfig:
    """One kind of simulated device (:mod:`fedmoe_flwr.fleet` deals them out to nodes)."""

    name: str = "mid"
    fraction: float = 1.0
    max_experts: int = -1  # experts the device can hold; -1 = all
    samples_per_s: float = 200.0
    uplink_mbps: float = 10.0
    downlink_mbps: float = 40.0
    reliability: float = 1.0


@dataclass
class FleetConfig:
    tiers: list[TierConfig] = field(default_factory=lambda: [TierConfig()])
    deadline_s: Optional[float] = None  # simulated round deadline; None = wait for all
    jitter: float = 0.1  # log-normal spread of per-round speeds


@dataclass
class StrategyConfig(RobustSettings, FitnessSettings):
    """The strategy's settings; the fitness ones (w_hist, beta, ...) come from
    :class:`~fedmoe_flwr.core.FitnessSettings`, the robustness ones (norm_bound, aggregator,
    clip, ...) from :class:`~fedmoe_flwr.core.RobustSettings`. Each field reaches the strategy's
    constructor argument of the same name (:func:`fedmoe_flwr.server_app.build_strategy`)."""

    name: StrategyName = StrategyName.aligned
    fraction_train: float = 0.5
    min_train_nodes: int = 2
    fraction_evaluate: float = 0.0  # personalised evaluation on clients' held-out splits
    probe: bool = True  # QUERY new nodes for their routing histogram before assigning
    # load balance: band around the mean slots per expert (0 = exact floor/ceil) and price
    band: float = 0.0
    price_step: float = 0.0
    use_deadline: bool = True
    deadline_slack: float = 0.9  # aligned plans within this share of the deadline
    pace_margin: float = 1.2  # aligned closes rounds at this x the slowest predicted reply; 0 = off
    # width baselines (heterofl, fjord, fedrolex): width ratios a client may train, from its
    # capacity (docs/architecture.md#strategies); fjord samples one of them per local step
    width_levels: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5, 1.0])
    roll_step: int = 1  # fedrolex: hidden units the window moves per round (the paper: 1)
    # aggregation
    server_opt: str = "avg"  # avg | fedadam | fedyogi
    server_lr: float = 1.0
    profile_ema: float = 0.3


@dataclass
class TrainConfig:
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    proximal_mu: float = 0.0  # FedProx term; 0 = plain local SGD
    max_batches: Optional[int] = None  # cap on local batches per epoch (LEAF-style fixed work); None = all
    stats_samples: int = 512  # samples a client routes to measure its routing histogram
    balance_weight: float = 0.1
    z_weight: float = 0.001
    optimizer: str = "sgd"  # local optimizer: sgd | adam (fresh each round; transformers learn far faster with adam)
    all_positions: bool = False  # next-char LMs: loss on every position of a window (nanoGPT-style), not the last only


@dataclass
class Config:
    seed: int = 0
    num_rounds: int = 10
    eval_every: int = 1
    backend: Backend = Backend.local
    num_cpus_per_client: float = 1.0
    quiet: bool = False  # no progress display
    verbose: bool = False  # keep Flower's per-round INFO log
    targets: list[float] = field(default_factory=list)
    save_model: bool = True
    # checkpoints, resume, report, tracking (fedmoe_flwr/checkpoint.py, report/, tracking.py)
    checkpoint_every: int = 5  # rounds between checkpoints (and after the last); 0 = none
    checkpoint_keep: int = 2  # newest complete checkpoints kept
    resume: bool = False  # continue from the run directory's last good checkpoint
    report: bool = True  # write report/report.html at the end of run.py
    loggers: list[str] = field(default_factory=lambda: ["jsonl", "csv"])  # + tensorboard, mlflow, "pkg.mod:factory"
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


RUN_KEYS: dict[str, object] = {
    "output-dir": "",  # where the ServerApp writes metrics.jsonl, summary.json, messages.jsonl ("" = nowhere)
    "round-timeout": 0.0,  # seconds a round waits for replies (0 = the ServerApp's default, 3600)
}
"""Run-level keys of Flower's ``run_config`` (not part of :class:`Config`) and their defaults."""


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore as ``base_config``."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=Config)


def to_config(cfg: Any) -> Config:
    """A validated :class:`Config` from a DictConfig, dict or Config (unknown keys raise)."""
    if isinstance(cfg, Config):
        return cfg
    merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def flatten(cfg: Config) -> dict[str, Any]:
    """Dotted scalar keys (``strategy.beta``, ``fleet.tiers.0.fraction``); None -> ''."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(f"{prefix}{f.name}.", getattr(value, f.name))
        elif isinstance(value, (list, tuple)):
            out[f"{prefix}len"] = len(value)
            for i, v in enumerate(value):
                walk(f"{prefix}{i}.", v)
        else:
            key = prefix[:-1]
            if isinstance(value, Enum):
                value = value.value
            out[key] = "" if value is None else value

    walk("", cfg)
    return out


def unflatten(flat: dict[str, Any]) -> Config:
    """Inverse of :func:`flatten`; keys not in the schema raise with their name."""

    def build(cls, prefix: str):
        kwargs = {}
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
            if dataclasses.is_dataclass(default):
                kwargs[f.name] = build(type(default), key + ".")
            elif isinstance(default, list):
                n = flat.get(f"{key}.len")
                if n is None:
                    kwargs[f.name] = default
                    continue
                if f.name == "tiers":
                    kwargs[f.name] = [build(TierConfig, f"{key}.{i}.") for i in range(int(n))]
                else:
                    kwargs[f.name] = [flat[f"{key}.{i}"] for i in range(int(n))]
            elif key in flat:
                v = flat[key]
                kwargs[f.name] = None if v == "" and default is None else v
        return cls(**kwargs)

    known = set(flatten(Config()))
    for k in flat:
        base = k.split(".")
        if k not in known and not any(p.isdigit() for p in base) and not k.endswith(".len"):
            raise KeyError(f"unknown config key {k!r}")
    return to_config(OmegaConf.structured(build(Config, "")))
