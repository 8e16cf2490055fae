"""Scoring one predicted mapping: against the ground truth, and by running the converted model.

Pure helpers, one question each: :func:`positional_mapping` (the baseline), :func:`score_mapping`
(precision / recall / F1 / coverage), :func:`convert` and :func:`output_diff` (the functional
check), :func:`prepare_source` (make every tensor matter before copying).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "Prediction",
    "Score",
    "positional_mapping",
    "score_mapping",
    "convert",
    "fuse",
    "output_diff",
    "prepare_source",
    "close_enough",
]

# The functional check passes when max |diff| <= _RTOL * max(1, max |source output|).
_RTOL = 1e-4


@dataclass(frozen=True)
class Prediction:
    """One predicted ``source -> target`` copy; ``transform`` as in a plan entry (None = copy)."""

    source: str
    target: str
    transform: str | None = None


@dataclass(frozen=True)
class Score:
    """How one predicted mapping compares with the ground truth."""

    n_predicted: int
    n_correct: int
    n_truth: int
    precision: float
    recall: float
    f1: float
    filled: float  # share of *all* target tensors the prediction writes
    wrong: tuple[tuple[str, str, str | None], ...]  # (source, predicted target, true target or None)
    missed: tuple[tuple[str, str], ...]  # (source, true target) the prediction left out


def positional_mapping(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> list[Prediction]:
    """The positional baseline, as timm's ``remap_state_dict`` does it.

    Walk both state dicts in registration order and pair the i-th source tensor with the i-th
    target tensor; keep a pair only if the shapes are equal (timm would reshape or fail there).

    >>> positional_mapping({"a": torch.zeros(2), "b": torch.zeros(3)}, {"x": torch.zeros(2), "y": torch.zeros(4)})
    [Prediction(source='a', target='x', transform=None)]
    """
    return [
        Prediction(ks, kt)
        for (ks, vs), (kt, vt) in zip(source.items(), target.items())
        if tuple(vs.shape) == tuple(vt.shape)
    ]


def score_mapping(predicted: Sequence[Prediction], truth: Mapping[str, str], n_target: int) -> Score:
    """Precision, recall and F1 of ``predicted`` against ``truth``; a transposed copy counts as wrong.

    Every prediction counts, including those whose source the 1:1 truth leaves out (such a
    source has no 1:1 destination, so any destination is wrong).
    """
    correct, wrong = 0, []
    for p in predicted:
        if truth.get(p.source) == p.target and p.transform in (None, "identity"):
            correct += 1
        else:
            wrong.append((p.source, p.target, truth.get(p.source)))
    predicted_sources = {p.source for p in predicted}
    missed = tuple((s, t) for s, t in truth.items() if s not in predicted_sources)
    precision = correct / len(predicted) if predicted else 0.0
    recall = correct / len(truth) if truth else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    filled = len({p.target for p in predicted}) / n_target if n_target else 0.0
    return Score(len(predicted), correct, len(truth), precision, recall, f1, filled, tuple(wrong), missed)


def convert(predicted: Sequence[Prediction], source: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The target state dict a plain list of copies produces (transposes applied)."""
    out = {}
    for p in predicted:
        value = source[p.source]
        out[p.target] = value.t().contiguous() if p.transform == "transpose" else value
    return out


def fuse(not_1to1: Mapping[str, Sequence[str]], source: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Targets that are concatenations (dim 0) of source tensors, e.g. separate q, k, v -> qkv."""
    return {t: torch.cat([source[s] for s in srcs], dim=0) for t, srcs in not_1to1.items()}


@torch.no_grad()
def output_diff(
    source: nn.Module, target: nn.Module, x: Any, output: Callable[[Any], torch.Tensor]
) -> tuple[float, float]:
    """``(max |source(x) - target(x)|, max |source(x)|)``, both models in eval mode."""
    source.eval()
    target.eval()
    a, b = output(source(x)), output(target(x))
    return (a.float() - b.float()).abs().max().item(), a.float().abs().max().item()


def close_enough(diff: float, scale: float) -> bool:
    """True when ``diff`` is float32 noise relative to the output's magnitude."""
    return diff == diff and diff <= _RTOL * max(1.0, scale)


@torch.no_grad()
def prepare_source(model: nn.Module, make_input: Callable[[int, torch.Generator], Any], gen: torch.Generator,
                   *, batch: int = 8, steps: int = 2) -> None:
    """Make every source tensor matter, so that a wrong copy shows in the outputs.

    - Parameters initialised to one constant (norm scales = 1, biases = 0, a zero class
      token) get N(0, 0.1) noise: two such tensors would otherwise be interchangeable.
    - BatchNorm running statistics are measured on random inputs (train-mode forwards with
      cumulative averaging), so they are far from the 0/1 defaults.
    """
    for p in model.parameters():
        if p.is_floating_point() and p.numel() > 0 and bool((p == p.reshape(-1)[0]).all()):
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if bns:
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: the stats are the mean over all steps
        model.train()
        for _ in range(steps):
            model(make_input(batch, gen))
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
    model.eval()
