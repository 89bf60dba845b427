"""The user's own model, data and training code: a Hugging Face Mixtral on Shakespeare roles.

The model is ``transformers``' ``MixtralForCausalLM`` at toy widths (random init; swap in
``MixtralForCausalLM.from_pretrained(path)`` for a checkpoint). transformers 5.x stores a
layer's experts fused in one ``[E, ...]`` tensor; fedmoe_flwr recognises the Mixtral block,
sends each node only its experts' rows, and aggregates per row (docs/models.md#adapters).
The data: next-character prediction, one node per (play, role) of Shakespeare's plays
(LEAF's 80-character alphabet plus "unknown"; a character's index is its token id).
"""

import numpy as np
import torch
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM

from fedmoe_flwr.data import load_federated

SEQ_LEN, VOCAB = 16, 81
CONFIG = MixtralConfig(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
)


def Net() -> nn.Module:
    """A tiny random-init Mixtral (2 layers x 4 experts, top-2)."""
    return MixtralForCausalLM(CONFIG)


def _data(num_partitions: int):
    return load_federated("shakespeare", num_clients=num_partitions, partitioner="natural", seed=0,
                          max_train_samples=300 * num_partitions, seq_len=SEQ_LEN, max_test_samples=512)


def load_data(partition_id: int, num_partitions: int) -> tuple[np.ndarray, np.ndarray]:
    """This role's training windows and held-out windows, as token ids ``[n, SEQ_LEN + 1]``."""
    data = _data(num_partitions)
    return tuple(np.concatenate([x, y[:, None]], axis=1) for x, y in (data.client_train(partition_id),
                                                                      data.client_holdout(partition_id)))


def load_test_data(num_partitions: int) -> np.ndarray:
    """The server's held-out windows (other roles' text)."""
    x, y = _data(num_partitions).test
    return np.concatenate([x, y[:, None]], axis=1)


def train(net: nn.Module, ids: np.ndarray, epochs: int, lr: float, batch_size: int = 32) -> dict:
    """Local AdamW on the causal LM loss; returns the mean loss and the windows trained on."""
    net.train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(len(ids))
    total, batches = 0.0, 0
    for _ in range(epochs):
        for idx in torch.randperm(len(ids), generator=gen).split(batch_size):
            batch = torch.from_numpy(ids[idx.numpy()])
            loss = net(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, batches = total + loss.item(), batches + 1
    return {"train-loss": total / max(batches, 1), "num-examples": len(ids)}


@torch.no_grad()
def test(net: nn.Module, ids: np.ndarray) -> tuple[float, int, dict]:
    """(causal LM loss, windows, {"accuracy": next-character accuracy at the last position})."""
    net.eval()
    batch = torch.from_numpy(ids)
    out = net(input_ids=batch, labels=batch)
    accuracy = float((out.logits[:, -2].argmax(-1) == batch[:, -1]).float().mean())
    return float(out.loss), len(ids), {"accuracy": accuracy}
