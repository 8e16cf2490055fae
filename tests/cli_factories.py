"""Tiny models and factories for the CLI tests (``cli_factories:new_net`` on the command line).

The tests put this folder on ``PYTHONPATH`` so that a ``weight-mapper`` subprocess can import it.
"""

from __future__ import annotations

import torch
from torch import nn


class OldNet(nn.Module):
    """The model as it was trained: backbone (conv, BatchNorm, conv) + classifier."""

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
        )
        self.classifier = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, n_classes))

    def forward(self, x):
        return self.classifier(self.backbone(x).mean((2, 3)))


class NewNet(nn.Module):
    """OldNet refactored: the same computation under new module names."""

    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.stem = nn.ModuleDict({"conv": nn.Conv2d(3, 8, 3, padding=1, bias=False), "norm": nn.BatchNorm2d(8)})
        self.features = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.ModuleDict({"hidden": nn.Linear(16, 32), "logits": nn.Linear(32, n_classes)})

    def forward(self, x):
        x = self.features(torch.relu(self.stem["norm"](self.stem["conv"](x))))
        return self.head["logits"](torch.relu(self.head["hidden"](x.mean((2, 3)))))


# Where every OldNet tensor goes in NewNet.
OLD2NEW = {
    "backbone.0.weight": "stem.conv.weight",
    **{f"backbone.1.{leaf}": f"stem.norm.{leaf}"
       for leaf in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")},
    "backbone.3.weight": "features.weight",
    "backbone.3.bias": "features.bias",
    "classifier.0.weight": "head.hidden.weight",
    "classifier.0.bias": "head.hidden.bias",
    "classifier.2.weight": "head.logits.weight",
    "classifier.2.bias": "head.logits.bias",
}


def new_net() -> NewNet:
    """The target of the tests."""
    return NewNet()


def wider_net() -> NewNet:
    """NewNet with 12 classes: an OldNet checkpoint does not fit its last layer."""
    return NewNet(n_classes=12)


def not_a_model() -> dict:
    """A factory that returns something other than an nn.Module."""
    return {"weight": torch.zeros(1)}


NOT_CALLABLE = 3


def old_net() -> OldNet:
    """The source model, for ``apply --verify``."""
    return OldNet()


def example_input() -> torch.Tensor:
    """What ``apply --verify`` runs both models on."""
    return torch.randn(2, 3, 8, 8)


def expert_list():
    """A Mixtral-style ModuleList of experts (issue 6's stacking case), for ``map`` / ``apply --verify``."""
    from reference_encoders import ExpertList

    torch.manual_seed(0)
    return ExpertList(8, 16, 4)


def stacked_experts():
    """The same experts stacked into 3-D tensors."""
    from reference_encoders import StackedExperts

    return StackedExperts(8, 16, 4)


def expert_input() -> torch.Tensor:
    return torch.randn(5, 8)


def shortcut_first():
    """RegNet-like, torchvision's layout: the shortcut defined and run first (``--source-model``)."""
    from fixture_models import ShortcutFirst

    return ShortcutFirst()


def shortcut_last():
    """The same network in timm's layout: the shortcut last."""
    from fixture_models import ShortcutLast

    return ShortcutLast()


class NormNet(nn.Module):
    """A linear layer and a LayerNorm; its old checkpoints name the norm's tensors gamma / beta."""

    def __init__(self):
        super().__init__()
        self.fc, self.norm = nn.Linear(4, 6), nn.LayerNorm(6)

    def forward(self, x):
        return self.norm(self.fc(x))


class RenamedNormNet(nn.Module):
    """NormNet refactored: the same computation under new module names."""

    def __init__(self):
        super().__init__()
        self.proj, self.ln = nn.Linear(4, 6), nn.LayerNorm(6)

    def forward(self, x):
        return self.ln(self.proj(x))


def norm_net() -> NormNet:
    return NormNet()


def renamed_norm_net() -> RenamedNormNet:
    return RenamedNormNet()


def norm_input() -> torch.Tensor:
    return torch.randn(3, 4)
