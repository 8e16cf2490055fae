"""Training state follows the mapping: optimizer state converted with the same plan as the weights.

A training checkpoint (Lightning's ``optimizer_states`` list, or a plain
``{"model": ..., "optimizer": ...}``) keeps, per optimizer, torch's state dict:
``{"state": {index: {"step", "exp_avg", ...}}, "param_groups": [{"params": [index, ...], "lr": ...}]}``.
The indices are positions in the order the optimizer was given its parameters, usually
``model.parameters()``. :func:`convert_training_state` re-keys that state to the target's
parameter order and passes every per-parameter tensor through its plan entry's transform, exactly
as the weight was (transposed, reshaped, concatenated, stacked); ``param_groups`` are rebuilt for
the target's parameters with their options kept. LR schedulers carry no per-parameter state and
pass through.

Nothing is guessed: when a parameter order is not known, or the state does not fit it, the
optimizer state is *refused*: it is left out of the output (so that nothing resumes with moments
that belong to other tensors) and the report says why.

| state entry | how it is converted |
|---|---|
| ``step`` and other scalars (numbers, 0-d tensors, ``None``) | kept; the parts of a fused target must agree |
| a tensor shaped like its parameter (``exp_avg``, ``momentum_buffer``, ...) | the entry's transform |
| Adafactor's ``row_var`` / ``col_var`` | swapped by a transpose; leading-dim transforms as the weight |
| anything else | refused: the state is not per-parameter |
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from weight_mapper.errors import ConversionError
from weight_mapper.plan import MappingPlan, PlanEntry
from weight_mapper.transforms import get_transform

__all__ = [
    "OptimizerConversion",
    "TrainingStateReport",
    "checkpoint_parameter_order",
    "convert_training_state",
    "describe_training_state",
    "drop_training_state",
    "has_training_state",
    "parameter_order",
    "refuse_training_state",
    "training_state_for",
]

# Envelope keys that hold optimizer / scheduler / AMP state in the frameworks we know of.
_OPTIMIZER_KEYS = ("optimizer_states", "optimizer", "optimizers", "optimizer_state_dict", "optimizer_state", "optim")
_SCHEDULER_KEYS = ("lr_schedulers", "lr_scheduler", "scheduler", "schedulers", "scheduler_state_dict")
_SCALER_KEYS = ("native_amp_scaling_state", "amp_scaling_state", "scaler")
# State dict entries that are buffers of well-known modules (BatchNorm), never parameters.
_KNOWN_BUFFER = re.compile(r"(^|\.)(running_mean|running_var|num_batches_tracked)$")
# Scalar per-parameter state, kept as is (the parts of a fused parameter must agree).
_SCALAR_KEYS = frozenset({"step"})
# Adafactor's factored second moment of a >= 2-D parameter: reduced along the last / second-last dim.
_FACTORED_KEYS = ("row_var", "col_var")

_Order = Sequence[str]


class _Refusal(Exception):
    """Why one optimizer's state cannot be converted (caught and reported)."""


@dataclass(frozen=True)
class OptimizerConversion:
    """What happened to one optimizer's state.

    Attributes:
        location: Where it sits in the checkpoint, e.g. ``"optimizer_states[0]"``.
        converted: False when the state was refused (and left out of the output).
        reason: Why it was refused.
        n_params: Parameters of the converted optimizer (target side).
        n_states: Of those, how many carry state.
        fresh: Target parameters that start with empty state: no source parameter of this
            optimizer fills them (new in the target), as a fresh optimizer would.
        reset: ``(target parameter, reason)`` whose state could not be converted exactly and
            starts empty (Adafactor's factored moments under a transform that mixes rows).
        dropped: Source parameters whose state no target parameter takes.
    """

    location: str
    converted: bool
    reason: str = ""
    n_params: int = 0
    n_states: int = 0
    fresh: tuple[str, ...] = ()
    reset: tuple[tuple[str, str], ...] = ()
    dropped: tuple[str, ...] = ()

    def message(self) -> str:
        if not self.converted:
            return f"{self.location}: NOT converted, left out of the output: {self.reason}"
        parts = [f"{self.location}: converted ({self.n_params} parameters, {self.n_states} with state)"]
        if self.fresh:
            parts.append(f"{len(self.fresh)} start with empty state (not in the source): {_preview(self.fresh)}")
        if self.reset:
            parts.append(f"{len(self.reset)} reset: " + "; ".join(f"{n} ({why})" for n, why in self.reset[:3]))
        if self.dropped:
            parts.append(f"state of {len(self.dropped)} source parameters dropped (no target): {_preview(self.dropped)}")
        return "; ".join(parts)


