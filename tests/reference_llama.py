"""Llama decoders under torchtune's and Meta's module names, computing what HF's LlamaForCausalLM does.

torchtune itself uses interleaved rotary embeddings and converts checkpoints by permuting the
q/k weights; :class:`TransformerDecoder` keeps Hugging Face's rotate-half convention by default
so that the two models are the *same math* under different names, and a 1:1 mapping converts
one into the other exactly. ``TransformerDecoder(..., interleaved=True)`` rotates interleaved
pairs as torchtune does, and :class:`MetaTransformer` is Meta's reference layout (``attention.wq``,
``feed_forward.w1``, complex ``freqs_cis``): both need the q/k rows permuted to match HF.
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


def _rotate_interleaved(x, cos, sin):
    """Rotate the pairs (x0, x1), (x2, x3), ... (torchtune's RotaryPositionalEmbeddings)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, theta: float, interleaved: bool = False):
        super().__init__()
        self.interleaved = interleaved
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
        if self.interleaved:
            q, k = _rotate_interleaved(q, freqs.cos(), freqs.sin()), _rotate_interleaved(k, freqs.cos(), freqs.sin())
            return self._attend(q, k, v, b, t)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return self._attend(q, k, v, b, t)

    def _attend(self, q, k, v, b, t):
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
    def __init__(self, dim, hidden, n_heads, n_kv_heads, eps, theta, interleaved=False):
        super().__init__()
        self.sa_norm = RMSNorm(dim, eps)
        self.attn = Attention(dim, n_heads, n_kv_heads, theta, interleaved)
        self.mlp_norm = RMSNorm(dim, eps)
        self.mlp = FeedForward(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.sa_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TransformerDecoder(nn.Module):
    """torchtune's names: tok_embeddings, layers.N.{sa_norm, attn, mlp_norm, mlp}, norm, output."""

    def __init__(self, vocab, dim, hidden, n_layers, n_heads, n_kv_heads, eps=1e-6, theta=10000.0, *,
                 interleaved=False):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(
            TransformerSelfAttentionLayer(dim, hidden, n_heads, n_kv_heads, eps, theta, interleaved)
            for _ in range(n_layers)
        )
        self.norm = RMSNorm(dim, eps)
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.output(self.norm(x))


class MetaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


class MetaAttention(nn.Module):
    """Meta's reference attention: wq/wk/wv/wo, rotary on complex interleaved pairs."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.n_local_heads, self.n_local_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x, freqs_cis):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_local_heads, self.head_dim)
        k = self.wk(x).view(b, t, self.n_local_kv_heads, self.head_dim)
        v = self.wv(x).view(b, t, self.n_local_kv_heads, self.head_dim)
        q_ = torch.view_as_complex(q.float().reshape(b, t, self.n_local_heads, -1, 2))
        k_ = torch.view_as_complex(k.float().reshape(b, t, self.n_local_kv_heads, -1, 2))
        f = freqs_cis[:t].view(1, t, 1, -1)
        q = torch.view_as_real(q_ * f).flatten(3).type_as(x).transpose(1, 2)
        k = torch.view_as_real(k_ * f).flatten(3).type_as(x).transpose(1, 2)
        rep = self.n_local_heads // self.n_local_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.transpose(1, 2).repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class MetaFeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MetaBlock(nn.Module):
    def __init__(self, dim, hidden, n_heads, n_kv_heads, eps):
        super().__init__()
        self.attention = MetaAttention(dim, n_heads, n_kv_heads)
        self.feed_forward = MetaFeedForward(dim, hidden)
        self.attention_norm = MetaRMSNorm(dim, eps)
        self.ffn_norm = MetaRMSNorm(dim, eps)

    def forward(self, x, freqs_cis):
        h = x + self.attention(self.attention_norm(x), freqs_cis)
        return h + self.feed_forward(self.ffn_norm(h))


class MetaTransformer(nn.Module):
    """Meta's reference Llama layout: tok_embeddings, layers.N.{attention.wq.., feed_forward.w1..}, norm, output."""

    def __init__(self, vocab, dim, hidden, n_layers, n_heads, n_kv_heads, eps=1e-6, theta=10000.0, max_seq=64):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(MetaBlock(dim, hidden, n_heads, n_kv_heads, eps) for _ in range(n_layers))
        self.norm = MetaRMSNorm(dim, eps)
        self.output = nn.Linear(dim, vocab, bias=False)
        head_dim = dim // n_heads
        freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
        angles = torch.outer(torch.arange(max_seq, dtype=torch.float), freqs)
        self.freqs_cis = torch.polar(torch.ones_like(angles), angles)  # a plain attribute, as in Meta's code

    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, self.freqs_cis)
        return self.output(self.norm(h))


def hf_to_meta_truth(n_layers: int) -> dict[str, str]:
    """HF LlamaForCausalLM key -> Meta reference key (the q/k rows also need the rotary permutation)."""
    truth = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {
        "self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
        "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.o_proj.weight": "attention.wo.weight",
        "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.down_proj.weight": "feed_forward.w2.weight",
        "mlp.up_proj.weight": "feed_forward.w3.weight", "input_layernorm.weight": "attention_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
    }
    for i in range(n_layers):
        truth.update({f"model.layers.{i}.{k}": f"layers.{i}.{v}" for k, v in per_layer.items()})
    return truth


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
