"""The ready-made ClientApp for fedmoe_flwr's shipped models and datasets.

A node finds its data partition in ``node_config["partition-id"]`` and, in simulation, its
simulated device (tier, memory, speeds) from the fleet config. Settings come from Flower's
``run_config`` (flat dotted keys, see :func:`fedmoe_flwr.config.flatten`), on top of the
defaults given to :func:`make_client_app`.

A node whose ``node_config`` declares ``client-id`` or ``memory-mb`` (a SuperNode of a real
deployment, ``flower-supernode --node-config 'client-id="a" partition-id=0 memory-mb=2'``)
is a real device instead (``simulate-fleet=true|false`` forces either): its profile is
what it declares (:func:`~fedmoe_flwr.client.helper.node_profile`: budget from
``memory-mb``, optional ``samples-per-s``, ``uplink-Bps``, ``downlink-Bps``,
``reliability``), its training time is measured, its transfer times are its bytes over its
declared link speeds (0 when undeclared: a ClientApp cannot time its own transfers), and
it never drops out on purpose. Without those keys (Flower's simulation gives only
``partition-id`` and ``num-partitions``) nothing changes.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from fedmoe_flwr import protocol as P
from fedmoe_flwr.client.helper import expert_evaluate, expert_probe, expert_train, node_profile
from fedmoe_flwr.client.local_update import train_local
from fedmoe_flwr.client.width import ordered_dropout_for, sub_width_model
from fedmoe_flwr.models.evaluate import evaluate
from fedmoe_flwr.models.moe import dropping_inactive
from fedmoe_flwr.client.node_cache import node_experiment
from fedmoe_flwr.config import RUN_KEYS, Config, flatten, unflatten
from fedmoe_flwr.client.compact import model_for_message
from fedmoe_flwr.experiment import compact_factory, experiment_for, moe_layout
from fedmoe_flwr.fleet import device_profile, drops_out, simulate_times
from fedmoe_flwr.seeding import rng_for

SIMULATED_DROPOUT = "simulated dropout"


def _config(defaults: dict, context: Context) -> Config:
    run_config = {k: v for k, v in dict(context.run_config).items() if k not in RUN_KEYS}
    return _unflatten_cached(tuple(sorted({**defaults, **run_config}.items())))


DEVICE_KEYS = ("client-id", "memory-mb")
"""node_config keys that mark a real device (see the module doc)."""


def simulated_device(context: Context) -> bool:
    """Whether this node's device comes from the simulated fleet (see the module doc)."""
    nc = context.node_config
    if "simulate-fleet" in nc:
        return bool(nc["simulate-fleet"])
    return not any(k in nc for k in DEVICE_KEYS)


def _link_times(profile: P.NodeProfile):
    """``timings`` for a real device: measured compute, transfers at declared link speeds."""

    def timings(bytes_down, bytes_up, _n, measured_s):
        down, up = profile.downlink_Bps, profile.uplink_Bps
        return (bytes_down / down if down else 0.0), measured_s, (bytes_up / up if up else 0.0)

    return timings


@lru_cache(maxsize=16)
def _unflatten_cached(items: tuple) -> Config:
    # Validating a config through OmegaConf costs ~70 ms; every message would pay it.
    return unflatten(dict(items))


def _device(cfg: Config, pid: int):
    # Budgets are counted in the MoE's experts whatever model the strategy trains, so every
    # strategy (dense and width baselines included) sees the same fleet.
    layout = moe_layout(cfg)
    tiers = list(cfg.fleet.tiers)
    expert_bytes = max((layout.expert_nbytes(k) for k in layout.expert_keys), default=0)
    return device_profile(pid, cfg.dataset.num_clients, tiers, cfg.seed, expert_bytes, len(layout.expert_keys))


def _profile(dev, pid: int, context: Context, num_examples: int, model=None) -> P.NodeProfile:
    if dev is None:  # a real device: what its node_config declares
        return node_profile(context, model, num_examples=int(num_examples))
    return P.NodeProfile(
        client_id=str(context.node_config.get("client-id", pid)),
        expert_memory_bytes=int(dev.expert_memory_bytes),
        samples_per_s=dev.samples_per_s,
        uplink_Bps=dev.uplink_Bps,
        downlink_Bps=dev.downlink_Bps,
        reliability=dev.reliability,
        tier=dev.tier,
        num_examples=int(num_examples),
    )


def _compact(cfg: Config, data, msg: Message, skeleton):
    """The model holding only the message's experts where the config allows, else the skeleton."""
    factory = compact_factory(cfg, data)
    return skeleton if factory is None else model_for_message(msg, factory)


