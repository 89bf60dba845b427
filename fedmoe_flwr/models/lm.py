"""A small decoder-only causal transformer whose feed-forward blocks are MoE layers.

nanoGPT-shaped: token + position embeddings -> n_layer pre-LN blocks
(causal self-attention, then an MoE feed-forward) -> LayerNorm -> logits over the vocab.
Block ``i``'s MoE is MoE layer ``i`` in expert keys. No weight tying (each state_dict name
is one tensor, which keeps slicing and transfer simple) and no dropout.

Letters: B batch, T time (<= block_size), C d_model, H heads, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedmoe_flwr.models.moe import make_ffn


@dataclass
class MoELMConfig:
    vocab_size: int = 80
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    d_hidden: int = 128
    num_experts: int = 8
    top_k: int = 1
    shared_expert: bool = False
    dense: bool = False


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: MoELMConfig):
        super().__init__()
        if cfg.d_model % cfg.n_head != 0:
            raise ValueError(f"d_model={cfg.d_model} must be divisible by n_head={cfg.n_head}")
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x [B, T, C]
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, C/H]
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # [B, T, C]
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, cfg: MoELMConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ffn = make_ffn(
            cfg.d_model, cfg.d_hidden, cfg.num_experts, cfg.top_k, cfg.shared_expert, cfg.dense
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))  # [B, T, C]
        x = x + self.ffn(self.ln2(x))  # MoE sees B*T tokens
        return x


class MoELM(nn.Module):
    def __init__(self, cfg: MoELMConfig):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        for emb in (self.tok_emb, self.pos_emb):
            nn.init.normal_(emb.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} > block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)  # [B, T, C]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # [B, T, V]
