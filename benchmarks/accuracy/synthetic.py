"""Synthetic refactors: tiny models whose second version computes the same as the first.

Each pair is named after the one problem it poses the matcher (like the fixture models in
the test suite), and comes with its ground truth as rules for :func:`rules.rename_all`:

- ``renamed``: a small ResNet whose every module got a new name, and whose stage indices
  moved from 1-based to 0-based (``backbone.stage1.unit0.conv_a`` -> ``encoder.layers.0.blocks.0.conv1``).
- ``regrouped``: a flat VGG-style ``features`` Sequential regrouped into named, nested
  ``stages.<s>.blocks.<b>``; the flat indices count ReLUs and pools too, so they mislead.
- ``reordered``: six identical residual MLP blocks kept in a ``ModuleDict`` whose keys carry no
  position and whose *definition* order differs from the order ``forward`` runs them in. Only
  the execution order (``dummy_input``) can tell them apart.
- ``fused_qkv``: separate q/k/v projections fused into one ``qkv`` Linear. The fused tensors
  are a concatenation (dim 0, q, k, v order): :func:`fused_qkv_combined` lists them for
  :func:`rules.build_truth`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.accuracy.rules import Rules

# ---------------------------------------------------------------------------- renamed
_RES_WIDTHS = (16, 32, 64)  # per stage; two units each
_RES_UNITS = 2


class _OldUnit(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv_a = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(c_out)
        self.conv_b = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn_b = nn.BatchNorm2d(c_out)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = self.bn_b(self.conv_b(F.relu(self.bn_a(self.conv_a(x)))))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class OldResNet(nn.Module):
    """``backbone.stem_conv``, ``backbone.stage<1..3>.unit<j>.{conv_a, bn_a, ...}``, ``classifier``."""

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.stem_conv = nn.Conv2d(3, _RES_WIDTHS[0], 3, 1, 1, bias=False)
        self.backbone.stem_bn = nn.BatchNorm2d(_RES_WIDTHS[0])
        c_in = _RES_WIDTHS[0]
        for s, width in enumerate(_RES_WIDTHS, start=1):
            stage = nn.Module()
            for j in range(_RES_UNITS):
                setattr(stage, f"unit{j}", _OldUnit(c_in, width, 2 if (j == 0 and s > 1) else 1))
                c_in = width
            setattr(self.backbone, f"stage{s}", stage)
        self.classifier = nn.Linear(_RES_WIDTHS[-1], n_classes)

    def forward(self, x):
        b = self.backbone
        x = F.relu(b.stem_bn(b.stem_conv(x)))
        for s in range(1, len(_RES_WIDTHS) + 1):
            for j in range(_RES_UNITS):
                x = getattr(getattr(b, f"stage{s}"), f"unit{j}")(x)
        return self.classifier(x.mean((2, 3)))


class _NewBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(c_out)
        self.skip = None
        if stride != 1 or c_in != c_out:
            self.skip = nn.Module()
            self.skip.conv = nn.Conv2d(c_in, c_out, 1, stride, bias=False)
            self.skip.norm = nn.BatchNorm2d(c_out)

    def forward(self, x):
        y = self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x)))))
        return F.relu(y + (x if self.skip is None else self.skip.norm(self.skip.conv(x))))


class NewResNet(nn.Module):
    """``encoder.stem.{conv, norm}``, ``encoder.layers.<0..2>.blocks.<j>.{conv1, norm1, ...}``, ``head.fc``."""

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.stem = nn.Module()
        self.encoder.stem.conv = nn.Conv2d(3, _RES_WIDTHS[0], 3, 1, 1, bias=False)
        self.encoder.stem.norm = nn.BatchNorm2d(_RES_WIDTHS[0])
        layers, c_in = [], _RES_WIDTHS[0]
        for s, width in enumerate(_RES_WIDTHS):
            stage = nn.Module()
            stage.blocks = nn.ModuleList()
            for j in range(_RES_UNITS):
                stage.blocks.append(_NewBlock(c_in, width, 2 if (j == 0 and s > 0) else 1))
                c_in = width
            layers.append(stage)
        self.encoder.layers = nn.ModuleList(layers)
        self.head = nn.Module()
        self.head.fc = nn.Linear(_RES_WIDTHS[-1], n_classes)

    def forward(self, x):
        e = self.encoder
        x = F.relu(e.stem.norm(e.stem.conv(x)))
        for stage in e.layers:
            for block in stage.blocks:
                x = block(x)
        return self.head.fc(x.mean((2, 3)))


_UNIT = r"backbone\.stage(\d)\.unit(\d)\."


def _unit(leaf: str):
    return lambda m: f"encoder.layers.{int(m[1]) - 1}.blocks.{m[2]}.{leaf}.{m[3]}"


RENAMED_RULES: Rules = (
    (r"backbone\.stem_conv\.(.*)", r"encoder.stem.conv.\1"),
    (r"backbone\.stem_bn\.(.*)", r"encoder.stem.norm.\1"),
    (_UNIT + r"conv_a\.(.*)", _unit("conv1")),
    (_UNIT + r"bn_a\.(.*)", _unit("norm1")),
    (_UNIT + r"conv_b\.(.*)", _unit("conv2")),
    (_UNIT + r"bn_b\.(.*)", _unit("norm2")),
    (_UNIT + r"shortcut\.0\.(.*)", _unit("skip.conv")),
    (_UNIT + r"shortcut\.1\.(.*)", _unit("skip.norm")),
    (r"classifier\.(.*)", r"head.fc.\1"),
)

# ---------------------------------------------------------------------------- regrouped
_VGG_STAGES = ((16, 16), (32, 32), (32, 32, 32))  # output channels of each conv, per stage


class FlatVGG(nn.Module):
    """torchvision-VGG-style: one flat ``features`` Sequential (conv, bn, relu, ..., pool) and ``classifier``."""

    def __init__(self, n_classes: int = 10):
        super().__init__()
        layers, c_in = [], 3
        for stage in _VGG_STAGES:
            for c_out in stage:
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
                c_in = c_out
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(c_in, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, n_classes))

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


class _ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class NestedVGG(nn.Module):
    """The same network as :class:`FlatVGG`, as ``stages.<s>.blocks.<b>.{conv, bn}`` and ``head.{fc1, fc2}``."""

    def __init__(self, n_classes: int = 10):
        super().__init__()
        stages, c_in = [], 3
        for stage in _VGG_STAGES:
            blocks = []
            for c_out in stage:
                blocks.append(_ConvBlock(c_in, c_out))
                c_in = c_out
            s = nn.Module()
            s.blocks = nn.Sequential(*blocks)
            stages.append(s)
        self.stages = nn.ModuleList(stages)
        self.head = nn.Module()
        self.head.fc1 = nn.Linear(c_in, 64)
        self.head.fc2 = nn.Linear(64, n_classes)

    def forward(self, x):
        for s in self.stages:
            x = F.max_pool2d(s.blocks(x), 2)
        return self.head.fc2(F.relu(self.head.fc1(x.mean((2, 3)))))


def regrouped_rules(stages=_VGG_STAGES) -> Rules:
    """Flat ``features.<i>`` index -> ``stages.<s>.blocks.<b>``; every stage ends in a pool."""
    rules, i = [], 0
    for s, stage in enumerate(stages):
        for b in range(len(stage)):
            rules.append((rf"features\.{i}\.(.*)", rf"stages.{s}.blocks.{b}.conv.\1"))
            rules.append((rf"features\.{i + 1}\.(.*)", rf"stages.{s}.blocks.{b}.bn.\1"))
            i += 3  # conv, bn, relu
        i += 1  # pool
    rules += [(r"classifier\.0\.(.*)", r"head.fc1.\1"), (r"classifier\.3\.(.*)", r"head.fc2.\1")]
    return tuple(rules)


# ---------------------------------------------------------------------------- reordered
_MLP_DIM, _MLP_IN, _MLP_OUT = 32, 16, 10
# Where the new model defines each block, and the order its forward runs them in. Neither is
# alphabetical, and they disagree with each other.
_DEFINED = ("oak", "ash", "fir", "cedar", "elm", "birch")
_EXECUTED = ("elm", "oak", "birch", "fir", "ash", "cedar")


class _OldMLPBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        return x + self.fc(F.gelu(self.norm(x)))


class StackedMLP(nn.Module):
    """``embed``, ``layers.<0..5>.{norm, fc}``, ``out``: defined in the order they run."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(_MLP_IN, _MLP_DIM)
        self.layers = nn.ModuleList(_OldMLPBlock(_MLP_DIM) for _ in _EXECUTED)
        self.out = nn.Linear(_MLP_DIM, _MLP_OUT)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.out(x)


