"""Reference implementations that compute what a Hugging Face model does, under other layouts.

Each is the same math as its Hugging Face counterpart, so converting the weights must give
identical outputs; the layouts differ in ways a rename alone cannot bridge (fused q/k/v,
transposed Conv1D weights, stacked experts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TorchBert(nn.Module):
    """BERT's encoder on ``nn.TransformerEncoderLayer``: q/k/v fused into ``in_proj_weight``."""

    def __init__(self, vocab, dim, heads, ffn, layers, max_pos, type_vocab=2, eps=1e-12):
        super().__init__()
        self.word = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(max_pos, dim)
        self.token_type = nn.Embedding(type_vocab, dim)
        self.embed_norm = nn.LayerNorm(dim, eps=eps)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, ffn, dropout=0.0, activation="gelu", batch_first=True,
                                       layer_norm_eps=eps)
            for _ in range(layers)
        )

    def forward(self, ids):
        pos = torch.arange(ids.shape[1])
        x = self.embed_norm(self.word(ids) + self.position(pos)[None] + self.token_type(torch.zeros_like(ids)))
        for layer in self.layers:
            x = layer(x)
        return x


class LinearGPT2(nn.Module):
    """GPT-2 with ``nn.Linear`` layers ([out, in] weights) instead of HF's ``Conv1D`` ([in, out])."""

    def __init__(self, vocab, dim, heads, layers, max_pos, eps=1e-5):
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_pos, dim)
        self.blocks = nn.ModuleList(_GPT2Block(dim, heads, eps) for _ in range(layers))
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))[None]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class _GPT2Block(nn.Module):
    def __init__(self, dim, heads, eps):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.fc_in = nn.Linear(dim, 4 * dim)
        self.fc_out = nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.fc_out(F.gelu(self.fc_in(self.norm2(x)), approximate="tanh"))


class ExpertList(nn.Module):
    """A Mixtral-style sparse MoE block: a router and a ModuleList of SwiGLU experts."""

    def __init__(self, dim, hidden, n_experts, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(dim, n_experts, bias=False)
        self.experts = nn.ModuleList(_Expert(dim, hidden) for _ in range(n_experts))

    def forward(self, x):
        weights, chosen = torch.topk(self.gate(x).softmax(-1), self.top_k, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            w = (weights * (chosen == e)).sum(-1, keepdim=True)
            out = out + w * expert(x)
        return out


class _Expert(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class FusedExperts(nn.Module):
    """The MoE block as transformers 5 stores it: ``gate_up_proj`` ``[E, 2H, D]`` (every expert's
    ``w1`` then its ``w3``) and ``down_proj`` ``[E, D, H]``."""

    def __init__(self, dim, hidden, n_experts, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.gate_up_proj = nn.Parameter(torch.randn(n_experts, 2 * hidden, dim) * 0.1)
        self.down_proj = nn.Parameter(torch.randn(n_experts, dim, hidden) * 0.1)

    def forward(self, x):
        weights, chosen = torch.topk(self.router(x).softmax(-1), self.top_k, dim=-1)
        out = torch.zeros_like(x)
        for e in range(self.gate_up_proj.shape[0]):
            w = (weights * (chosen == e)).sum(-1, keepdim=True)
            gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
            out = out + w * F.linear(F.silu(gate) * up, self.down_proj[e])
        return out


class StackedExperts(nn.Module):
    """The same MoE block with every expert's weights stacked into 3-D tensors."""

    def __init__(self, dim, hidden, n_experts, top_k=2):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        for p in (self.w1, self.w2, self.w3):
            nn.init.normal_(p, std=0.1)

    def forward(self, x):
        weights, chosen = torch.topk(self.router(x).softmax(-1), self.top_k, dim=-1)
        out = torch.zeros_like(x)
        for e in range(self.w1.shape[0]):
            w = (weights * (chosen == e)).sum(-1, keepdim=True)
            h = F.silu(x @ self.w1[e].T) * (x @ self.w3[e].T)
            out = out + w * (h @ self.w2[e].T)
        return out
