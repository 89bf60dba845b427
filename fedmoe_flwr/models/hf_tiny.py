"""Tiny random-init Hugging Face MoE models for tests and benchmarks (offline, no hub).

``hf_tiny_model("mixtral", num_experts=8)`` builds a 2-layer model whose config follows
the family's real structure at toy widths; ``size="mid"`` is a few hundred times larger
(experts of ~6 MB each, for memory benchmarks). Needs the ``hf`` extra (``pip install fedmoe-flwr[hf]``).
"""

from __future__ import annotations

import torch
from torch import nn

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "switch")
SIZES = {"tiny": dict(hidden=16, inter=32, vocab=64), "mid": dict(hidden=512, inter=1024, vocab=1024)}


def hf_tiny_config(family: str, num_experts: int = 4, top_k: int = 2, size: str = "tiny", layers: int = 2):
    """The transformers config of a tiny ``family`` model (``FAMILIES``) with ``num_experts``."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; allowed: {list(SIZES)}")
    s = SIZES[size]
    return hf_config(family, num_experts, top_k, hidden=s["hidden"], inter=s["inter"], vocab=s["vocab"], layers=layers)


def hf_config(family: str, num_experts: int, top_k: int, *, hidden: int, inter: int, vocab: int, layers: int = 2,
              heads: int = 2, kv_heads: int = 1, max_positions: int | None = None):
    """The transformers config of a ``family`` MoE at the given widths (random init, no hub)."""
    import transformers as tf  # lazy: an optional dependency

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; allowed: {list(FAMILIES)}")
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden size {hidden} must be divisible by {heads} heads, and heads by {kv_heads} kv heads")
    h, i, v = hidden, inter, vocab
    attn = dict(num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=v, hidden_size=h)
    if max_positions is not None:
        attn["max_position_embeddings"] = max_positions
    if family == "mixtral":
        return tf.MixtralConfig(**attn, intermediate_size=i, num_local_experts=num_experts, num_experts_per_tok=top_k)
    if family == "qwen2_moe":
        return tf.Qwen2MoeConfig(
            **attn, intermediate_size=i, moe_intermediate_size=i, shared_expert_intermediate_size=i,
            num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=False, decoder_sparse_step=1,
        )
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **attn, intermediate_size=i, moe_intermediate_size=i, head_dim=h // heads,
            num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=True, decoder_sparse_step=1,
        )
    if family == "olmoe":
        return tf.OlmoeConfig(
            **attn, intermediate_size=i, num_experts=num_experts, num_experts_per_tok=top_k, eos_token_id=None, pad_token_id=None
        )
    return tf.SwitchTransformersConfig(
        vocab_size=v, d_model=h, d_kv=h // heads, d_ff=i, num_layers=layers, num_decoder_layers=layers, num_heads=heads,
        num_experts=num_experts, encoder_sparse_step=1, decoder_sparse_step=1, expert_capacity=10**6,
        router_jitter_noise=0.0, dropout_rate=0.0,
    )


def hf_model_class(family: str):
    """The model class a family's config builds (``*ForCausalLM``, Switch's seq2seq model)."""
    import transformers as tf

    return {
        "mixtral": tf.MixtralForCausalLM, "qwen2_moe": tf.Qwen2MoeForCausalLM, "qwen3_moe": tf.Qwen3MoeForCausalLM,
        "olmoe": tf.OlmoeForCausalLM, "switch": tf.SwitchTransformersForConditionalGeneration,
    }[family]


def hf_tiny_model(family: str, num_experts: int = 4, top_k: int = 2, size: str = "tiny", seed: int = 0) -> nn.Module:
    """A random-init ``family`` model (``hf_tiny_config``), seeded, in eval mode."""
    torch.manual_seed(seed)
    model = hf_model_class(family)(hf_tiny_config(family, num_experts, top_k, size))
    return model.eval()


def hf_forward(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits for token ids ``[B, T]`` (Switch gets the same ids as decoder input)."""
    if type(model).__name__.startswith("SwitchTransformers"):
        return model(input_ids=ids, decoder_input_ids=ids).logits
    return model(input_ids=ids).logits
