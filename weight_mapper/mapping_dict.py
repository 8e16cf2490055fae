"""The dict ``suggest_mapping`` returns: ``{source_key: target_key}`` that remembers its plan.

A plain ``{old: new}`` dict cannot say that a tensor must be transposed, reshaped or built
from several sources. :class:`MappingDict` is that dict (it compares, prints and serialises
like one) carrying the :class:`~weight_mapper.plan.MappingPlan` it came from, so that
``WeightRenamer.rename_keys(mapping)`` converts exactly what ``rename_keys(plan)`` converts.
Edit it like a dict; :func:`plan_from_mapping` turns the edited dict back into a plan, keeping
the plan's entries for the pairs left alone and checking the pairs changed by hand.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from weight_mapper.errors import PlanError
from weight_mapper.plan import MappingPlan, PlanEntry
from weight_mapper.transforms import relate

__all__ = ["MappingDict", "plan_from_mapping"]

#: ``PlanEntry.level`` of a pair set by hand (not scored).
MANUAL = "manual"

_FIX = "pass the plan instead: renamer.rename_keys(mapper.get_plan()) (or the dict suggest_mapping() returned)"


class MappingDict(dict):
    """``{source_key: target_key}`` with the plan it was read from.

    Attributes:
        plan: The :class:`MappingPlan` behind the dict (its transforms and combined entries).
        target_shapes: Shape of every target tensor, to check pairs edited by hand.

    >>> from weight_mapper.plan import PlanEntry, MappingPlan
    >>> e = PlanEntry(("a",), "b", "transpose", 0.9, 0.5, "group", (2, 3), (3, 2))
    >>> m = MappingDict.from_plan(MappingPlan((e,)))
    >>> m, m.plan.entries[0].transform
    ({'a': 'b'}, 'transpose')
    """

    def __init__(self, *args: Any, plan: MappingPlan | None = None,
                 target_shapes: Mapping[str, tuple[int, ...]] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.plan = plan
        self.target_shapes = dict(target_shapes) if target_shapes is not None else None

    @classmethod
    def from_plan(cls, plan: MappingPlan, target_shapes: Mapping[str, tuple[int, ...]] | None = None) -> MappingDict:
        return cls(plan.mapping, plan=plan, target_shapes=target_shapes)

    def copy(self) -> MappingDict:
        return MappingDict(self, plan=self.plan, target_shapes=self.target_shapes)

    def __reduce__(self):  # pickles (and deep-copies) with its plan
        return (_rebuild, (dict(self), self.plan, self.target_shapes))


def _rebuild(items, plan, target_shapes) -> MappingDict:
    return MappingDict(items, plan=plan, target_shapes=target_shapes)


def plan_from_mapping(
    mapping: Mapping[str, str],
    plan: MappingPlan | None,
    source_shapes: Mapping[str, tuple[int, ...]],
    target_shapes: Mapping[str, tuple[int, ...]] | None = None,
    *,
    source_label: str = "state_dict",
) -> MappingPlan:
    """The plan a ``{source: target}`` dict stands for.

    Pairs the plan has (a source and the target its entry fills) keep the plan's entry, with
    its transform and score; a combined entry (concat / stack) is kept when every one of its
    sources still maps to its target. Pairs set by hand become entries of level ``"manual"``
    (score NaN), with the transform their shapes need when the target's shape is known.

    Args:
        mapping: ``{source_key: target_key}``, possibly edited.
        plan: The plan the dict came from, or None for a dict written by hand.
        source_shapes: Shape of every source tensor (keys are checked against it).
        target_shapes: Shape of every target tensor, when known.
        source_label: Names the source in errors.

    Raises:
        PlanError: If a source key is missing, two sources fill one target outside a combined
            entry, or a pair's shapes differ in a way no transform fixes; each names the key
            and the fix.
    """
    by_pair: dict[tuple[str, str], PlanEntry] = {}
    by_source: dict[str, PlanEntry] = {}  # a source's own 1:1 entry: how its tensor is laid out
    if plan is not None:
        for e in plan.entries:
            for s in e.source:
                by_pair.setdefault((s, e.target), e)
            if len(e.source) == 1 and e.level != MANUAL:
                by_source.setdefault(e.source[0], e)
    target2sources: dict[str, list[str]] = {}
    for src, tgt in mapping.items():
        if not isinstance(src, str) or not isinstance(tgt, str):
            raise PlanError(f"a mapping maps source keys to target keys (strings), got {src!r} -> {tgt!r}")
        if src not in source_shapes:
            raise PlanError(f"{source_label} has no tensor {src!r}; check the mapping's source keys")
        target2sources.setdefault(tgt, []).append(src)
    entries: list[PlanEntry] = []
    for tgt, sources in target2sources.items():
        kept = {id(e): e for s in sources if (e := by_pair.get((s, tgt))) is not None}
        if len(kept) == 1:
            entry = next(iter(kept.values()))
            if set(entry.source) == set(sources):
                entries.append(entry)
                continue
            if len(entry.source) > 1:
                missing = sorted(set(entry.source) - set(sources))
                raise PlanError(
                    f"{tgt!r} is built from {list(entry.source)} ({entry.transform}), but the mapping "
                    + (f"no longer maps {missing} to it" if missing else f"also maps {sorted(set(sources) - set(entry.source))} to it")
                    + f"; a dict cannot describe a partial {entry.transform}: edit the plan, or keep all of its sources"
                )
        if len(sources) > 1:
            raise PlanError(
                f"{', '.join(map(repr, sources[:-1]))} and {sources[-1]!r} are "
                f"{'both' if len(sources) == 2 else 'all'} mapped to {tgt!r}; a target key can be filled once. If these are "
                f"fused sources (q/k/v into one qkv), a plain dict cannot say how to join them: {_FIX}"
            )
        entries.append(_manual_entry(sources[0], tgt, source_shapes, target_shapes, by_source.get(sources[0])))
    return MappingPlan(
        tuple(entries),
        unmatched_source=tuple(s for s in source_shapes if s not in mapping),
        unmatched_target=tuple(t for t in (target_shapes or {}) if t not in target2sources),
        strategy=plan.strategy if plan is not None else MANUAL,
        threshold=plan.threshold if plan is not None else 0.0,
        weights=dict(plan.weights) if plan is not None else {},
        source_label=plan.source_label if plan is not None else source_label,
        target_label=plan.target_label if plan is not None else "",
        source_prefix=plan.source_prefix if plan is not None else "",
    )


def _manual_entry(src: str, tgt: str, source_shapes, target_shapes, matched: PlanEntry | None) -> PlanEntry:
    s_shape = tuple(source_shapes[src])
    t_shape = tuple(target_shapes[tgt]) if target_shapes is not None and tgt in target_shapes else None
    if matched is not None and t_shape is not None and tuple(matched.target_shape) == t_shape:
        # Moved to a target shaped like its matched one: keep that entry's transform. Only it
        # knows that a square Conv1D weight must still be transposed into an nn.Linear.
        transform, args = matched.transform, dict(matched.args)
    else:
        relation = None if t_shape is None else relate(s_shape, t_shape)
        transform, args = (None, {}) if relation is None else (relation.transform, relation.args)
    if t_shape is not None and transform is None and s_shape != t_shape:
        raise PlanError(
            f"{src!r} {list(s_shape)} cannot fill {tgt!r} {list(t_shape)}: the shapes differ and no "
            "transpose or reshape turns one into the other; map it to a target of its shape"
        )
    return PlanEntry((src,), tgt, transform, math.nan, math.nan, MANUAL, s_shape,
                     t_shape if t_shape is not None else s_shape, args=args)
