"""The contract between a user's own functions and the client helper, and what the server
makes of their replies: train/evaluate returns, capacities, user metrics, a run where every
client fails. The model is a user's small MoE (not from fedmoe_flwr's zoo)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedmoe_flwr import protocol as P
from fedmoe_flwr.client import expert_evaluate, expert_probe, expert_train, node_profile
from fedmoe_flwr.models import MoELayer, param_layout, to_array_record
from fedmoe_flwr.recording import record_run
from fedmoe_flwr.sim import LocalGrid
from fedmoe_flwr.strategies import AlignedStrategy

NUM_EXPERTS = 4


def read_rows(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.moe = MoELayer(16, 8, num_experts=4)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.out(h + self.moe(h))


@pytest.fixture
def runtime_identity():
    """Messages take their run id from the process's task identity (Flower's runtime sets it)."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def _message(kind: str, keys: list[str]) -> Message:
    torch.manual_seed(0)
    model = TinyNet()
    layout = param_layout(model)
    state = {n: t for n, t in model.state_dict().items() if n in set(layout.param_names(keys))}
    content = RecordDict({P.ARRAYS: to_array_record(state), P.CONFIG: ConfigRecord({"experts": keys, "server-round": 1})})
    msg = Message(content, dst_node_id=5, message_type=kind)
    msg.metadata.__dict__["_message_id"] = "m1"
    return msg


def _xy(n: int):
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _sgd(model, x, y, epochs: int = 2, batch: int = 10) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(epochs):
        for i in range(0, len(x), batch):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[i:i + batch]), y[i:i + batch])
            loss.backward()
            opt.step()
    return float(loss.detach())


def test_a_float_returning_train_function_reports_the_samples_it_trained_and_its_loss(runtime_identity):
    x, y = _xy(30)
    seen = []
    reply = expert_train(_message(MessageType.TRAIN, ["L0.E1"]), TinyNet(), lambda m: seen.append(_sgd(m, x, y)) or seen[-1])
    report = P.decode_report(reply.content, NUM_EXPERTS)
    assert report.num_examples == 2 * 30, "samples seen over both epochs, not int(loss)"
    assert report.train_loss == pytest.approx(seen[0]) and report.train_loss != -1.0
    assert set(reply.content[P.REPORT]) <= P.REPORT_KEYS, "no metrics of the user's, no placeholders"


@pytest.mark.parametrize("returned, n, loss", [((0.5, 7), 7, 0.5), (12, 12, None), ({"num-examples": 9, "train-loss": 0.25}, 9, 0.25)])
def test_the_other_train_returns_give_their_own_number_of_examples(runtime_identity, returned, n, loss):
    x, y = _xy(20)

    def fit(m):
        _sgd(m, x, y, epochs=1)
        return returned

    report = P.decode_report(expert_train(_message(MessageType.TRAIN, ["L0.E0"]), TinyNet(), fit).content, NUM_EXPERTS)
    assert report.num_examples == n
    assert (math.isnan(report.train_loss) if loss is None else report.train_loss == pytest.approx(loss))


@pytest.mark.parametrize("bad", [None, "0.3", [0.3, 2], True, (0.3, 2, 1)])
def test_an_unknown_train_return_is_a_type_error(runtime_identity, bad):
    with pytest.raises(TypeError, match="train_fn returned"):
        expert_train(_message(MessageType.TRAIN, ["L0.E0"]), TinyNet(), lambda m: bad)


_loss = st.floats(min_value=0, max_value=1e6, allow_nan=False)
_count = st.integers(min_value=1, max_value=10**9)


@settings(max_examples=200, deadline=None)
@given(_loss, _count, st.floats(min_value=0, max_value=1), st.sampled_from([int, np.int64, np.int32]))
def test_train_and_eval_returns_decode_to_what_they_mean(loss, n, accuracy, int_type):
    from fedmoe_flwr.client.helper import _eval_result, _train_result

    counted = 17
    assert _train_result(loss, counted)[P.NUM_EXAMPLES] == counted, "a float loss is never a count"
    assert _train_result(np.float32(loss), counted)[P.TRAIN_LOSS] == pytest.approx(float(np.float32(loss)))
    assert _train_result((loss, int_type(n)), counted)[P.NUM_EXAMPLES] == n
    assert _train_result(int_type(n), counted)[P.NUM_EXAMPLES] == n
    assert _eval_result((loss, int_type(n))) == (n, {"loss": loss})
    assert _eval_result((loss, accuracy)) == (None, {"loss": loss, "accuracy": accuracy}), "a float is an accuracy"
    assert _eval_result((loss, int_type(n), {"f1": accuracy})) == (n, {"loss": loss, "f1": accuracy})
    assert _eval_result({"loss": loss, P.NUM_EXAMPLES: int_type(n)}) == (n, {"loss": loss})