class _NewMLPBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)  # defined before the norm that runs first
        self.ln = nn.LayerNorm(dim)

    def forward(self, x):
        return x + self.proj(F.gelu(self.ln(x)))


class ShuffledMLP(nn.Module):
    """The same network with the head defined first and the blocks in a keyed ``ModuleDict``."""

    def __init__(self):
        super().__init__()
        self.readout = nn.Linear(_MLP_DIM, _MLP_OUT)
        self.blocks = nn.ModuleDict({name: _NewMLPBlock(_MLP_DIM) for name in _DEFINED})
        self.stem = nn.Linear(_MLP_IN, _MLP_DIM)

    def forward(self, x):
        x = self.stem(x)
        for name in _EXECUTED:
            x = self.blocks[name](x)
        return self.readout(x)


REORDERED_RULES: Rules = (
    (r"embed\.(.*)", r"stem.\1"),
    (r"out\.(.*)", r"readout.\1"),
    (r"layers\.(\d+)\.norm\.(.*)", lambda m: f"blocks.{_EXECUTED[int(m[1])]}.ln.{m[2]}"),
    (r"layers\.(\d+)\.fc\.(.*)", lambda m: f"blocks.{_EXECUTED[int(m[1])]}.proj.{m[2]}"),
)

# ---------------------------------------------------------------------------- fused q/k/v
_ATT_DIM, _ATT_HEADS, _ATT_HIDDEN, _ATT_LAYERS, _ATT_VOCAB = 32, 4, 64, 2, 50


