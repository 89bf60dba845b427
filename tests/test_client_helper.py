"""The client helper on a user's own model: ``expert_train``, ``expert_probe``, ``node_profile``.

The model here is not from fedmoe_flwr's zoo: a user's module with two ``MoELayer``s and
its own training loop, as an existing Flower project would have.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from torch import nn

from fedmoe_flwr import protocol as P
from fedmoe_flwr.client import expert_probe, expert_train, load_assigned, node_profile
from fedmoe_flwr.models import MoELayer, active_expert_keys, aux_loss, param_layout
from fedmoe_flwr.models.slicing import from_array_record, state_nbytes, to_array_record


class UserNet(nn.Module):
    """A user's model: 16 features -> MoE (4 experts) -> MoE (3 experts) -> 5 classes."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 24)
        self.moe1 = MoELayer(24, 16, num_experts=4)
        self.moe2 = MoELayer(24, 16, num_experts=3)
        self.out = nn.Linear(24, 5)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = h + self.moe1(h)
        return self.out(h + self.moe2(h))


def user_train(model: nn.Module, x: np.ndarray, y: np.ndarray, steps: int = 5) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xt), yt) + aux_loss(model)
        loss.backward()
        opt.step()
    return float(loss.detach())


@pytest.fixture(autouse=True)
def _identity(runtime_identity):
    """Every test here builds messages outside Flower's runtime (tests/conftest.py)."""


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(64, 16)).astype(np.float32), rng.integers(0, 5, size=64).astype(np.int64)


def context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=42, node_config=node_config, state=RecordDict(), run_config={})


def message(kind, arrays: dict | None, conf: dict) -> Message:
    content = RecordDict({P.CONFIG: ConfigRecord(conf)})
    if arrays is not None:
        content[P.ARRAYS] = to_array_record(arrays)
    msg = Message(content, dst_node_id=42, message_type=kind)
    msg.metadata.__dict__["_message_id"] = "m1"
    return msg


def global_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {k: v.clone() for k, v in UserNet().state_dict().items()}


def test_node_profile_reads_node_config():
    model = UserNet()
    layout = param_layout(model)
    all_experts = sum(layout.expert_nbytes(k) for k in layout.expert_keys)
    p = node_profile(context({"partition-id": 3}), model).encode()
    assert p == {P.CLIENT_ID: "3", P.EXPERT_MEMORY: all_experts}
    mem = (layout.shared_nbytes + 1000) / 2**20
    p = node_profile(context({"client-id": "phone-7", "partition-id": 3, "memory-mb": mem, "uplink-Bps": 5e5}), model).encode()
    assert p[P.CLIENT_ID] == "phone-7" and p[P.EXPERT_MEMORY] == 1000 and p[P.UPLINK] == 5e5
    assert node_profile(context({}), model).client_id == "42", "the Flower node id as a last resort"
    assert node_profile(context({"memory-mb": 1e-6}), model).expert_memory_bytes == 0, "never negative"
    assert node_profile(context({}), model, tier="phone").tier == "phone"


def test_expert_train_trains_only_the_assigned_experts_and_replies_with_what_it_got(data):
    x, y = data
    state = global_state()
    layout = param_layout(UserNet())
    keys = ["L0.E1", "L0.E3", "L1.E2"]
    sent = {n: state[n] for n in layout.param_names(keys)}
    seen = {}

    def train_fn(model):
        seen["active"] = active_expert_keys(model)
        seen["loaded"] = all(torch.equal(model.state_dict()[n], t) for n, t in sent.items())
        return {P.NUM_EXAMPLES: len(x), P.TRAIN_LOSS: user_train(model, x, y)}

    msg = message(MessageType.TRAIN, sent, {"server-round": 1, "experts": keys})
    reply = expert_train(msg, UserNet(), train_fn, stats_inputs=x)

    assert seen == {"active": keys, "loaded": True}, "absent experts are masked, the sent tensors loaded"
    back = from_array_record(reply.content[P.ARRAYS])
    assert set(back) == set(sent), "exactly the tensors it was sent"
    assert all(back[n].shape == sent[n].shape and back[n].dtype == sent[n].dtype for n in sent)
    assert any(not torch.equal(back[n], sent[n]) for n in layout.expert_params["L0.E1"]), "it trained"
    rep = reply.content[P.REPORT]
    tokens = P.decode_vector(rep[P.TOKENS], len(layout.expert_keys), missing_as_nan=False)
    held = np.array([k in keys for k in layout.expert_keys])
    assert (tokens[~held] == 0).all() and tokens[held].sum() > 0, "tokens route among held experts only"
    assert tokens[:4].sum() == tokens[4:].sum() == 5 * len(x), "every token passes each MoE layer once per step"
    hist = P.decode_vector(rep[P.HIST], len(layout.expert_keys))
    assert hist[:4].sum() == pytest.approx(1) and hist[4:].sum() == pytest.approx(1), "histogram over all router rows"
    assert P.record_nbytes(reply.content[P.ARRAYS]) == P.record_nbytes(msg.content[P.ARRAYS]) == state_nbytes(sent)
    assert rep[P.NUM_EXAMPLES] == len(x) and rep[P.TRAIN_LOSS] > 0
    assert P.PROFILE not in reply.content, "the profile travels in the QUERY reply only"


def test_a_stock_fedavg_message_trains_every_expert_and_timings_can_be_replaced(data):
    x, y = data
    state = global_state()
    msg = message(MessageType.TRAIN, state, {"server-round": 1, "lr": 0.1})  # FedAvg: whole model, no "experts"
    reply = expert_train(msg, UserNet(), lambda m: (user_train(m, x, y), len(x))[1],
                         timings=lambda down, up, n, measured: (down / 1e3, measured + 1.0, up / 1e3))
    assert set(from_array_record(reply.content[P.ARRAYS])) == set(state)
    rep = reply.content[P.REPORT]
    assert rep[P.NUM_EXAMPLES] == len(x)
    assert rep[P.DOWN_TIME] == pytest.approx(state_nbytes(state) / 1e3) and rep[P.TRAIN_TIME] > 1.0
    assert (P.decode_vector(rep[P.HIST], 7) != P.decode_vector(rep[P.HIST], 7)).all(), "no stats_inputs: no histogram"


def test_load_assigned_rejects_tensors_the_model_does_not_have():
    state = global_state()
    bad = {**state, "moe9.router.weight": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match="does not have"):
        load_assigned(message(MessageType.TRAIN, bad, {}), UserNet())
    wrong = {**state, "out.weight": torch.zeros(5, 3)}
    with pytest.raises(ValueError, match="shape"):
        load_assigned(message(MessageType.TRAIN, wrong, {}), UserNet())


def test_expert_probe_answers_the_query_with_profile_and_routing(data):
    x, _ = data
    state = global_state()
    layout = param_layout(UserNet())
    shared = {n: state[n] for n in layout.param_names([])}
    probed = expert_probe(message(MessageType.QUERY, shared, {"probe": True}), UserNet(),
                          profile=P.NodeProfile("u", expert_memory_bytes=10), stats_inputs=x)
    assert probed.content[P.PROFILE][P.EXPERT_MEMORY] == 10
    hist = P.decode_vector(probed.content[P.REPORT][P.HIST], 7)
    assert hist[:4].sum() == pytest.approx(1) and (hist >= 0).all()
    plain = expert_probe(message(MessageType.QUERY, None, {"probe": False}), UserNet(), profile=P.NodeProfile("u"), stats_inputs=x)
    assert P.REPORT not in plain.content and plain.content[P.PROFILE][P.CLIENT_ID] == "u"
