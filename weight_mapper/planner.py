"""Stage 5 (matcher side): the matcher's output -> a :class:`~weight_mapper.plan.MappingPlan`.

:func:`build_plan` turns an :class:`~weight_mapper.assign.Assignment` and the concat / stack /
split :class:`~weight_mapper.combine.Combination` s into named plan entries: it picks each
entry's transform, pairs tied weights, flags modules that moved only in part and collects what
stayed unmatched. The plan itself (:mod:`weight_mapper.plan`) is data and imports nothing of
this side; applying or inverting a plan never loads the matcher.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from weight_mapper.assign import Assignment
from weight_mapper.combine import Combination
from weight_mapper.names import contested_rows
from weight_mapper.plan import MappingPlan, PlanEntry
from weight_mapper.storage import TransposeVote, transpose_votes
from weight_mapper.table import TensorTable
from weight_mapper.transforms import invert_entries, relate

__all__ = ["build_plan", "transform_for"]


def build_plan(
    assignment: Assignment,
    src_table: TensorTable,
    tgt_table: TensorTable,
    *,
    strategy: str,
    threshold: float,
    weights: Mapping[str, float],
    withhold_ambiguous: bool = False,
    source_prefix: str = "",
    combinations: Sequence[Combination] = (),
    splits: Sequence[Combination] = (),
    flow_sources: tuple[str, str] = ("none", "none"),
) -> MappingPlan:
    """Turn matched rows into named entries, expand tied weights, collect the unmatched.

    Args:
        assignment: Output of :func:`weight_mapper.assign.assign`.
        src_table, tgt_table: The tables it was computed from.
        strategy, threshold, weights: Recorded in the plan.
        withhold_ambiguous: Move flagged entries (ambiguous or carrying a flag) to
            ``plan.ambiguous`` instead of using them.
        source_prefix: Wrapper prefix stripped from the source table; put back on entry keys.
        combinations: Concat / stack matches from :func:`weight_mapper.combine.combine`.
        splits: Fused sources split over several targets, from :func:`weight_mapper.combine.split`
            (each as the combination of target rows that rebuilds its source row); one
            ``slice`` / ``index`` / ``slice_index`` entry per target, level ``"split"``.
        flow_sources: Where each side's data-flow positions came from; recorded in the plan.
    """
    entries: list[PlanEntry] = []
    withheld: list[PlanEntry] = []
    used_src: set[int] = set()
    filled_tgt: set[int] = set()
    src_aliases = _alias_lists(src_table)
    tgt_aliases = _alias_lists(tgt_table)
    votes = transpose_votes(src_table, tgt_table, zip(assignment.src.tolist(), assignment.tgt.tolist()))
    contested = (contested_rows(src_table.modules), contested_rows(tgt_table.modules))
    for k in range(len(assignment.src)):
        s, t = int(assignment.src[k]), int(assignment.tgt[k])
        components = {c: float(v[k]) for c, v in assignment.components.items()}
        entry = _entry(src_table, tgt_table, s, t, float(assignment.score[k]), float(assignment.margin[k]),
                       str(assignment.level[k]), components, source_prefix, votes.get((s, t)))
        if assignment.flags is not None and assignment.flags[k]:
            entry = replace(entry, flags=(*entry.flags, *assignment.flags[k]))
        if ((s in contested[0] or t in contested[1])
                and src_table.modules[s].rpartition(".")[2] != tgt_table.modules[t].rpartition(".")[2]):
            entry = replace(entry, flags=(*entry.flags, "contested_name"))
        if withhold_ambiguous and entry.flagged:
            withheld.append(entry)
            continue
        entries.append(entry)
        used_src.add(s)
        filled_tgt.add(t)
        # Tied weights: pair the aliases of both sides in order; extra target aliases are
        # filled from the same source, extra source aliases carry the same data anyway.
        s_names, t_names = src_aliases.get(s, [s]), tgt_aliases.get(t, [t])
        for i, t_alias in enumerate(t_names[1:], start=1):
            s_alias = s_names[min(i, len(s_names) - 1)]
            entries.append(_entry(src_table, tgt_table, s_alias, t_alias, 1.0, 1.0, "alias", {}, source_prefix,
                                  votes.get((s, t))))
            filled_tgt.add(t_alias)
        used_src.update(s_names)
    for c in combinations:
        entry = _combined_entry(src_table, tgt_table, c, level="combined", source_prefix=source_prefix)
        if withhold_ambiguous and entry.flagged:
            withheld.append(entry)
            continue
        entries.append(entry)
        used_src.update(c.src)
        filled_tgt.add(c.tgt)
    for c in splits:
        pieces = _split_entries(src_table, tgt_table, c, source_prefix)
        if withhold_ambiguous and any(p.flagged for p in pieces):
            withheld.extend(pieces)
            continue
        entries.extend(pieces)
        used_src.add(c.tgt)
        filled_tgt.update(c.src)
    entries = _flag_split_groups(entries, src_table, tgt_table, used_src, filled_tgt, source_prefix)
    if withhold_ambiguous:  # a split module is withheld whole
        withheld += [e for e in entries if "split_group" in e.flags]
        entries = [e for e in entries if "split_group" not in e.flags]
        kept_src = {src_table.name2row[s[len(source_prefix):]] for e in entries for s in e.source}
        used_src = {r for r in used_src if r in kept_src or int(src_table.alias_of[r]) in kept_src}
        filled_tgt = {tgt_table.name2row[e.target] for e in entries}
    entries.sort(key=lambda e: tgt_table.name2row[e.target])
    unmatched_src = tuple(source_prefix + n for r, n in enumerate(src_table.names) if r not in used_src and src_table.is_canonical[r])
    unmatched_tgt = tuple(n for r, n in enumerate(tgt_table.names) if r not in filled_tgt)
    return MappingPlan(
        entries=tuple(entries),
        unmatched_source=unmatched_src,
        unmatched_target=unmatched_tgt,
        ambiguous=tuple(withheld),
        strategy=strategy,
        threshold=threshold,
        weights=dict(weights),
        rounds=tuple(int(r) for r in assignment.rounds),
        converged=bool(assignment.converged),
        source_label=src_table.label,
        target_label=tgt_table.label,
        source_prefix=source_prefix,
        flow_sources=tuple(flow_sources),
    )


def _flag_split_groups(entries: list[PlanEntry], src_table: TensorTable, tgt_table: TensorTable,
                       used_src: set[int], filled_tgt: set[int], prefix: str) -> list[PlanEntry]:
    """Flag ``split_group`` on 1:1 entries whose source module left tensors behind that its
    target module still lacks. Scalars (``num_batches_tracked``) do not count."""
    def open_modules(table: TensorTable, done: set[int]) -> set[str]:
        return {table.modules[r] for r in range(len(table))
                if r not in done and table.is_canonical[r] and len(table.shapes[r]) > 0}

    src_open, tgt_open = open_modules(src_table, used_src), open_modules(tgt_table, filled_tgt)
    if not src_open or not tgt_open:
        return entries
    out = []
    for e in entries:
        if len(e.source) == 1 and e.level in ("group", "tensor"):
            s_row = src_table.name2row.get(e.source[0][len(prefix):])
            t_row = tgt_table.name2row[e.target]
            if (s_row is not None and src_table.modules[s_row] in src_open
                    and tgt_table.modules[t_row] in tgt_open and "split_group" not in e.flags):
                e = replace(e, flags=(*e.flags, "split_group"))
        out.append(e)
    return out


def _split_entries(src_table: TensorTable, tgt_table: TensorTable, c: Combination, prefix: str) -> list[PlanEntry]:
    """The entries of a split: the inverse of the combination of targets that rebuilds the source."""
    return invert_entries([_combined_entry(tgt_table, src_table, c, level="split", target_prefix=prefix)])


def _combined_entry(from_table: TensorTable, to_table: TensorTable, c: Combination, *, level: str,
                    source_prefix: str = "", target_prefix: str = "") -> PlanEntry:
    """The entry that builds ``to_table``'s row ``c.tgt`` from ``from_table``'s rows ``c.src``."""
    return PlanEntry(
        source=tuple(source_prefix + from_table.names[r] for r in c.src),
        target=target_prefix + to_table.names[c.tgt],
        transform=c.transform,
        score=c.score,
        margin=c.margin,
        level=level,
        source_shape=from_table.shapes[c.src[0]],
        target_shape=to_table.shapes[c.tgt],
        components=dict(c.components),
        args=_combined_args(from_table, c),
    )


def _alias_lists(table: TensorTable) -> dict[int, list[int]]:
    """Canonical row -> [canonical row, alias rows...] for tensors that have aliases."""
    out: dict[int, list[int]] = {}
    for row in np.flatnonzero(~table.is_canonical):
        owner = int(table.alias_of[row])
        out.setdefault(owner, [owner]).append(int(row))
    return out


def _combined_args(src_table: TensorTable, c: Combination) -> dict:
    """A combined entry's transform arguments, from its source shapes."""
    shapes = [list(src_table.shapes[r]) for r in c.src]
    if c.transform == "stack_concat":
        n = len(c.src) // c.parts
        return {"dim": 0, "parts": c.parts, "concat_dim": 1, "sizes": [shapes[p * n][0] for p in range(c.parts)],
                "source_shapes": shapes}
    if c.transposed:  # [in, out] fused weight: the transpose of the parts' concat
        return {"dim": 0, "sizes": [s[0] for s in shapes], "source_shapes": shapes, "transposed": True}
    return {"dim": 0, "sizes": [s[0] for s in shapes], "source_shapes": shapes}


