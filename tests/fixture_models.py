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


def _conv_bn(c_in: int, c_out: int, k: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers, nn.ReLU()) if act else nn.Sequential(*layers)


class ShortcutFirst(nn.Module):
    """RegNet as torchvision writes it: each stage's shortcut ``proj`` defined and run first.

    ``proj`` and the residual branch's first conv ``f.a`` have the same shape; only the data
    flow tells them apart (``f.a`` feeds ``f.b``, ``proj`` feeds the sum).
    """

    class Block(nn.Module):
        def __init__(self, c_in: int, c_out: int):
            super().__init__()
            self.proj = _conv_bn(c_in, c_out, act=False) if c_in != c_out else None
            self.f = nn.Module()
            self.f.a = _conv_bn(c_in, c_out)
            self.f.b = _conv_bn(c_out, c_out, 3)
            self.f.c = _conv_bn(c_out, c_out, act=False)

        def forward(self, x):
            shortcut = self.proj(x) if self.proj is not None else x
            return torch.relu(shortcut + self.f.c(self.f.b(self.f.a(x))))

    def __init__(self, widths=(4, 8, 12)):
        super().__init__()
        self.stem = _conv_bn(3, widths[0], 3)
        self.trunk = nn.Sequential()
        for s, (c_in, c_out) in enumerate(zip(widths, widths[1:]), start=1):
            self.trunk.add_module(f"block{s}", nn.Sequential(*(
                self.Block(c_in if i == 0 else c_out, c_out) for i in range(2)
            )))

    def forward(self, x):
        return self.trunk(self.stem(x)).mean((2, 3))


class ShortcutLast(nn.Module):
    """RegNet as timm writes it: ``conv1..conv3`` first, the shortcut ``downsample`` last."""

    class Block(nn.Module):
        def __init__(self, c_in: int, c_out: int):
            super().__init__()
            self.conv1 = _conv_bn(c_in, c_out)
            self.conv2 = _conv_bn(c_out, c_out, 3)
            self.conv3 = _conv_bn(c_out, c_out, act=False)
            self.downsample = _conv_bn(c_in, c_out, act=False) if c_in != c_out else None

        def forward(self, x):
            out = self.conv3(self.conv2(self.conv1(x)))
            return torch.relu(out + (self.downsample(x) if self.downsample is not None else x))

    def __init__(self, widths=(4, 8, 12)):
        super().__init__()
        self.stem = _conv_bn(3, widths[0], 3)
        self.stages = nn.ModuleList(
            nn.Sequential(*(self.Block(c_in if i == 0 else c_out, c_out) for i in range(2)))
            for c_in, c_out in zip(widths, widths[1:])
        )

    def forward(self, x):
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x.mean((2, 3))


SHORTCUT_TRUTH = {  # ShortcutFirst module -> ShortcutLast module, per stage s and block b
    "proj": "downsample", "f.a": "conv1", "f.b": "conv2", "f.c": "conv3",
}


class NestedLayerScale(nn.Module):
    """ConvNeXt as torchvision writes it: each block's layers one ``block`` Sequential deeper
    than its ``[C, 1, 1]`` layer scale."""

    class Block(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.block = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.GELU(), nn.Conv2d(c, c, 1))
            self.layer_scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

        def forward(self, x):
            return x + self.layer_scale * self.block(x)

    def __init__(self, widths=(4, 8)):
        super().__init__()
        self.features = nn.Sequential()
        for i, c in enumerate(widths):
            if i:
                self.features.append(nn.Conv2d(widths[i - 1], c, 1))
            self.features.append(nn.Sequential(*(self.Block(c) for _ in range(2))))

    def forward(self, x):
        return self.features(x).mean((2, 3))


class FlatLayerScale(nn.Module):
    """The same network as timm writes it: named layers beside a ``[C]`` ``gamma``."""

    class Block(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.conv_dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
            self.pw = nn.Conv2d(c, c, 1)
            self.gamma = nn.Parameter(torch.ones(c))

        def forward(self, x):
            return x + self.gamma[:, None, None] * self.pw(nn.functional.gelu(self.conv_dw(x)))

    def __init__(self, widths=(4, 8)):
        super().__init__()
        self.stages = nn.ModuleList()
        for i, c in enumerate(widths):
            stage = nn.Module()
            stage.downsample = nn.Conv2d(widths[i - 1], c, 1) if i else nn.Identity()
            stage.blocks = nn.Sequential(*(self.Block(c) for _ in range(2)))
            self.stages.append(stage)

    def forward(self, x):
        for stage in self.stages:
            x = stage.blocks(stage.downsample(x))
        return x.mean((2, 3))
