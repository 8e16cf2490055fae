"""Tiny models for the training-state tests (``training_models:NewModel`` on the command line).

``OldModel`` is the model as trained; ``NewModel`` the same computation refactored: renamed,
defined in another order, q/k/v fused into one Linear, the head kept as a transposed matrix.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from weight_mapper import MappingPlan, PlanEntry

D, D_IN, D_OUT = 8, 5, 3


class OldModel(nn.Module):
    """Separate q / k / v projections, a BatchNorm (buffers between parameters), a Linear head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(D_IN, D)
        self.q = nn.Linear(D, D)
        self.k = nn.Linear(D, D)
        self.v = nn.Linear(D, D)
        self.bn = nn.BatchNorm1d(D)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, D_OUT)

    def forward(self, x):
        h = self.embed(x)
        a = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / math.sqrt(D), -1) @ self.v(h)
        h = self.bn((h + a).transpose(1, 2)).transpose(1, 2)
        return self.head(self.norm(h)).mean(1)


class NewModel(nn.Module):
    """OldModel refactored: renamed, defined in another order, q/k/v fused, the head transposed."""

    def __init__(self):
        super().__init__()
        self.head_weight = nn.Parameter(torch.zeros(D, D_OUT))  # used as h @ W: the transpose of a Linear's
        self.head_bias = nn.Parameter(torch.zeros(D_OUT))
        self.attn = nn.ModuleDict({"qkv": nn.Linear(D, 3 * D)})
        self.stem = nn.Linear(D_IN, D)
        self.post = nn.ModuleDict({"bn": nn.BatchNorm1d(D), "ln": nn.LayerNorm(D)})

    def forward(self, x):
        h = self.stem(x)
        q, k, v = self.attn["qkv"](h).split(D, -1)
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(D), -1) @ v
        h = self.post["bn"]((h + a).transpose(1, 2)).transpose(1, 2)
        return (self.post["ln"](h) @ self.head_weight + self.head_bias).mean(1)


def entry(source, target, shape, transform=None, target_shape=None, args=None):
    source = (source,) if isinstance(source, str) else tuple(source)
    return PlanEntry(source, target, transform, 1.0, 1.0, "combined" if len(source) > 1 else "tensor",
                     tuple(shape), tuple(target_shape or shape), args=args or {})


def refactor_plan(prefix="model."):
    """The plan from OldModel's Lightning checkpoint (keys under ``model.``) onto NewModel."""
    p = prefix
    bn = [entry(p + f"bn.{leaf}", f"post.bn.{leaf}", s)
          for leaf, s in (("weight", (D,)), ("bias", (D,)), ("running_mean", (D,)), ("running_var", (D,)),
                          ("num_batches_tracked", ()))]
    return MappingPlan((
        entry(p + "head.weight", "head_weight", (D_OUT, D), "transpose", (D, D_OUT)),
        entry(p + "head.bias", "head_bias", (D_OUT,)),
        entry([p + "q.weight", p + "k.weight", p + "v.weight"], "attn.qkv.weight", (D, D), "concat",
               (3 * D, D), {"dim": 0, "sizes": [D] * 3, "source_shapes": [[D, D]] * 3}),
        entry([p + "q.bias", p + "k.bias", p + "v.bias"], "attn.qkv.bias", (D,), "concat",
               (3 * D,), {"dim": 0, "sizes": [D] * 3, "source_shapes": [[D]] * 3}),
        entry(p + "embed.weight", "stem.weight", (D, D_IN)),
        entry(p + "embed.bias", "stem.bias", (D,)),
        *bn,
        entry(p + "norm.weight", "post.ln.weight", (D,)),
        entry(p + "norm.bias", "post.ln.bias", (D,)),
    ), source_label="old.ckpt", target_label="NewModel")