def transform_for(s_shape, t_shape, s_type: str = "", t_type: str = "") -> tuple[str | None, dict]:
    """The transform (and its args) that turns a source tensor into a target tensor of a match.

    The transform registry decides (:func:`weight_mapper.transforms.relate`), as it decides
    the shape score the match was made with; ``(None, {})`` when no transform relates them.

    >>> transform_for((3, 2), (2, 3))
    ('transpose', {})
    >>> transform_for((8, 1, 1), (8,))
    ('reshape', {'shape': [8]})
    >>> transform_for((16, 72), (16, 8, 3, 3))
    ('reshape', {'shape': [16, 8, 3, 3]})
    """
    relation = relate(s_shape, t_shape, s_type, t_type)
    return (None, {}) if relation is None else (relation.transform, relation.args)


def _entry(src_table, tgt_table, s, t, score, margin, level, components, prefix,
           vote: TransposeVote | None = None) -> PlanEntry:
    """The entry of one match; ``vote`` decides a square 2-D weight the module types leave open."""
    s_shape, t_shape = src_table.shapes[s], tgt_table.shapes[t]
    transform, args = transform_for(s_shape, t_shape, src_table.module_types[s], tgt_table.module_types[t])
    flags: tuple[str, ...] = ()
    if vote is not None:
        transform, args = ("transpose" if vote.transpose else None), vote.args()
        flags = (vote.flag,) if vote.flag else ()
    return PlanEntry(
        source=(prefix + src_table.names[s],),
        target=tgt_table.names[t],
        transform=transform,
        score=score,
        margin=margin,
        level=level,
        source_shape=s_shape,
        target_shape=t_shape,
        components=components,
        args=args,
        flags=flags,
    )