def test_a_stock_test_function_returning_loss_and_accuracy_evaluates_unchanged(runtime_identity):
    x, y = _xy(25)

    def stock_test(model):  # Flower's template: (loss, accuracy)
        out = model(x)
        return float(nn.functional.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())

    msg = _message(MessageType.EVALUATE, ["L0.E0", "L0.E2"])
    metrics = expert_evaluate(msg, TinyNet(), stock_test).content[P.METRICS]
    assert metrics[P.NUM_EXAMPLES] == 25, "counted from the samples the model saw, not int(accuracy)"
    assert 0 <= metrics["accuracy"] <= 1 and metrics["loss"] > 0
    assert expert_evaluate(msg, TinyNet(), lambda m: (0.4, 11)).content[P.METRICS][P.NUM_EXAMPLES] == 11
    with_extra = expert_evaluate(msg, TinyNet(), lambda m: (0.4, 11, {"f1": 0.7})).content[P.METRICS]
    assert with_extra["f1"] == pytest.approx(0.7) and with_extra[P.NUM_EXAMPLES] == 11
    with pytest.raises(TypeError, match="eval_fn returned"):
        expert_evaluate(msg, TinyNet(), lambda m: "good")
    with pytest.raises(ValueError, match="no samples"):
        expert_evaluate(msg, TinyNet(), lambda m: 0.4)  # nothing ran through the model, nothing declared


def test_the_evaluated_model_holds_only_the_assigned_experts(runtime_identity):
    from fedmoe_flwr.models import active_expert_keys

    held = []
    expert_evaluate(_message(MessageType.EVALUATE, ["L0.E3"]), TinyNet(), lambda m: held.append(active_expert_keys(m)) or 0.1,
                    num_examples=4)
    assert held == [["L0.E3"]]


def test_capacity_fn_fills_in_what_a_node_does_not_declare():
    model = TinyNet()
    layout = param_layout(model)
    e = layout.expert_nbytes("L0.E0")
    ctx = lambda nc: Context(run_id=1, node_id=9, node_config=nc, state=RecordDict(), run_config={})
    fleet = lambda c: {"max-experts": 1 + c.node_config["partition-id"] % 4}
    assert node_profile(ctx({"partition-id": 2}), model, capacity_fn=fleet).expert_memory_bytes == 3 * e
    assert node_profile(ctx({"partition-id": 2}), model, capacity_fn=lambda c: 2).expert_memory_bytes == 2 * e
    own = {"partition-id": 2, "memory-mb": (layout.shared_nbytes + e) / 2**20}
    assert node_profile(ctx(own), model, capacity_fn=fleet).expert_memory_bytes == e, "the node's memory-mb wins whole"
    assert node_profile(ctx({"partition-id": 2, "max-experts": 4}), model, capacity_fn=fleet).expert_memory_bytes == 4 * e
    assert node_profile(ctx({"partition-id": 2, "num-examples": 40}), model).num_examples == 40
    with pytest.raises(TypeError, match="capacity_fn returned"):
        node_profile(ctx({"partition-id": 2}), model, capacity_fn=lambda c: "2")


# ------------------------------------------------------------------------ metrics and failures
def _tiny_client_app(fit_result=None, fail: bool = False) -> ClientApp:
    """A user's ClientApp on TinyNet; ``fit_result(loss)`` shapes the train return."""
    app = ClientApp()

    def data(context):
        return _xy(20 + int(context.node_config["partition-id"]))

    @app.train()
    def train(msg, context):
        if fail:
            raise RuntimeError("the user's training crashed")
        x, y = data(context)
        return expert_train(msg, TinyNet(), lambda m: fit_result(_sgd(m, x, y, epochs=1), len(x)))

    @app.query()
    def query(msg, context):
        model = TinyNet()
        return expert_probe(msg, model, profile=node_profile(context, model, capacity_fn=lambda c: 2), stats_inputs=data(context)[0].numpy())

    return app


def _start(app: ClientApp, out: Path, rounds: int = 2):
    torch.manual_seed(0)
    model = TinyNet()
    # pace_margin=0: these replies carry measured wall-clock times, and a paced close would drop
    # a reply slowed by a loaded machine; the tests here are about metrics, not pacing
    strategy = record_run(AlignedStrategy(param_layout(model), fraction_train=1.0, fraction_evaluate=0.0, pace_margin=0.0),
                          out)
    result = strategy.start(grid=LocalGrid(app, 4, seed=0), initial_arrays=to_array_record(model.state_dict()),
                            num_rounds=rounds, train_config=ConfigRecord({"lr": 0.1}))
    return strategy, result


def test_user_metrics_reach_the_aggregated_train_metrics_and_server_figures_stay_apart(tmp_path):
    app = _tiny_client_app(lambda loss, n: {"train-loss": loss, "grad-steps": 2.0, "num-examples": n})
    strategy, result = _start(app, tmp_path)
    for rnd in (1, 2):
        client = dict(result.train_metrics_clientapp[rnd])
        assert client["grad-steps"] == pytest.approx(2.0) and client["train_loss"] > 0
        assert not {"bytes_total", "solve_time_s", "num_aggregated"} & set(client), "server-side figures kept apart"
    assert strategy.last.metrics["num_aggregated"] == 4
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [r["grad-steps"] for r in rows[1:]] == [2.0, 2.0] and all(r["bytes_total"] > 0 for r in rows[1:])


def test_a_user_app_whose_every_client_fails_raises_after_recording(tmp_path):
    with pytest.raises(RuntimeError, match="no round aggregated any update"):
        _start(_tiny_client_app(fail=True), tmp_path)
    rows = read_rows(tmp_path / "metrics.jsonl")
    assert [r["num_aggregated"] for r in rows[1:]] == [0, 0]
    assert (tmp_path / "summary.json").exists()