def make_client_app(defaults: dict | None = None) -> ClientApp:
    """A ClientApp (query, train, evaluate) for the models and data of :mod:`fedmoe_flwr`."""
    defaults = dict(defaults or {})
    app = ClientApp()

    def node(context: Context):
        # One thread: small models run faster so, and results do not depend on the thread
        # count of the process (Ray workers and the in-process grid agree bit for bit).
        torch.set_num_threads(1)
        cfg = _config(defaults, context)
        pid = int(context.node_config["partition-id"])
        if simulated_device(context):
            cfg, data, model, layout = experiment_for(cfg)
            return cfg, data, model, pid, _device(cfg, pid)
        # A real device: a new process per message, so its partition is kept in context.state.
        cfg, data, model, layout = node_experiment(cfg, context, pid)
        return cfg, data, model, pid, None

    def work(cfg: Config, x) -> tuple[int, np.ndarray]:
        """Samples trained per epoch (``max_batches`` caps it) and the histogram's sample."""
        t = cfg.train
        n = len(x) if t.max_batches is None else min(len(x), t.max_batches * t.batch_size)
        return n, x[: t.stats_samples]

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        cfg, data, model, pid, dev = node(context)
        x, _ = data.client_train(pid)
        n, sample = work(cfg, x)
        profile = _profile(dev, pid, context, n, model)
        rnd = int(msg.content[P.CONFIG].get("server-round", 0))

        def timings(bytes_down, bytes_up, samples, _measured):
            return simulate_times(dev, samples_processed=samples, bytes_down=bytes_down, bytes_up=bytes_up,
                                  rng=rng_for(cfg.seed, "probe-time", rnd, pid), jitter=cfg.fleet.jitter)

        return expert_probe(msg, model, profile=profile, stats_inputs=sample,
                            timings=timings if dev is not None else _link_times(profile))

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, data, skeleton, pid, dev = node(context)
        model = sub_width_model(msg, skeleton)  # the skeleton itself unless the message is width-sliced
        conf = msg.content[P.CONFIG]
        rnd = int(conf.get("server-round", 0))
        if dev is not None and drops_out(dev, rng_for(cfg.seed, "dropout", rnd, pid)):
            return Message(Error(code=0, reason=SIMULATED_DROPOUT), reply_to=msg)
        x, y = data.client_train(pid)
        model = _compact(cfg, data, msg, model)
        t = cfg.train
        epochs = int(conf.get("local-epochs", t.local_epochs))
        torch.manual_seed(int(rng_for(cfg.seed, "torch", rnd, pid).integers(2**31)))

        def train_fn(m):
            with ordered_dropout_for(msg, m, skeleton, rng_for(cfg.seed, "ordered-dropout", rnd, pid)):
                r = _train(m)
            return {P.NUM_EXAMPLES: r.num_examples, P.TRAIN_LOSS: r.train_loss, P.EXPERT_LOSS: r.expert_loss}

        def _train(m):
            with dropping_inactive(m, t.drop_inactive):  # train.drop_inactive: route as the global model
                return train_local(
                    m, x, y,
                    epochs=epochs,
                    batch_size=int(conf.get("batch-size", t.batch_size)),
                    lr=float(conf.get("lr", t.lr)),
                    rng=rng_for(cfg.seed, "batches", rnd, pid),
                    momentum=t.momentum,
                    proximal_mu=float(conf.get("proximal-mu", t.proximal_mu)),
                    balance_weight=t.balance_weight,
                    z_weight=t.z_weight,
                    max_batches=t.max_batches,
                    all_positions=t.all_positions,
                    optimizer=t.optimizer,
                )

        def timings(bytes_down, bytes_up, n, _measured):
            return simulate_times(
                dev, samples_processed=n * epochs, bytes_down=bytes_down, bytes_up=bytes_up,
                rng=rng_for(cfg.seed, "time", rnd, pid), jitter=cfg.fleet.jitter,
            )

        n, sample = work(cfg, x)
        return expert_train(
            msg, model, train_fn, stats_inputs=sample,
            timings=timings if dev is not None else _link_times(_profile(dev, pid, context, n, model)),
        )

    @app.evaluate()
    def evaluate_personal(msg: Message, context: Context) -> Message:
        cfg, data, skeleton, pid, dev = node(context)
        model = sub_width_model(msg, skeleton)
        x, y = data.client_holdout(pid)
        model = _compact(cfg, data, msg, model)

        def eval_fn(m):
            loss, acc, n = evaluate(m, x, y)
            return loss, n, {"accuracy": acc}

        return expert_evaluate(msg, model, eval_fn)

    return app


# For `flwr run` (pyproject's [tool.flwr.app.components]): settings come from run_config.
app = make_client_app(flatten(Config()))