@dataclass(frozen=True)
class TrainingStateReport:
    """What :func:`convert_training_state` did to a checkpoint's training state.

    Attributes:
        optimizers: One :class:`OptimizerConversion` per optimizer found.
        schedulers: Envelope keys of LR scheduler state, passed through unchanged.
        removed: Envelope keys left out of the output (refused or dropped state).
    """

    optimizers: tuple[OptimizerConversion, ...] = ()
    schedulers: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when every optimizer's state was converted (or there was none)."""
        return all(o.converted for o in self.optimizers)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``ok``, one dict per optimizer, the schedulers and the removed keys."""
        return {
            "ok": self.ok,
            "optimizers": [{"location": o.location, "converted": o.converted, "reason": o.reason,
                            "n_params": o.n_params, "n_states": o.n_states, "fresh": list(o.fresh),
                            "reset": [{"target": n, "reason": why} for n, why in o.reset],
                            "dropped": list(o.dropped)} for o in self.optimizers],
            "schedulers": list(self.schedulers),
            "removed": list(self.removed),
        }

    def message(self) -> str:
        if not self.optimizers:
            return "no optimizer state"
        lines = [o.message() for o in self.optimizers]
        if self.schedulers:
            lines.append(f"LR scheduler state passed through: {', '.join(self.schedulers)}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ finding


def _is_optimizer_state(value: Any) -> bool:
    return isinstance(value, Mapping) and "state" in value and "param_groups" in value


def _optimizer_locations(envelope: Mapping) -> list[tuple[str, int | None]]:
    """``(key, index)`` of every optimizer state dict at the top of ``envelope`` (index into a list)."""
    out: list[tuple[str, int | None]] = []
    for key, value in envelope.items():
        if _is_optimizer_state(value):
            out.append((key, None))
        elif isinstance(value, (list, tuple)) and value and all(_is_optimizer_state(v) for v in value):
            out.extend((key, i) for i in range(len(value)))
        elif key in _OPTIMIZER_KEYS and not _is_empty(value):
            out.append((key, None))  # an optimizer key holding something else: refused, never passed on
    return out


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, (list, tuple, dict)) and not value)


def _where(key: str, index: int | None) -> str:
    return key if index is None else f"{key}[{index}]"


def describe_training_state(envelope: Mapping) -> dict[str, Any]:
    """What training state an envelope carries, for ``inspect`` (reads no tensor data beyond shapes).

    >>> describe_training_state({"epoch": 2, "optimizer": {"state": {}, "param_groups": [{"params": [0]}]}})["optimizers"]
    [{'location': 'optimizer', 'kind': 'unknown', 'n_groups': 1, 'n_params': 1, 'n_states': 0, 'state_keys': []}]
    """
    optimizers = []
    for key, index in _optimizer_locations(envelope):
        osd = envelope[key] if index is None else envelope[key][index]
        if not _is_optimizer_state(osd):
            optimizers.append({"location": _where(key, index), "kind": f"not per-parameter ({type(osd).__name__})",
                               "n_groups": 0, "n_params": 0, "n_states": 0, "state_keys": []})
            continue
        groups = osd.get("param_groups") or []
        state = osd.get("state") or {}
        keys = sorted({str(k) for s in state.values() if isinstance(s, Mapping) for k in s})
        optimizers.append({
            "location": _where(key, index), "kind": _optimizer_kind(keys, groups),
            "n_groups": len(groups),
            "n_params": sum(len(g.get("params", ())) for g in groups if isinstance(g, Mapping)),
            "n_states": len(state), "state_keys": keys,
        })
    schedulers = [k for k in envelope if k in _SCHEDULER_KEYS]
    n_schedulers = sum(len(envelope[k]) if isinstance(envelope[k], (list, tuple)) else 1 for k in schedulers)
    return {
        "optimizers": optimizers,
        "schedulers": schedulers,
        "n_schedulers": n_schedulers,
        **{k: envelope[k] for k in ("epoch", "global_step") if isinstance(envelope.get(k), int)},
    }


def _optimizer_kind(state_keys: Sequence[str], groups: Sequence[Any]) -> str:
    options = set().union(*(g for g in groups if isinstance(g, Mapping))) if groups else set()
    keys = set(state_keys)
    if "row_var" in keys or "beta2_decay" in options:
        return "Adafactor"
    if "exp_avg" in keys:
        if any(isinstance(g, Mapping) and g.get("decoupled_weight_decay") for g in groups):
            return "AdamW"
        return "Adam-like"
    if "momentum_buffer" in keys or "momentum" in options:
        return "SGD"
    return "unknown"


def has_training_state(envelope: Mapping) -> bool:
    """Whether ``envelope`` holds optimizer state.

    >>> has_training_state({"epoch": 1}), has_training_state({"optimizer_states": [{"state": {}, "param_groups": []}]})
    (False, True)
    """
    return bool(_optimizer_locations(envelope))


# ------------------------------------------------------------------------------------ orders


def parameter_order(model: nn.Module, *, trainable_only: bool = False) -> list[str]:
    """The names of ``model.parameters()``, in that order (tied parameters once, buffers never).

    This is the index order of an optimizer built from ``model.parameters()``.

    >>> parameter_order(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    ['0.weight', '0.bias', '1.weight', '1.bias']
    """
    return [n for n, p in model.named_parameters() if p.requires_grad or not trainable_only]


def checkpoint_parameter_order(tensors: Mapping[str, torch.Tensor], *, ordered: bool = True) -> tuple[list[str] | None, str]:
    """The parameter order a state dict's own order implies, or ``(None, why not)``.

    ``module.state_dict()`` lists each module's parameters then its buffers, in definition order,
    so without the buffers it is ``model.parameters()``'s order. Buffers cannot be told from
    parameters by name in general: integer tensors and BatchNorm statistics are left out, and the
    result is only a *candidate*, which :func:`convert_training_state` accepts only when its
    length and every state tensor's shape fit the optimizer.

    Args:
        tensors: The source state dict (tied names sharing one tensor count once).
        ordered: False for a source whose order means nothing (a safetensors header is sorted).
    """
    if not ordered:
        return None, ("the source checkpoint's tensors are sorted by name (safetensors), not in the order "
                      "of model.parameters(); pass source_model (CLI: --source-model)")
    names, seen = [], set()
    for name in tensors:
        t = tensors[name]
        if _KNOWN_BUFFER.search(name) or not (t.is_floating_point() or t.is_complex()):
            continue
        ident = _storage_key(t)
        if ident is not None and ident in seen:
            continue  # a tied duplicate: model.parameters() lists it once
        seen.add(ident)
        names.append(name)
    return names, ""


def training_state_for(
    envelope: Mapping[str, Any],
    plan: MappingPlan,
    tensors: Mapping[str, torch.Tensor],
    *,
    ordered: bool = True,
    target_model: nn.Module | None = None,
    source_model: nn.Module | None = None,
    source_param_order: _Order | Sequence[_Order] | None = None,
    target_param_order: _Order | Sequence[_Order] | None = None,
) -> tuple[dict[str, Any], TrainingStateReport]:
    """Establish both parameter orders from what is known, then :func:`convert_training_state`.

    The source order is ``source_param_order``, else ``source_model.parameters()`` (all of them,
    or the trainable ones when that is the count the optimizer holds), else the checkpoint's own
    order without its buffers (see :func:`checkpoint_parameter_order`). The target order is
    ``target_param_order``, else ``target_model.parameters()`` (trainable only when the source's
    were). Without a target order nothing is certain, and the state is refused.

    Args:
        envelope: The checkpoint's non-weight entries.
        plan: The plan the weights were converted with.
        tensors: The source checkpoint's tensors (names, shapes, ties).
        ordered: False when the checkpoint's order means nothing (safetensors).
        target_model, source_model: The models (the meta device is fine).
        source_param_order, target_param_order: Explicit orders, as for :func:`convert_training_state`.

    Returns:
        ``(new envelope, report)``.
    """
    if not has_training_state(envelope):
        return dict(envelope), TrainingStateReport(schedulers=tuple(k for k in envelope if k in _SCHEDULER_KEYS))
    trainable_only = False
    derived = source_param_order is None
    if source_param_order is None and source_model is not None:
        try:
            source_param_order, trainable_only = _model_order(envelope, source_model, tensors, plan)
        except _Refusal as refusal:
            return refuse_training_state(envelope, str(refusal))
    if source_param_order is None:
        source_param_order, why_unknown = checkpoint_parameter_order(tensors, ordered=ordered)
        if source_param_order is None:
            return refuse_training_state(envelope, why_unknown)
    if target_param_order is None:
        if target_model is None:
            return refuse_training_state(envelope, "the target model's parameter order is unknown (a plan does not "
                                                   "tell parameters from buffers); pass the target model "
                                                   "(CLI: --validate TARGET) or target_param_order")
        names = parameter_order(target_model, trainable_only=trainable_only)
        targets = {e.target for e in plan.entries}
        # The plan may name the targets under a wrapper (a LightningModule's "model."); the model may not.
        prefix = max(("", *_prefixes(dict.fromkeys(targets))), key=lambda p: sum(p + n in targets for n in names))
        target_param_order = [prefix + n for n in names]
        if not targets & set(target_param_order):
            return refuse_training_state(envelope, f"none of the target model's parameters "
                                                   f"({_preview(names)}) is a target of the plan")
    shapes = {n: tuple(s) for n, s in _shapes(tensors).items()}
    return convert_training_state(envelope, plan, source_param_order=source_param_order,
                                  target_param_order=target_param_order, source_shapes=shapes,
                                  derived_order=derived)


def _shapes(tensors: Mapping[str, torch.Tensor]) -> Mapping[str, Sequence[int]]:
    shapes = getattr(tensors, "shapes", None)
    return shapes() if callable(shapes) else {n: tuple(t.shape) for n, t in tensors.items()}


def _model_order(envelope: Mapping, model: nn.Module, tensors: Mapping[str, torch.Tensor],
                 plan: MappingPlan) -> tuple[list[str], bool]:
    """The source model's parameter order as checkpoint keys; trainable only if that is what fits.

    Raises:
        _Refusal: If the model's parameters are not the checkpoint's.
    """
    names = parameter_order(model)
    prefix = next((p for p in dict.fromkeys(("", plan.source_prefix, *_prefixes(tensors)))
                   if all(p + n in tensors for n in names)), None)
    if prefix is None:
        missing = [n for n in names if n not in tensors and plan.source_prefix + n not in tensors]
        raise _Refusal(f"the source model's parameters {_preview(missing)} are not in the checkpoint; "
                       f"pass the model the checkpoint was saved from")
    trainable = parameter_order(model, trainable_only=True)
    counts = set()
    for key, index in _optimizer_locations(envelope):
        osd = envelope[key] if index is None else envelope[key][index]
        if _is_optimizer_state(osd) and isinstance(osd["param_groups"], (list, tuple)):
            counts.add(sum(len(g.get("params", ())) for g in osd["param_groups"] if isinstance(g, Mapping)))
    use_trainable = len(trainable) != len(names) and counts == {len(trainable)}
    return [prefix + n for n in (trainable if use_trainable else names)], use_trainable


def _prefixes(names: Mapping[str, Any]) -> list[str]:
    """Candidate wrapper prefixes of a Lightning-style checkpoint (``model.``, ``module.``)."""
    firsts = {name.split(".", 1)[0] + "." for name in names if "." in name}
    return sorted(firsts) if len(firsts) <= 3 else []


def _storage_key(t: torch.Tensor) -> tuple | None:
    if t.is_meta or t.numel() == 0:
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


# ------------------------------------------------------------------------------------ converting


def convert_training_state(
    envelope: Mapping[str, Any],
    plan: MappingPlan,
    *,
    source_param_order: _Order | Sequence[_Order],
    target_param_order: _Order | Sequence[_Order],
    source_shapes: Mapping[str, Sequence[int]] | None = None,
    derived_order: bool = False,
) -> tuple[dict[str, Any], TrainingStateReport]:
    """Convert every optimizer state in ``envelope`` with ``plan``; schedulers pass through.

    Args:
        envelope: The checkpoint's non-weight entries (``Checkpoint.envelope``).
        plan: The plan the weights were converted with.
        source_param_order: Source parameter names in optimizer index order (checkpoint keys);
            one list for every optimizer, or one list per optimizer (in envelope order).
        target_param_order: Target parameter names (plan target keys) in the order of the
            target model's ``parameters()``; one list, or one per optimizer. Each rebuilt
            group lists its parameters in this order.
        source_shapes: Shapes of the source parameters, to check that the order fits the
            state (default: the shapes the plan records).
        derived_order: True when ``source_param_order`` is a model's (or a checkpoint's) order
            rather than the optimizer's own: an optimizer with several ``param_groups`` is then
            refused, since a model does not say which parameters went into which group.

    Returns:
        ``(new envelope, report)``. A refused optimizer is left out of the new envelope (with
        the others of its list, which must stay aligned); the report says why.

    Raises:
        ConversionError: If the orders are given per optimizer but their count is wrong.

    >>> e = PlanEntry(("a",), "b", "transpose", 1.0, 1.0, "tensor", (2, 3), (3, 2))
    >>> osd = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.ones(2, 3)}}, "param_groups": [{"params": [0], "lr": 0.1}]}
    >>> out, report = convert_training_state({"optimizer": osd}, MappingPlan((e,)), source_param_order=["a"], target_param_order=["b"])
    >>> out["optimizer"]["state"][0]["exp_avg"].shape, report.ok
    (torch.Size([3, 2]), True)
    """
    locations = _optimizer_locations(envelope)
    src_orders = _per_optimizer(source_param_order, len(locations), "source_param_order")
    tgt_orders = _per_optimizer(target_param_order, len(locations), "target_param_order")
    shapes: dict[str, Sequence[int]] = dict(source_shapes or {})
    for e in plan.entries:
        for name, shape in zip(e.source, e.args.get("source_shapes") or [e.source_shape] * len(e.source)):
            shapes.setdefault(name, tuple(shape))
    out = dict(envelope)
    reports, refused_keys = [], set()
    converted_lists: dict[str, list] = {}
    for (key, index), src_order, tgt_order in zip(locations, src_orders, tgt_orders):
        where = _where(key, index)
        osd = envelope[key] if index is None else envelope[key][index]
        try:
            if derived_order and _is_optimizer_state(osd) and len(osd["param_groups"]) > 1:
                raise _Refusal(f"it has {len(osd['param_groups'])} param_groups, and the parameter order of a model "
                               f"does not say which parameters went into which; pass source_param_order, the "
                               f"parameter names in the optimizer's index order (group after group)")
            new_osd, report = _convert_optimizer(osd, plan, list(src_order), list(tgt_order), shapes, where)
        except _Refusal as why:
            reports.append(OptimizerConversion(where, False, str(why)))
            refused_keys.add(key)
            continue
        reports.append(report)
        if index is None:
            out[key] = new_osd
        else:
            converted_lists.setdefault(key, list(envelope[key]))[index] = new_osd
    for key, items in converted_lists.items():
        out[key] = type(envelope[key])(items) if isinstance(envelope[key], tuple) else items
    for key in refused_keys:
        out.pop(key, None)
    # A list of optimizers is kept or left out as a whole: Lightning pairs it with its optimizers by position.
    reports = [r if not (r.converted and r.location.partition("[")[0] in refused_keys) else
               OptimizerConversion(r.location, False, f"converted, but left out with the rest of "
                                   f"{r.location.partition('[')[0]}, where another optimizer was refused")
               for r in reports]
    schedulers = tuple(k for k in envelope if k in _SCHEDULER_KEYS)
    return out, TrainingStateReport(tuple(reports), schedulers, tuple(sorted(refused_keys)))


def refuse_training_state(envelope: Mapping[str, Any], reason: str) -> tuple[dict[str, Any], TrainingStateReport]:
    """Leave every optimizer state out of ``envelope``, reporting ``reason`` for each.

    Used when a parameter order is unknown: passing the state on unchanged would resume with
    moments that belong to other tensors.
    """
    locations = _optimizer_locations(envelope)
    keys = sorted({k for k, _ in locations})
    out = {k: v for k, v in envelope.items() if k not in keys}
    reports = tuple(OptimizerConversion(_where(k, i), False, reason) for k, i in locations)
    return out, TrainingStateReport(reports, tuple(k for k in envelope if k in _SCHEDULER_KEYS), tuple(keys))


def drop_training_state(envelope: Mapping[str, Any]) -> dict[str, Any]:
    """``envelope`` without optimizer, LR scheduler and AMP scaler state (``--weights-only``).

    >>> drop_training_state({"epoch": 1, "optimizer_states": [], "lr_schedulers": []})
    {'epoch': 1}
    """
    removed = {k for k, _ in _optimizer_locations(envelope)} | {*_OPTIMIZER_KEYS, *_SCHEDULER_KEYS, *_SCALER_KEYS}
    return {k: v for k, v in envelope.items() if k not in removed}


def _per_optimizer(order: Any, n: int, what: str) -> list[_Order]:
    if order is None:
        raise ConversionError(f"{what} is required")
    order = list(order)
    if not order or isinstance(order[0], str):
        return [order] * n
    if len(order) != n:
        raise ConversionError(f"{what} has {len(order)} lists but the checkpoint holds {n} optimizer(s); "
                              f"pass one list of names per optimizer, or one list for all")
    return order


def _convert_optimizer(osd: Any, plan: MappingPlan, src_order: list[str], tgt_order: list[str],
                       shapes: Mapping[str, Sequence[int]], where: str) -> tuple[dict, OptimizerConversion]:
    """One torch optimizer state dict, re-keyed to ``tgt_order`` through ``plan``.

    Raises:
        _Refusal: naming what does not fit.
    """
    groups, state = _parse(osd)
    positions = [i for g in groups for i in g["params"]]
    if len(positions) != len(src_order):
        raise _Refusal(f"the optimizer holds {len(positions)} parameters but the source parameter order has "
                       f"{len(src_order)}: it was not built from all of them, or buffers could not be told "
                       f"from parameters; pass the source model, or source_param_order")
    idx2name = dict(zip(positions, src_order))
    name2group = {idx2name[i]: g_index for g_index, g in enumerate(groups) for i in g["params"]}
    name2state = {idx2name[i]: s for i, s in state.items()}
    # The order must fit the state: every per-parameter tensor shaped like its parameter.
    for name, s in name2state.items():
        shape = shapes.get(name)
        if shape is None:
            raise _Refusal(f"the parameter order puts {name!r} at index {_index_of(idx2name, name)}, "
                           f"but the source checkpoint has no such tensor")
        for k, v in s.items():
            if not _fits(k, v, shape):
                what = f"has shape {list(v.shape)}" if isinstance(v, torch.Tensor) else f"is a {type(v).__name__}"
                raise _Refusal(f"state {k!r} of index {_index_of(idx2name, name)} {what}, but the parameter order "
                               f"puts {name!r} {list(shape)} there: the order is wrong, or the state is not "
                               f"per-parameter (LBFGS, ZeRO); pass the right source_param_order")
    target2entry = {e.target: e for e in plan.entries}
    adafactor = any("beta2_decay" in g for g in groups)
    new_state: dict[str, dict] = {}
    new_group_of: dict[str, int] = {}
    fresh, reset = [], []
    used: set[str] = set()
    for target in dict.fromkeys(tgt_order):
        entry = target2entry.get(target)
        inside = [s for s in entry.source if s in name2group] if entry is not None else []
        if entry is None or not inside:
            fresh.append(target)
            continue
        if len(inside) != len(entry.source):
            outside = [s for s in entry.source if s not in name2group]
            raise _Refusal(f"target {target!r} is built from {inside}, which this optimizer holds, and {outside}, "
                           f"which it does not")
        group_ids = sorted({name2group[s] for s in entry.source})
        if len(group_ids) > 1:
            raise _Refusal(f"target {target!r} fuses parameters of param_groups {group_ids} "
                           f"({list(entry.source)}); its parts must share one group's options")
        new_group_of[target] = group_ids[0]
        used.update(entry.source)
        parts = [name2state.get(s, {}) for s in entry.source]
        converted, why = _convert_entry(entry, parts, adafactor=adafactor)
        if why:
            reset.append((target, why))
        elif converted:
            new_state[target] = converted
    # Parameters new in the target join a group (the only one, else the first) as a fresh optimizer's would.
    for target in fresh:
        new_group_of[target] = 0
    order = [t for g_index in range(len(groups)) for t in dict.fromkeys(tgt_order) if new_group_of.get(t) == g_index]
    name2index = {t: i for i, t in enumerate(order)}
    new_groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": [name2index[t] for t in order if new_group_of[t] == g_index]}
                  for g_index, g in enumerate(groups)]
    new_osd = {**{k: v for k, v in osd.items() if k not in ("state", "param_groups")},
               "state": {name2index[t]: s for t, s in new_state.items()},
               "param_groups": new_groups}
    dropped = tuple(n for n in src_order if n not in used and n in name2state)
    report = OptimizerConversion(where, True, "", len(order), len(new_state), tuple(fresh), tuple(reset), dropped)
    return new_osd, report


def _parse(osd: Any) -> tuple[list[Mapping], Mapping[int, Mapping]]:
    if not _is_optimizer_state(osd):
        raise _Refusal(f"it is a {type(osd).__name__}, not a torch optimizer state dict "
                       f"({{'state': ..., 'param_groups': ...}}); only per-parameter state can follow the mapping")
    groups, state = osd["param_groups"], osd["state"]
    if not isinstance(groups, (list, tuple)) or not all(
            isinstance(g, Mapping) and isinstance(g.get("params"), (list, tuple)) for g in groups):
        raise _Refusal("its param_groups are not a list of {'params': [index, ...], ...}")
    if not isinstance(state, Mapping) or not all(isinstance(s, Mapping) for s in state.values()):
        raise _Refusal("its state is not a mapping of parameter index -> per-parameter state")
    positions = [i for g in groups for i in g["params"]]
    if len(set(positions)) != len(positions):
        raise _Refusal("a parameter index appears twice in its param_groups")
    strays = [i for i in state if i not in set(positions)]
    if strays:
        raise _Refusal(f"it has state for indices {strays[:5]} that no param_group lists")
    return list(groups), state


def _index_of(idx2name: Mapping[int, str], name: str) -> int:
    return next(i for i, n in idx2name.items() if n == name)


def _fits(key: str, value: Any, shape: Sequence[int]) -> bool:
    """Whether a state entry can belong to a parameter of ``shape``."""
    if not isinstance(value, torch.Tensor):
        return value is None or isinstance(value, (bool, int, float))
    if key in _SCALAR_KEYS or tuple(value.shape) == tuple(shape):
        return True
    if key in _FACTORED_KEYS and len(shape) >= 2:
        return tuple(value.shape) == _factored_shape(key, shape)
    return value.ndim == 0


def _factored_shape(key: str, shape: Sequence[int]) -> tuple[int, ...]:
    shape = list(shape)
    shape[-1 if key == "row_var" else -2] = 1
    return tuple(shape)


def _part_shapes(entry: PlanEntry) -> list[tuple[int, ...]]:
    return [tuple(s) for s in (entry.args.get("source_shapes") or [entry.source_shape] * len(entry.source))]


def _convert_entry(entry: PlanEntry, parts: list[Mapping], *, adafactor: bool) -> tuple[dict, str]:
    """The target parameter's state from its parts' states: ``(state, "")`` or ``({}, why it was reset)``.

    Raises:
        _Refusal: If the parts disagree (some with state, some without; different steps).
    """
    target = entry.target
    if not any(parts):
        return {}, ""
    keys = [tuple(sorted(p)) for p in parts]
    if len(set(keys)) > 1:
        raise _Refusal(f"the parts of target {target!r} ({list(entry.source)}) carry different state "
                       f"({[list(k) for k in keys]}): some were never updated")
    part_shapes = _part_shapes(entry)
    transform = get_transform(entry.transform)
    if adafactor and ("variance" in parts[0]) != (len(entry.target_shape) <= 1):
        return {}, (f"Adafactor keeps a factored moment for >= 2-D parameters and a full one for vectors; "
                    f"{list(part_shapes[0])} -> {list(entry.target_shape)} changes which")
    out: dict[str, Any] = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        first = values[0]
        if key in _FACTORED_KEYS:
            continue
        if isinstance(first, torch.Tensor) and key not in _SCALAR_KEYS and tuple(first.shape) == part_shapes[0]:
            out[key] = _own(transform.apply(values, entry.args), values)
            continue
        if any(not _same(first, v) for v in values[1:]):
            raise _Refusal(f"the parts of target {target!r} ({list(entry.source)}) disagree on {key!r} "
                           f"({[_show(v) for v in values]}); they were trained differently and cannot share one state")
        out[key] = first.clone() if isinstance(first, torch.Tensor) else first
    if any(k in parts[0] for k in _FACTORED_KEYS):
        factored = _convert_factored(entry, [p["row_var"] for p in parts], [p["col_var"] for p in parts], part_shapes)
        if isinstance(factored, str):
            return {}, factored
        inputs = [p[k] for p in parts for k in _FACTORED_KEYS]  # a transpose swaps the two
        out["row_var"], out["col_var"] = (_own(t, inputs) for t in factored)
    return out, ""


def _own(result: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``result``, copied if it shares memory with an input (identity, a contiguous slice, a
    transpose of a vector): the source optimizer may still be stepping its state in place."""
    ptr = result.untyped_storage().data_ptr() if not result.is_meta else None
    if ptr and any(ptr == t.untyped_storage().data_ptr() for t in inputs):
        return result.clone()
    return result


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    return a == b


