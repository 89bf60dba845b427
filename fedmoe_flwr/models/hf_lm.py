"""A Hugging Face MoE language model as fedmoe_flwr's shipped models are: ``model(ids) -> logits``.

``model=hf`` in ``run.py`` builds one: a transformers MoE family (Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE, SwitchTransformers) at the configured widths with random init, or
``from_pretrained`` on a local directory written by ``save_pretrained`` (``model.pretrained``;
for a hub checkpoint, download it once with ``huggingface-cli download`` and point there).
:class:`HFCausalLM` wraps it so that training, evaluation and routing statistics treat it as
the shipped LM: token ids ``[B, T]`` in, logits ``[B, T, V]`` out. The expert adapters find
its MoE blocks (:mod:`fedmoe_flwr.models.adapters.hf`); fused expert tensors travel per
expert on the wire. Needs the ``hf`` extra.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedmoe_flwr.models.adapters import DENSE_ATTR
from fedmoe_flwr.models.hf_tiny import FAMILIES, hf_config, hf_model_class


class HFCausalLM(nn.Module):
    """``forward(ids [B, T]) -> logits [B, T, V]`` over a transformers model (``.hf``)."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf
        self.seq2seq = bool(getattr(hf.config, "is_encoder_decoder", False))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.seq2seq:  # the decoder reads the same ids: a causal LM over the decoder
            return self.hf(input_ids=idx, decoder_input_ids=idx).logits
        return self.hf(input_ids=idx).logits


def build_hf_lm(family: str, vocab_size: int, *, d_model: int, d_hidden: int, n_layer: int, n_head: int,
                num_experts: int, top_k: int, block_size: int, pretrained: str = "", dense: bool = False,
                weights: bool = True) -> HFCausalLM:
    """The ``model=hf`` model (see the module doc); ``dense``: its one-expert twin, trained whole.

    The dense twin is the family's dense sibling (Mistral, Qwen2, Qwen3, OLMo, T5) with a
    feed-forward of width ``top_k * d_hidden`` (the MoE's active width), marked dense;
    with ``pretrained``, the directory must hold that sibling's checkpoint. ``pretrained`` takes its sizes from the checkpoint;
    ``weights=False`` builds its architecture only (compact clients receive every tensor).
    Raises ValueError on an unknown family, a missing directory, or a vocabulary smaller
    than the data's.
    """
    if family not in FAMILIES:
        raise ValueError(f"model.family={family!r} is not one of {list(FAMILIES)}")
    cls = hf_model_class(family)
    if pretrained:
        path = Path(pretrained)
        if not (path / "config.json").is_file():
            raise ValueError(f"model.pretrained={pretrained!r}: no config.json there; give a directory written by "
                             "save_pretrained (download a hub checkpoint first, e.g. huggingface-cli download)")
        if dense:  # the dense baseline's own checkpoint (its family's dense sibling)
            import transformers as tf

            cls = getattr(tf, DENSE_SIBLINGS[family][1])
        if weights:
            hf = cls.from_pretrained(str(path), dtype=torch.float32)
        else:
            hf = cls(cls.config_class.from_pretrained(str(path)))
        vocab = hf.config.vocab_size
        if vocab < vocab_size:
            raise ValueError(f"model.pretrained={pretrained!r} has a vocabulary of {vocab} < the data's {vocab_size}")
    elif dense:
        hf = dense_twin(family, hidden=d_model, inter=top_k * d_hidden, vocab=vocab_size, layers=n_layer, heads=n_head,
                        max_positions=block_size)
    else:
        config = hf_config(family, num_experts, top_k, hidden=d_model, inter=d_hidden, vocab=vocab_size, layers=n_layer,
                           heads=n_head, kv_heads=n_head, max_positions=block_size)
        hf = cls(config)
    model = HFCausalLM(hf.train())
    if dense:
        setattr(model, DENSE_ATTR, True)
    return model


DENSE_SIBLINGS = {
    "mixtral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2_moe": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3_moe": ("Qwen3Config", "Qwen3ForCausalLM"),
    "olmoe": ("OlmoConfig", "OlmoForCausalLM"),
    "switch": ("T5Config", "T5ForConditionalGeneration"),
}
"""The dense architecture each MoE family is built on (the ``strategy=dense`` baseline)."""


def dense_twin(family: str, *, hidden: int, inter: int, vocab: int, layers: int, heads: int, max_positions: int) -> nn.Module:
    """A random-init dense sibling of ``family`` (no experts) at the given widths."""
    import transformers as tf

    config_name, model_name = DENSE_SIBLINGS[family]
    config_cls, model_cls = getattr(tf, config_name), getattr(tf, model_name)
    if family == "switch":
        config = config_cls(vocab_size=vocab, d_model=hidden, d_kv=hidden // heads, d_ff=inter, num_layers=layers,
                            num_decoder_layers=layers, num_heads=heads, dropout_rate=0.0)
    else:
        extra = {"head_dim": hidden // heads} if family == "qwen3_moe" else {}
        if family == "olmoe":
            extra.update(eos_token_id=None, pad_token_id=None)
        config = config_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                            num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
                            **extra)
    return model_cls(config)