def _attend(q, k, v, heads: int):
    b, t, d = q.shape
    q, k, v = (z.view(b, t, heads, d // heads).transpose(1, 2) for z in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.transpose(1, 2).reshape(b, t, d)


class _SplitLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(_ATT_DIM)
        self.attn = nn.Module()
        for leaf in ("q", "k", "v", "o"):
            setattr(self.attn, leaf, nn.Linear(_ATT_DIM, _ATT_DIM))
        self.norm2 = nn.LayerNorm(_ATT_DIM)
        self.mlp = nn.Sequential(nn.Linear(_ATT_DIM, _ATT_HIDDEN), nn.GELU(), nn.Linear(_ATT_HIDDEN, _ATT_DIM))

    def forward(self, x):
        h, a = self.norm1(x), self.attn
        x = x + a.o(_attend(a.q(h), a.k(h), a.v(h), _ATT_HEADS))
        return x + self.mlp(self.norm2(x))


class SplitQKVTransformer(nn.Module):
    """``embed``, ``layers.<i>.{norm1, attn.{q, k, v, o}, norm2, mlp.{0, 2}}``, ``norm``, ``lm_head``."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(_ATT_VOCAB, _ATT_DIM)
        self.layers = nn.ModuleList(_SplitLayer() for _ in range(_ATT_LAYERS))
        self.norm = nn.LayerNorm(_ATT_DIM)
        self.lm_head = nn.Linear(_ATT_DIM, _ATT_VOCAB, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


class _FusedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(_ATT_DIM)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(_ATT_DIM, 3 * _ATT_DIM)
        self.attn.proj = nn.Linear(_ATT_DIM, _ATT_DIM)
        self.ln_2 = nn.LayerNorm(_ATT_DIM)
        self.ffn = nn.Module()
        self.ffn.up = nn.Linear(_ATT_DIM, _ATT_HIDDEN)
        self.ffn.down = nn.Linear(_ATT_HIDDEN, _ATT_DIM)

    def forward(self, x):
        q, k, v = self.attn.qkv(self.ln_1(x)).chunk(3, dim=-1)
        x = x + self.attn.proj(_attend(q, k, v, _ATT_HEADS))
        return x + self.ffn.down(F.gelu(self.ffn.up(self.ln_2(x))))


class FusedQKVTransformer(nn.Module):
    """``tok_emb``, ``blocks.<i>.{ln_1, attn.{qkv, proj}, ln_2, ffn.{up, down}}``, ``ln_f``, ``head``."""

    def __init__(self):
        super().__init__()
        self.tok_emb = nn.Embedding(_ATT_VOCAB, _ATT_DIM)
        self.blocks = nn.ModuleList(_FusedBlock() for _ in range(_ATT_LAYERS))
        self.ln_f = nn.LayerNorm(_ATT_DIM)
        self.head = nn.Linear(_ATT_DIM, _ATT_VOCAB, bias=False)

    def forward(self, ids):
        x = self.tok_emb(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


_LAYER = r"layers\.(\d+)\."
# The renamed part; q/k/v are concatenated into qkv (see fused_qkv_combined).
FUSED_QKV_RULES: Rules = (
    (r"embed\.(.*)", r"tok_emb.\1"),
    (_LAYER + r"norm1\.(.*)", r"blocks.\1.ln_1.\2"),
    (_LAYER + r"attn\.o\.(.*)", r"blocks.\1.attn.proj.\2"),
    (_LAYER + r"norm2\.(.*)", r"blocks.\1.ln_2.\2"),
    (_LAYER + r"mlp\.0\.(.*)", r"blocks.\1.ffn.up.\2"),
    (_LAYER + r"mlp\.2\.(.*)", r"blocks.\1.ffn.down.\2"),
    (r"norm\.(.*)", r"ln_f.\1"),
    (r"lm_head\.(.*)", r"head.\1"),
)


def fused_qkv_combined(n_layers: int = _ATT_LAYERS) -> dict[str, tuple[tuple[str, ...], str]]:
    """Target key -> (the source keys concatenated on dim 0 in q, k, v order, ``"concat"``)."""
    return {
        f"blocks.{i}.attn.qkv.{leaf}": (tuple(f"layers.{i}.attn.{p}.{leaf}" for p in "qkv"), "concat")
        for i in range(n_layers)
        for leaf in ("weight", "bias")
    }


MLP_INPUT_SHAPE = (4, _MLP_IN)
ATT_VOCAB = _ATT_VOCAB
