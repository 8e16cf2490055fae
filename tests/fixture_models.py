"""Tiny fixture models, each named after the one problem it poses to the matcher."""

from __future__ import annotations

import torch
from torch import nn


class OldModel(nn.Module):
    """The reference design's example: backbone + classifier."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3))
        self.classifier = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        x = self.backbone(x).mean((2, 3))
        return self.classifier(x)


class NewModel(nn.Module):
    """OldModel renamed: feature_extractor + head."""

    def __init__(self):
        super().__init__()
        self.feature_extractor = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3))
        self.head = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        x = self.feature_extractor(x).mean((2, 3))
        return self.head(x)


class BatchNormed(nn.Module):
    """Conv/BN stack: running stats must travel with their layer."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class BatchNormedRenamed(nn.Module):
    """BatchNormed with its layers regrouped into named blocks."""

    def __init__(self):
        super().__init__()
        self.stem = nn.ModuleDict({"conv": nn.Conv2d(3, 8, 3, padding=1, bias=False), "norm": nn.BatchNorm2d(8)})
        self.block = nn.ModuleDict({"conv": nn.Conv2d(8, 8, 3, padding=1, bias=False), "norm": nn.BatchNorm2d(8)})
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.stem["norm"](self.stem["conv"](x)))
        x = torch.relu(self.block["norm"](self.block["conv"](x)))
        return self.head(x.mean((2, 3)))


class Reordered(nn.Module):
    """Three same-shaped layers defined in a different order from the one they run in."""

    def __init__(self):
        super().__init__()
        self.third = nn.Linear(6, 6)
        self.first = nn.Linear(6, 6)
        self.second = nn.Linear(6, 6)

    def forward(self, x):
        return self.third(torch.tanh(self.second(torch.tanh(self.first(x)))))


class InOrder(nn.Module):
    """Reordered's layers defined in execution order, under positional names."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(6, 6) for _ in range(3))

    def forward(self, x):
        x = torch.tanh(self.layers[0](x))
        x = torch.tanh(self.layers[1](x))
        return self.layers[2](x)


class Tied(nn.Module):
    """An embedding and an output head sharing one weight."""

    def __init__(self, vocab: int = 11, dim: int = 6):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.proj(self.embed(ids))))


class TiedRenamed(nn.Module):
    """Tied with other names."""

    def __init__(self, vocab: int = 11, dim: int = 6):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.output = nn.Linear(dim, vocab, bias=False)
        self.output.weight = self.tok_embeddings.weight

    def forward(self, ids):
        return self.output(torch.tanh(self.hidden(self.tok_embeddings(ids))))


class PartiallyCompatible(nn.Module):
    """A conv that lost its bias and a new layer the source never had."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 16, 3, bias=False), nn.ReLU(), nn.Conv2d(16, 32, 3))
        self.classifier = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
        self.extra = nn.Linear(10, 3)


class Conv1D(nn.Module):
    """GPT-2 style linear layer that stores its weight as [in, out]."""

    def __init__(self, nx: int, nf: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


class Transposed(nn.Module):
    """Conv1D layers whose weights must be transposed to fill nn.Linear."""

    def __init__(self):
        super().__init__()
        self.c_fc = Conv1D(4, 7)
        self.c_proj = Conv1D(7, 3)

    def forward(self, x):
        return self.c_proj(torch.relu(self.c_fc(x)))


class TransposedTarget(nn.Module):
    """Transposed's layers as nn.Linear."""

    def __init__(self):
        super().__init__()
        self.fc_in = nn.Linear(4, 7)
        self.fc_out = nn.Linear(7, 3)

    def forward(self, x):
        return self.fc_out(torch.relu(self.fc_in(x)))


class EncoderDecoder(nn.Module):
    """Same-shaped encoder and decoder layers: only the rules may keep them apart."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(5, 5)
        self.decoder = nn.Linear(5, 5)
