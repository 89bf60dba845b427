"""Build the model a TRAIN message asks for, holding only the experts it assigns.

::

    @app.train()
    def train(msg, context):
        model = model_for_message(msg, lambda: MixtralForCausalLM(config))
        return expert_train(msg, model, my_train, profile=...)

A message that assigns no experts (e.g. from Flower's stock FedAvg) gets the full model.
See docs/models.md#memory.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Message
from torch import nn

from fedmoe_flwr import protocol as P
from fedmoe_flwr.models.adapters import load_wire
from fedmoe_flwr.models.adapters.compact import build_compact
from fedmoe_flwr.models.slicing import from_array_record


def model_for_message(msg: Message, factory: Callable[[], nn.Module]) -> nn.Module:
    """``factory()`` with the message's tensors loaded, allocating only its assigned experts."""
    conf = msg.content[P.CONFIG] if P.CONFIG in msg.content else {}
    received = from_array_record(msg.content[P.ARRAYS])
    if "experts" not in conf:
        model = factory()
        load_wire(model, received)
        return model
    return build_compact(factory, [str(k) for k in conf["experts"]], received)
