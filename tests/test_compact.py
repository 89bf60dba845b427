"""Compact models: a client holding k of E experts allocates only those k (structure only)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from fedmoe_flwr.models import build_model, param_layout  # noqa: E402
from fedmoe_flwr.models.adapters import mask_experts, model_experts, to_wire  # noqa: E402
from fedmoe_flwr.models.adapters.compact import build_compact, resident_nbytes  # noqa: E402
from fedmoe_flwr.models.hf_tiny import FAMILIES, hf_forward, hf_model_class, hf_tiny_config  # noqa: E402
from fedmoe_flwr.models.slicing import sub_state  # noqa: E402

E, HELD = 5, (0, 2, 3)


def _factory(family):
    if family == "fedmoe":
        return lambda: build_model("moe_lm", n_layer=2, num_experts=E, d_model=16, d_hidden=8, n_head=2, vocab_size=64)
    return lambda: hf_model_class(family)(hf_tiny_config(family, E, 2))


def _forward(family, model, ids):
    return model(ids) if family == "fedmoe" else hf_forward(model, ids)


def _pair(family, held=HELD):
    torch.manual_seed(0)
    full = _factory(family)()
    layout = param_layout(full)
    keys = [f"L{l}.E{e}" for l in layout.num_experts for e in held]
    compact = build_compact(_factory(family), keys, sub_state(to_wire(full), layout, keys))
    mask_experts(full, keys)
    return full, compact, layout, keys


@pytest.mark.parametrize("family", ["fedmoe", *FAMILIES])
def test_no_tensor_of_an_absent_expert_exists_and_the_layout_is_the_full_one(family):
    full, compact, layout, keys = _pair(family)
    assert param_layout(compact) == layout, "the server sees the same names and sizes"
    assert set(to_wire(compact)) == set(layout.param_names(keys)), "its wire state: shared + held experts"
    for layer in model_experts(compact).layers:
        assert layer.held == HELD
        for e in range(E):
            for name in layer.experts[e]:
                assert compact.get_parameter(name).is_meta == (e not in HELD), name
        for name in layer.fused:
            assert compact.get_parameter(name).shape[0] == len(HELD), "fused tensors hold k rows, not E"
    per_expert = layout.expert_nbytes(layout.expert_keys[0])
    assert resident_nbytes(full) - resident_nbytes(compact) == (E - len(HELD)) * len(layout.num_experts) * per_expert


@pytest.mark.parametrize("family", ["fedmoe", "mixtral", "qwen2_moe", "switch"])
def test_a_compact_model_trains_like_the_masked_full_model(family):
    full, compact, layout, keys = _pair(family)
    ids = torch.randint(0, 64, (3, 6), generator=torch.Generator().manual_seed(1))
    sent = {n: t.clone() for n, t in to_wire(compact).items()}
    for model in (full, compact):
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if not p.is_meta], lr=0.5)
        loss = _forward(family, model, ids).float().logsumexp(-1).mean()
        loss.backward()
        opt.step()
    a, b = to_wire(full), to_wire(compact)
    for name in layout.param_names(keys):
        assert torch.allclose(a[name], b[name], atol=1e-5), name
    assert any(not torch.equal(b[n], sent[n]) for k in keys for n in layout.expert_params[k]), "held experts trained"


def test_compact_errors():
    with pytest.raises(ValueError, match=r"layer\(s\) \[1\] would hold no expert"):
        build_compact(_factory("mixtral"), ["L0.E1"])
    with pytest.raises(KeyError, match="unknown expert key 'L0.E7'"):
        build_compact(_factory("mixtral"), ["L0.E7", "L1.E0"])
    compact = build_compact(_factory("mixtral"), ["L0.E1", "L1.E0"])
    with pytest.raises(ValueError, match="does not hold"):
        model_experts(compact).load_wire({"model.layers.0.mlp.experts.down_proj/E2": torch.zeros(16, 32)})
    with pytest.raises(KeyError, match="not held by this compact model"):
        mask_experts(compact, ["L0.E2", "L1.E0"])


def test_expert_train_on_a_compact_hf_model_replies_with_exactly_what_it_got(runtime_identity):
    import numpy as np
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    from fedmoe_flwr import protocol as P
    from fedmoe_flwr.client import expert_train
    from fedmoe_flwr.client.compact import model_for_message
    from fedmoe_flwr.models.slicing import from_array_record, to_array_record

    torch.manual_seed(0)
    full = _factory("mixtral")()
    layout = param_layout(full)
    keys = ["L0.E1", "L0.E4", "L1.E2"]
    sent = sub_state(to_wire(full), layout, keys)
    msg = Message(RecordDict({P.CONFIG: ConfigRecord({"server-round": 1, "experts": keys}), P.ARRAYS: to_array_record(sent)}),
                  dst_node_id=42, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = "m1"
    model = model_for_message(msg, _factory("mixtral"))
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(2))

    def train_fn(m):
        opt = torch.optim.SGD([p for p in m.parameters() if not p.is_meta], lr=0.1)
        m.train()
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        return {P.NUM_EXAMPLES: 4, P.TRAIN_LOSS: float(loss.detach())}

    reply = expert_train(msg, model, train_fn, profile={P.CLIENT_ID: "c"}, stats_inputs=ids.numpy())
    back = from_array_record(reply.content[P.ARRAYS])
    assert list(back) == list(sent) and all(back[n].shape == sent[n].shape for n in sent)
    assert any(not torch.equal(back[n], sent[n]) for n in layout.expert_params["L0.E4"]), "it trained"
    tokens = P.decode_vector(reply.content[P.REPORT][P.TOKENS], len(layout.expert_keys), missing_as_nan=False)
    held = np.array([k in keys for k in layout.expert_keys])
    assert (tokens[~held] == 0).all() and tokens[:E].sum() == tokens[E:].sum() == ids.numel()
    hist = P.decode_vector(reply.content[P.REPORT][P.HIST], len(layout.expert_keys))
    assert hist[:E].sum() == pytest.approx(1) and (hist[~held] > 0).any(), "histogram over all router rows"
