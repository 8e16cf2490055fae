"""Scoring one predicted plan: against the ground truth, by inverting it, by running the converted model.

Pure helpers, one question each: :func:`positional_plan` (the baseline), :func:`truth_plan` (the
ground truth as a weight_mapper plan, to convert through it), :func:`score_plan` (precision /
recall / F1 / coverage), :func:`round_trip` (does ``plan.inverse()`` give the source back?),
:func:`output_diff` (the functional check), :func:`prepare_source` (make every tensor matter
before copying).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from weight_mapper import MappingPlan, apply_plan
from weight_mapper.errors import PlanError
from weight_mapper.plan import PlanEntry

from benchmarks.accuracy.rules import COMBINE_DIM, Truth, TruthEntry

__all__ = [
    "Score",
    "positional_plan",
    "truth_plan",
    "score_plan",
    "round_trip",
    "output_diff",
    "prepare_source",
    "close_enough",
]

# The functional check passes when max |diff| <= _RTOL * max(1, max |source output|).
_RTOL = 1e-4


@dataclass(frozen=True)
class Score:
    """How one predicted plan compares with the ground truth (one entry = one target tensor)."""

    n_predicted: int
    n_correct: int
    n_truth: int
    precision: float
    recall: float
    f1: float
    filled: float  # share of *all* target tensors the prediction writes
    # (target, predicted sources, predicted transform, true sources or None, true transform)
    wrong: tuple[tuple[str, tuple[str, ...], str | None, tuple[str, ...] | None, str | None], ...]
    missed: tuple[tuple[str, tuple[str, ...], str | None], ...]  # truth entries the prediction left out


def _entry(sources, target, transform, source_sd, target_sd, level) -> PlanEntry:
    values = [source_sd[s] for s in sources]
    t_shape = tuple(target_sd[target].shape)
    args: dict[str, Any] = {}
    if transform == "reshape":
        args = {"shape": list(t_shape)}
    elif transform in ("concat", "stack"):
        args = {"dim": COMBINE_DIM, "source_shapes": [list(v.shape) for v in values]}
        if transform == "concat":
            args["sizes"] = [v.shape[COMBINE_DIM] for v in values]
    return PlanEntry(tuple(sources), target, transform, 1.0, 1.0, level, tuple(values[0].shape), t_shape, {}, args)


def _plan(entries: list[PlanEntry], source_sd, target_sd, label: str) -> MappingPlan:
    order = {k: i for i, k in enumerate(target_sd)}
    entries = sorted(entries, key=lambda e: order[e.target])
    used = {s for e in entries for s in e.source}
    filled = {e.target for e in entries}
    return MappingPlan(tuple(entries), tuple(k for k in source_sd if k not in used),
                       tuple(k for k in target_sd if k not in filled), strategy=label)


def truth_plan(
    truth: Truth, source_sd: Mapping[str, torch.Tensor], target_sd: Mapping[str, torch.Tensor]
) -> MappingPlan:
    """The ground truth as a weight_mapper plan (transform arguments from the tensors' shapes).

    >>> sd = {"q": torch.ones(2, 3), "k": torch.zeros(1, 3)}
    >>> plan = truth_plan({"qk": (("q", "k"), "concat")}, sd, {"qk": torch.empty(3, 3)})
    >>> plan.entries[0].args["sizes"], apply_plan(plan, sd)["qk"].shape
    ([2, 1], torch.Size([3, 3]))
    """
    return _plan([_entry(srcs, t, tr, source_sd, target_sd, "truth") for t, (srcs, tr) in truth.items()],
                 source_sd, target_sd, "truth")


def positional_plan(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> MappingPlan:
    """The positional baseline, as timm's ``remap_state_dict`` does it.

    Walk both state dicts in registration order and pair the i-th source tensor with the i-th
    target tensor; keep a pair only if the shapes are equal (timm would reshape or fail there).
    So it only ever makes plain 1:1 copies.

    >>> plan = positional_plan({"a": torch.zeros(2), "b": torch.zeros(3)}, {"x": torch.zeros(2), "y": torch.zeros(4)})
    >>> [(e.source, e.target, e.transform) for e in plan.entries]
    [(('a',), 'x', None)]
    """
    entries = [
        _entry((ks,), kt, None, source, target, "positional")
        for (ks, vs), (kt, vt) in zip(source.items(), target.items())
        if tuple(vs.shape) == tuple(vt.shape)
    ]
    return _plan(entries, source, target, "positional")


def _as_truth_entry(entry: PlanEntry) -> TruthEntry:
    transform = None if entry.transform in (None, "identity") else entry.transform
    return tuple(entry.source), transform


def _is_correct(entry: PlanEntry, truth: Truth) -> bool:
    """Target, source tuple (in order) and transform all agree; a concat / stack must also use the truth's dim."""
    if truth.get(entry.target) != _as_truth_entry(entry):
        return False
    return entry.transform not in ("concat", "stack") or entry.args.get("dim", 0) == COMBINE_DIM


def score_plan(plan: MappingPlan, truth: Truth, n_target: int) -> Score:
    """Precision, recall and F1 of the plan's entries against ``truth``, entry by entry.

    An entry is correct only if its target is in the truth with the same source keys in the
    same order and the same transform (``None`` and ``"identity"`` are both a plain copy).
    Every entry counts, aliases of tied weights included.

    >>> truth = {"w": (("a",), "transpose"), "b": (("c",), None)}
    >>> e = [PlanEntry(("a",), "w", "transpose", 1, 1, "t", (2, 3), (3, 2)),
    ...      PlanEntry(("c",), "b", "reshape", 1, 1, "t", (2,), (2,))]
    >>> s = score_plan(MappingPlan(tuple(e)), truth, 2)
    >>> s.n_correct, s.precision, s.wrong[0][0]
    (1, 0.5, 'b')
    """
    correct, wrong = 0, []
    for e in plan.entries:
        if _is_correct(e, truth):
            correct += 1
        else:
            want_src, want_tr = truth.get(e.target, (None, None))
            wrong.append((e.target, tuple(e.source), _as_truth_entry(e)[1], want_src, want_tr))
    predicted_targets = {e.target for e in plan.entries}
    missed = tuple((t, srcs, tr) for t, (srcs, tr) in truth.items() if t not in predicted_targets)
    n = len(plan.entries)
    precision = correct / n if n else 0.0
    recall = correct / len(truth) if truth else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    filled = len(predicted_targets) / n_target if n_target else 0.0
    return Score(n, correct, len(truth), precision, recall, f1, filled, tuple(wrong), missed)


def round_trip(plan: MappingPlan, source_sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Convert with ``plan``, convert back with ``plan.inverse()``: is the source back, exactly?

    Returns ``{"exact": bool, "missing": n, "differ": n, "extra": n, "error": str | None}``:
    source keys that do not come back, that come back with other values (``torch.equal``), and
    keys that come back that the source does not have. This asks whether the plan is
    invertible and complete on the source side, not whether it is right: a permutation of
    same-shaped tensors inverts exactly.

    >>> sd = {"a": torch.arange(6.).reshape(2, 3)}
    >>> round_trip(positional_plan(sd, {"b": torch.empty(2, 3)}), sd)["exact"]
    True
    """
    try:
        back = apply_plan(plan.inverse(), apply_plan(plan, source_sd))
    except PlanError as exc:
        return {"exact": False, "missing": None, "differ": None, "extra": None,
                "error": f"PlanError: {str(exc).splitlines()[0][:200]}"}
    missing = sum(k not in back for k in source_sd)
    differ = sum(k in back and not torch.equal(back[k], v) for k, v in source_sd.items())
    extra = sum(k not in source_sd for k in back)
    return {"exact": not (missing or differ or extra), "missing": missing, "differ": differ, "extra": extra,
            "error": None}


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
