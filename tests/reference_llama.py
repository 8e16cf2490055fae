"""A Llama decoder written under torchtune's module names, computing what HF's LlamaForCausalLM does.

torchtune itself uses interleaved rotary embeddings and converts checkpoints by permuting the
q/k weights; this file keeps Hugging Face's rotate-half convention so that the two models are
the *same math* under different names, and a 1:1 mapping converts one into the other exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.scale * x.to(dtype)


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, theta: float):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.output_proj = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        freqs = torch.outer(torch.arange(t, dtype=torch.float), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.output_proj(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerSelfAttentionLayer(nn.Module):
    def __init__(self, dim, hidden, n_heads, n_kv_heads, eps, theta):
        super().__init__()
        self.sa_norm = RMSNorm(dim, eps)
        self.attn = Attention(dim, n_heads, n_kv_heads, theta)
        self.mlp_norm = RMSNorm(dim, eps)
        self.mlp = FeedForward(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.sa_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TransformerDecoder(nn.Module):
    """torchtune's names: tok_embeddings, layers.N.{sa_norm, attn, mlp_norm, mlp}, norm, output."""

    def __init__(self, vocab, dim, hidden, n_layers, n_heads, n_kv_heads, eps=1e-6, theta=10000.0):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(
            TransformerSelfAttentionLayer(dim, hidden, n_heads, n_kv_heads, eps, theta) for _ in range(n_layers)
        )
        self.norm = RMSNorm(dim, eps)
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.output(self.norm(x))


def hf_to_tune_truth(n_layers: int) -> dict[str, str]:
    """The ground truth, as data: HF LlamaForCausalLM key -> torchtune-style key."""
    truth = {
        "model.embed_tokens.weight": "tok_embeddings.weight",
        "model.norm.weight": "norm.scale",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "self_attn.q_proj.weight": "attn.q_proj.weight",
        "self_attn.k_proj.weight": "attn.k_proj.weight",
        "self_attn.v_proj.weight": "attn.v_proj.weight",
        "self_attn.o_proj.weight": "attn.output_proj.weight",
        "mlp.gate_proj.weight": "mlp.w1.weight",
        "mlp.down_proj.weight": "mlp.w2.weight",
        "mlp.up_proj.weight": "mlp.w3.weight",
        "input_layernorm.weight": "sa_norm.scale",
        "post_attention_layernorm.weight": "mlp_norm.scale",
    }
    for i in range(n_layers):
        truth.update({f"model.layers.{i}.{k}": f"layers.{i}.{v}" for k, v in per_layer.items()})
    return truth
