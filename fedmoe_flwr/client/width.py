"""The ClientApp side of the width baselines: the sub-model a message carries, and FjORD's
per-step width sampling (docs/architecture.md#strategies).

A TRAIN or EVALUATE message with a ``width`` entry carries a width-sliced dense model
(:mod:`fedmoe_flwr.widths`); :func:`sub_width_model` builds a model of exactly those shapes
from the dense skeleton. ``od-levels`` (FjORD) asks for ordered dropout while training.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
from flwr.app import Message
from torch import nn

from fedmoe_flwr import protocol as P
from fedmoe_flwr.models.slicing import from_array_record
from fedmoe_flwr.models.width import dense_ffns, model_for_state, ordered_dropout


def sub_width_model(msg: Message, skeleton: nn.Module) -> nn.Module:
    """The model the message's tensors fit: ``skeleton`` itself unless the message is width-sliced."""
    conf = msg.content[P.CONFIG] if P.CONFIG in msg.content else {}
    if P.WIDTH not in conf:
        return skeleton
    return model_for_state(skeleton, from_array_record(msg.content[P.ARRAYS]))


def ordered_dropout_for(msg: Message, model: nn.Module, skeleton: nn.Module, rng: np.random.Generator):
    """FjORD's ordered dropout on ``model`` when the message asks for it, else a no-op context."""
    conf = msg.content[P.CONFIG] if P.CONFIG in msg.content else {}
    levels = [float(v) for v in conf.get(P.OD_LEVELS, [])]
    if not levels:
        return nullcontext()
    full = {name: ffn.fc1.out_features for name, ffn in dense_ffns(skeleton).items()}
    return ordered_dropout(model, levels, full, rng)
