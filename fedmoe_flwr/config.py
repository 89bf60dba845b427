"""Structured config schemas (Hydra/OmegaConf) and their flat form for Flower's run_config.

The dataclasses are the schema: Hydra composes ``conf/`` on top of them, so a wrong key or
a value of the wrong type fails with a message naming it. Enums list the allowed values.
:func:`register_configs` is called by ``run.py`` (no registration at import time).
Flower carries configuration as a flat ``run_config`` of scalars, so :func:`flatten` and
:func:`unflatten` convert a whole :class:`Config` to and from dotted keys.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from fedmoe_flwr.core.fitness import FitnessSettings
from fedmoe_flwr.core.privacy import DPSettings, dp_problems
from fedmoe_flwr.core.robust import AGGREGATORS, CLIPS, RobustSettings


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


class ServerOpt(_Name):
    avg = "avg"
    fedadam = "fedadam"
    fedyogi = "fedyogi"


class DatasetName(_Name):
    digits = "digits"
    mnist5k = "mnist5k"
    fashion_mnist = "fashion_mnist"
    synthetic = "synthetic"
    shakespeare = "shakespeare"
    mixed_digits = "mixed_digits"  # Fashion-MNIST + MNIST-5k + digits, 20 joint classes, 3 source domains
    custom = "custom"  # the user's own loader: dataset.loader (fedmoe_flwr/data/custom.py)


class ModelName(_Name):
    moe_mlp = "moe_mlp"
    moe_cnn = "moe_cnn"
    moe_lm = "moe_lm"
    custom = "custom"  # the user's own factory: model.factory (fedmoe_flwr/models/custom.py)
    hf = "hf"  # a Hugging Face MoE LM: model.family, model.pretrained (fedmoe_flwr/models/hf_lm.py)


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
    # name=custom: an import string "my_pkg.data:load" and, for a datasets.Dataset, its columns
    loader: str = ""
    feature_column: str = ""  # "" = the one column that is neither label nor id
    label_column: str = "label"
    id_column: str = ""  # natural client ids (partitioner=natural)
    max_test_samples: Optional[int] = None  # shakespeare: cap on global test windows (None = the source's 10,000)


@dataclass
class ModelConfig:
    name: ModelName = ModelName.moe_mlp
    factory: str = ""  # name=custom: an import string "my_pkg.models:build" returning an MoE nn.Module
    num_experts: int = 8
    top_k: int = 1
    d_model: int = 64
    d_hidden: int = 64
    shared_expert: bool = False
    num_moe_layers: int = 1  # moe_mlp only; moe_lm uses n_layer
    n_layer: int = 2
    n_head: int = 4
    block_size: int = 64
    # name=hf: mixtral | qwen2_moe | qwen3_moe | olmoe | switch, sized by d_model, d_hidden,
    # n_layer, n_head, num_experts, top_k, block_size; or a local save_pretrained directory
    family: str = "mixtral"
    pretrained: str = ""


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
class StrategyConfig(RobustSettings, FitnessSettings, DPSettings):
    """The strategy's settings; the fitness ones (w_hist, beta, ...) come from
    :class:`~fedmoe_flwr.core.FitnessSettings`, the robustness ones (norm_bound, aggregator,
    clip, ...) from :class:`~fedmoe_flwr.core.RobustSettings`, the differential-privacy ones
    (dp_noise_multiplier, dp_delta) from :class:`~fedmoe_flwr.core.DPSettings`. Each field reaches the strategy's
    constructor argument of the same name (:func:`fedmoe_flwr.server_app.build_strategy`)."""

    name: StrategyName = StrategyName.aligned
    fraction_train: float = 0.5
    min_train_nodes: int = 2
    fraction_evaluate: float = 0.0  # personalised evaluation on clients' held-out splits
    probe: bool = True  # QUERY new nodes for their routing histogram before assigning
    reprobe: bool = False  # QUERY each round's cohort for histograms under the current model (costs a download)
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
    server_opt: ServerOpt = ServerOpt.avg
    server_lr: float = 1.0
    profile_ema: float = 0.3
    lora_aggregation: str = "product"  # LoRA adapters (train.lora_rank > 0): product | factors


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
    # LoRA on held experts (+ q/v projections): only adapters and routers travel; 0 = off
    lora_rank: int = 0
    lora_alpha: float = 16.0
    optimizer: str = "sgd"  # local optimizer: sgd | adam (fresh each round; transformers learn far faster with adam)
    all_positions: bool = False  # next-char LMs: loss on every position of a window (nanoGPT-style), not the last only
    # route as the global model does while training: a token whose expert the client does not
    # hold skips the MoE layer instead of rerouting to a held expert (fedmoe's MoELayer models)
    drop_inactive: bool = False


@dataclass
class Config:
    seed: int = 0
    num_rounds: int = 10
    eval_every: int = 1
    backend: Backend = Backend.local
    num_cpus_per_client: float = 1.0  # ray backend: CPUs Ray reserves per virtual client
    num_workers: int = 1  # local backend: ClientApp calls in parallel on this many processes (same results)
    ray_address: str = ""  # ray backend: join this running Ray cluster ("auto", "host:port"); "" = start one
    quiet: bool = False  # no progress display
    verbose: bool = False  # keep Flower's per-round INFO log
    targets: list[float] = field(default_factory=list)
    save_model: bool = True
    # checkpoints, resume, report, tracking (fedmoe_flwr/checkpoint/, report/, tracking.py)
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
    """A validated :class:`Config` from a DictConfig, dict or Config.

    Unknown keys (``+strategy.foo=1`` included) raise a ``ConfigKeyError`` and out-of-range
    values a ``ValueError``, each naming every offending key (:func:`check_config`).
    """
    if not isinstance(cfg, Config):
        if not isinstance(cfg, dict):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        unknown = _unknown_keys(cfg, Config, "")
        if unknown:
            raise ConfigKeyError(f"unknown config key(s): {', '.join(unknown)}")
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), cfg))
    problems = check_config(cfg)
    if problems:
        raise ValueError("invalid config: " + "; ".join(problems))
    return cfg  # type: ignore[return-value]


def _unknown_keys(tree: Any, cls, prefix: str) -> list[str]:
    if not isinstance(tree, dict):
        return []
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = []
    for key, value in tree.items():
        if key not in fields:
            out.append(prefix + str(key))
            continue
        default = fields[key].default_factory() if fields[key].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            out += _unknown_keys(value, type(default), f"{prefix}{key}.")
        elif key == "tiers" and isinstance(value, list):
            for i, tier in enumerate(value):
                out += _unknown_keys(tier, TierConfig, f"{prefix}{key}.{i}.")
    return out


def check_config(cfg: Config) -> list[str]:
    """Every value outside its range, as ``"key: why"`` (empty when the config is sound)."""
    bad: list[str] = []

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            bad.append(f"{key}: {why}, got {_get(cfg, key)!r}")

    for key, value in flatten(cfg).items():  # every float finite
        if isinstance(value, float) and not math.isfinite(value):
            bad.append(f"{key}: must be finite, got {value!r}")
    t, s, f, d, m = cfg.train, cfg.strategy, cfg.fleet, cfg.dataset, cfg.model
    need(cfg.num_rounds >= 1, "num_rounds", "must be >= 1")
    need(cfg.eval_every >= 1, "eval_every", "must be >= 1")
    need(cfg.checkpoint_every >= 0 and cfg.checkpoint_keep >= 1, "checkpoint_every", "checkpoint_every >= 0, checkpoint_keep >= 1")
    need(t.lr > 0, "train.lr", "must be > 0")
    need(t.batch_size >= 1, "train.batch_size", "must be >= 1")
    need(t.local_epochs >= 1, "train.local_epochs", "must be >= 1")
    need(t.max_batches is None or t.max_batches >= 1, "train.max_batches", "must be >= 1 or null")
    need(0 <= t.momentum < 1, "train.momentum", "must be in [0, 1)")
    need(t.lora_rank >= 0 and t.lora_alpha > 0, "train.lora_rank", "lora_rank >= 0 (0 = off), lora_alpha > 0")
    need(min(t.proximal_mu, t.balance_weight, t.z_weight, t.stats_samples) >= 0, "train.proximal_mu", "mu, weights, samples >= 0")
    need(f.deadline_s is None or f.deadline_s > 0, "fleet.deadline_s", "must be > 0 or null")
    need(f.jitter >= 0, "fleet.jitter", "must be >= 0")
    for i, tier in enumerate(f.tiers):
        need(tier.fraction >= 0 and 0 <= tier.reliability <= 1, f"fleet.tiers.{i}.fraction", "fraction >= 0, reliability in [0, 1]")
        need(min(tier.samples_per_s, tier.uplink_mbps, tier.downlink_mbps) > 0, f"fleet.tiers.{i}.samples_per_s", "speeds must be > 0")
    need(any(tier.fraction > 0 and tier.max_experts != 0 for tier in f.tiers), "fleet.tiers",
         "at least one tier must hold an expert")
    need(0 < s.fraction_train <= 1, "strategy.fraction_train", "must be in (0, 1]")
    need(0 <= s.fraction_evaluate <= 1, "strategy.fraction_evaluate", "must be in [0, 1]")
    need(s.min_train_nodes >= 1, "strategy.min_train_nodes", "must be >= 1")
    need(0 < s.beta <= 1 and 0 < s.profile_ema <= 1, "strategy.beta", "beta and profile_ema must be in (0, 1]")
    need(min(s.w_hist, s.w_gate, s.w_loss) >= 0 and s.w_hist + s.w_gate + s.w_loss > 0, "strategy.w_hist", "weights >= 0, one > 0")
    need(min(s.kappa, s.band, s.price_step, s.pace_margin, s.max_share, s.sample_drift) >= 0, "strategy.kappa",
         "kappa, band, price_step, pace_margin, max_share, sample_drift must be >= 0")
    need(0 < s.deadline_slack <= 1 and 0 <= s.min_consistency <= 1, "strategy.deadline_slack", "slack in (0, 1], consistency in [0, 1]")
    need(s.lora_aggregation in ("product", "factors"), "strategy.lora_aggregation", "must be product or factors")
    need(s.server_lr > 0, "strategy.server_lr", "must be > 0")
    need(s.norm_bound is None or s.norm_bound > 0, "strategy.norm_bound", "must be > 0 or null")
    need(0 <= s.min_agreement <= 1, "strategy.min_agreement", "must be in [0, 1]")
    need(s.trust_samples >= 0, "strategy.trust_samples", "must be >= 0 (0 = no trust check)")
    need(0 <= s.max_capture <= 1, "strategy.max_capture", "must be in [0, 1] (0 = off)")
    need(s.sit_out_after >= 0, "strategy.sit_out_after", "must be >= 0 (0 = never sit out)")
    need(0 <= s.trust_quorum <= 1, "strategy.trust_quorum", "must be in [0, 1] (0 = off)")
    need(0 <= s.byzantine_fraction < 0.5, "strategy.byzantine_fraction", "must be in [0, 0.5)")
    need(s.aggregator in AGGREGATORS, "strategy.aggregator", f"must be one of {AGGREGATORS}")
    need(s.clip in CLIPS and (s.clip != "fixed" or (s.clip_norm or 0) > 0), "strategy.clip", f"one of {CLIPS}; fixed needs clip_norm > 0")
    bad += [f"strategy.{why}" for why in dp_problems(s, s)]
    need(not (s.dp_noise_multiplier > 0 and s.name == StrategyName.dense), "strategy.dp_noise_multiplier",
         "differential privacy is implemented for the expert strategies, not dense")
    need(d.num_clients >= 1 and d.alpha > 0 and 0 <= d.holdout_fraction < 1, "dataset.num_clients",
         "num_clients >= 1, alpha > 0, holdout_fraction in [0, 1)")
    need(m.num_experts >= 1 and 1 <= m.top_k <= m.num_experts, "model.top_k", "1 <= top_k <= num_experts")
    return bad


def _get(cfg: Config, key: str):
    value: Any = cfg
    for part in key.split("."):
        value = value[int(part)] if isinstance(value, list) else getattr(value, part, None)
    return value


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