def _show(v: Any) -> Any:
    return v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v


def _convert_factored(entry: PlanEntry, rows: list[torch.Tensor], cols: list[torch.Tensor],
                      part_shapes: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor] | str:
    """Adafactor's ``(row_var, col_var)`` for the target, or why they cannot follow the transform exactly.

    The factored moment is ``row_var @ col_var / mean(row_var)`` over the last two dims, batched over
    the leading ones: a transpose swaps the factors; a transform that only moves leading dims
    (stacked experts) applies to both factors as to the weight; anything that mixes the last two
    dims (fusing q/k/v rows) changes what the factors average over and cannot be converted exactly.
    """
    op = entry.transform or "identity"
    src_nd, tgt_nd = len(part_shapes[0]), len(entry.target_shape)
    args = entry.args
    if op == "identity":
        return rows[0], cols[0]
    if op == "transpose" and src_nd == 2:
        return cols[0].t().contiguous(), rows[0].t().contiguous()
    if op == "reshape" and src_nd >= 2 and tgt_nd >= 2 and part_shapes[0][-2:] == tuple(entry.target_shape[-2:]):
        shape = tuple(entry.target_shape)
        return (rows[0].reshape(_factored_shape("row_var", shape)).contiguous(),
                cols[0].reshape(_factored_shape("col_var", shape)).contiguous())

    def leading(dim: int, nd: int) -> bool:
        return (dim % nd if dim < 0 else dim) < nd - 2

    leading_only = {
        "concat": lambda: leading(args.get("dim", 0), src_nd),
        "slice": lambda: leading(args.get("dim", 0), src_nd),
        "index": lambda: leading(args.get("dim", 0), src_nd),
        "stack": lambda: leading(args.get("dim", 0), tgt_nd),
        "stack_concat": lambda: leading(args.get("dim", 0), tgt_nd) and leading(args["concat_dim"], tgt_nd),
        "slice_index": lambda: leading(args["concat_dim"], src_nd) and leading(args.get("dim", 0), src_nd),
    }.get(op)
    if leading_only is not None and tgt_nd >= 2 and leading_only():
        transform = get_transform(op)
        return transform.apply(rows, args), transform.apply(cols, args)
    return (f"Adafactor's factored moment cannot follow {op} of {[list(s) for s in part_shapes]} "
            f"-> {list(entry.target_shape)} exactly")


def _preview(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
