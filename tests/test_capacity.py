"""The capacity gate's verdict and its pooled data."""

import math

import numpy as np

from fedmoe_flwr.bench.capacity import gate_verdict, pooled_train


def _models(small_acc, small_loss, large_acc, large_loss):
    final = lambda acc, loss: {"accuracy": acc, "test_loss": loss, "perplexity": math.exp(loss)}  # noqa: E731
    return {"dense-small": {"final": final(small_acc, small_loss)}, "dense-large": {"final": final(large_acc, large_loss)}}


def test_gate_passes_on_five_points_or_ten_percent_perplexity_only():
    assert gate_verdict(_models(0.70, 1.0, 0.75, 1.0))["passes"]  # 5 points
    assert gate_verdict(_models(0.70, 1.0 + math.log(1.1), 0.70, 1.0))["passes"]  # x1.10 perplexity
    assert not gate_verdict(_models(0.71, 1.09, 0.75, 1.0))["passes"]  # 4 points, x1.094
    assert not gate_verdict(_models(0.80, 1.0, 0.75, 1.2))["passes"]  # the small model is better


class _Data:
    num_clients = 3

    def client_train(self, i):
        x = np.full((5 + i, 4), 10 * i, dtype=np.int64)
        return x, np.arange(len(x))


def test_pooled_train_concatenates_capped_clients_and_packs_token_ids():
    x, y = pooled_train(_Data(), max_per_client=6)
    assert len(x) == 5 + 6 + 6 and len(y) == len(x)
    assert x.dtype == np.uint8 and sorted(set(x[:, 0].tolist())) == [0, 10, 20]
