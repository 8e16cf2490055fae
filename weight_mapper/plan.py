"""Stage 5: the mapping plan, a frozen JSON-serialisable record of what goes where.

Matching produces a :class:`MappingPlan`; applying it (:mod:`weight_mapper.apply`) never
scores anything. Entries carry source keys (a tuple, so that fused tensors can come later),
the target key, a transform from :mod:`weight_mapper.transforms`, the score and its margin.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from weight_mapper.assign import AMBIGUITY_MARGIN, Assignment
from weight_mapper.combine import Combination
from weight_mapper.storage import TransposeVote, transpose_votes
from weight_mapper.score import TRANSPOSED_TYPES
from weight_mapper.errors import PlanError
from weight_mapper.table import TensorTable
from weight_mapper.transforms import TRANSFORMS, invert_entries
from weight_mapper.validate import Invalid, check_plan_dict, loads_json, short

__all__ = ["PlanEntry", "MappingPlan", "build_plan", "PLAN_FORMAT_VERSION", "FLAG_DESCRIPTIONS", "PROVENANCES"]

PLAN_FORMAT_VERSION = 1

#: What each entry flag means (shown in reports and views).
FLAG_DESCRIPTIONS = {
    "order_only": "decided by order alone: names and shapes could not tell the candidates apart",
    "split_group": "its module moved only in part: other tensors of the source module stayed unmatched "
                   "while the target module still has tensors to fill (a BatchNorm's running statistics "
                   "without its weight and bias); map the rest or none of it",
    "names_disagree": "another candidate's name fits clearly better: order or context overrode the names",
    "convention:rotary": "one side may keep its rotary q/k rows interleaved (Meta, torchtune) and the other "
                         "half-split (Hugging Face); nothing but a forward pass can tell, so the rows were copied "
                         "as they are: confirm with verify(..., repair=True)",
    "transpose_unknown": "a square 2-D weight whose storage ([out, in] or [in, out]) neither module types nor "
                         "any non-square weight of its kind shows: copied untransposed, check it",
    "transpose_split": "a square 2-D weight transposed (or not) by a split majority of the non-square "
                       "weights of its kind",
}

#: The ways an entry can have been established (``PlanEntry.provenance``).
PROVENANCES = ("matched", "repaired", "proved")


@dataclass(frozen=True)
class PlanEntry:
    """One target tensor and where its values come from.

    Attributes:
        source: Source key(s) the target is built from (one for a rename).
        target: Target key.
        transform: Name of a registered transform, ``None`` for a plain copy.
        score: Combined similarity in [0, 1]; 1.0 for aliases of a matched tensor.
        margin: Score minus the best alternative's; small means ambiguous.
        level: ``"group"``, ``"tensor"``, ``"combined"`` (several sources, concat / stack),
            ``"split"`` (a piece of one fused source: slice / index) or ``"alias"`` (tied weight
            filled from its twin).
        source_shape, target_shape: Shapes on both sides.
        components: ``shape``, ``name``, ``hierarchy`` and ``context`` scores (NaN: not used).
        args: Arguments of the transform (``{"dim": 0, "sizes": [...]}`` for ``concat``...).
        flags: Reasons to review the entry besides a small margin, e.g. ``"order_only"``
            (decided by order alone) or ``"convention:rotary"`` (a layout convention may apply
            that the shapes cannot show). See :data:`FLAG_DESCRIPTIONS`.
        provenance: How the entry was established: ``"matched"`` (inferred from names,
            shapes and structure), ``"repaired"`` (changed after a layer-wise proof found the
            match wrong) or ``"proved"`` (a layer-wise proof confirmed it).
    """

    source: tuple[str, ...]
    target: str
    transform: str | None
    score: float
    margin: float
    level: str
    source_shape: tuple[int, ...]
    target_shape: tuple[int, ...]
    components: Mapping[str, float] = field(default_factory=dict)
    args: Mapping[str, Any] = field(default_factory=dict)
    flags: tuple[str, ...] = ()
    provenance: str = "matched"

    @property
    def ambiguous(self) -> bool:
        """True when the runner-up scored within :data:`AMBIGUITY_MARGIN` of this match."""
        return self.level != "alias" and self.margin < AMBIGUITY_MARGIN

    @property
    def flagged(self) -> bool:
        """True when the entry needs a review: ambiguous, or carrying a flag."""
        return self.ambiguous or bool(self.flags)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["source"] = list(self.source)
        out["source_shape"] = list(self.source_shape)
        out["target_shape"] = list(self.target_shape)
        out["components"] = {k: _json_float(v) for k, v in self.components.items()}
        out["args"] = dict(self.args)
        out["flags"] = list(self.flags)
        out["ambiguous"] = self.ambiguous
        out["flagged"] = self.flagged
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlanEntry:
        try:
            source = data["source"]
            return cls(
                source=(source,) if isinstance(source, str) else tuple(source),
                target=str(data["target"]),
                transform=data.get("transform"),
                score=float(data.get("score", 1.0)),
                margin=float(data.get("margin", 1.0)),
                level=str(data.get("level", "tensor")),
                source_shape=tuple(int(d) for d in data.get("source_shape", ())),
                target_shape=tuple(int(d) for d in data.get("target_shape", ())),
                components={k: float("nan") if v is None else float(v) for k, v in data.get("components", {}).items()},
                args=dict(data.get("args", {})),
                flags=tuple(str(f) for f in data.get("flags", ())),
                provenance=str(data.get("provenance", "matched")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PlanError(f"malformed plan entry {short(data, 200)}: {exc}") from None


def _json_float(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 6)


@dataclass(frozen=True)
class MappingPlan:
    """The result of matching: entries, what stayed unmatched, and how it was obtained.

    Attributes:
        entries: One per filled target tensor, in target definition order.
        unmatched_source: Source keys not used by any entry.
        unmatched_target: Target keys no entry fills.
        ambiguous: Entries withheld as ambiguous (strategy ``conservative``).
        strategy, threshold, weights: The options that produced the plan.
        rounds: Hierarchy-context rounds (group level, tensor level).
        converged: Whether the context rounds reached a fixed point.
        source_label, target_label: Where the two sides came from.
        source_prefix: Wrapper prefix (``module.``) found on every source key and ignored
            while matching; entries keep the full checkpoint keys.
        path: The file the plan was read from (:meth:`from_json`), which saving a
            conversion never overwrites; None for a plan built in memory.
        flow_sources: Where each side's data-flow positions came from: ``"dummy_input"``,
            ``"fx"``, ``"meta-synthetic"``, ``"real-synthetic"`` or ``"none"``
            (see :data:`weight_mapper.flow.FLOW_SOURCES`).
    """

    entries: tuple[PlanEntry, ...]
    unmatched_source: tuple[str, ...] = ()
    unmatched_target: tuple[str, ...] = ()
    ambiguous: tuple[PlanEntry, ...] = ()
    strategy: str = "best_match"
    threshold: float = 0.6
    weights: Mapping[str, float] = field(default_factory=dict)
    rounds: tuple[int, int] = (0, 0)
    converged: bool = True
    source_label: str = ""
    target_label: str = ""
    source_prefix: str = ""
    flow_sources: tuple[str, str] = ("none", "none")
    path: Path | None = field(default=None, compare=False, repr=False)

    # ------------------------------------------------------------------ views
    @property
    def mapping(self) -> dict[str, str]:
        """Source key -> target key, the plain dict ``suggest_mapping`` returns.

        A source that fills several targets (tied on the target side only) maps to the first.
        """
        out: dict[str, str] = {}
        for e in self.entries:
            for s in e.source:
                out.setdefault(s, e.target)
        return out

    @property
    def n_source(self) -> int:
        return len({s for e in self.entries for s in e.source}) + len(self.unmatched_source)

    @property
    def n_target(self) -> int:
        return len(self.entries) + len(self.unmatched_target)

    @property
    def coverage(self) -> float:
        """Fraction of target tensors the plan fills."""
        return len(self.entries) / self.n_target if self.n_target else 1.0

    def inverse(self) -> MappingPlan:
        """The plan that maps the converted checkpoint back onto the source names.

        Every transform is undone by its registered inverse (a ``concat`` becomes one
        ``slice`` per source, a ``stack`` one ``index`` per source, and back).

        Raises:
            PlanError: If an entry has no unique way back.

        >>> e = PlanEntry(("a",), "b", "transpose", 1.0, 1.0, "tensor", (2, 3), (3, 2))
        >>> MappingPlan((e,)).inverse().entries[0].source
        ('b',)
        """
        return replace(
            self,
            entries=tuple(invert_entries(self.entries)),
            unmatched_source=self.unmatched_target,
            unmatched_target=self.unmatched_source,
            ambiguous=(),
            source_label=self.target_label,
            target_label=self.source_label,
            source_prefix="",
            flow_sources=self.flow_sources[::-1],
        )

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "weight_mapper.plan",
            "version": PLAN_FORMAT_VERSION,
            "source_label": self.source_label,
            "target_label": self.target_label,
            "source_prefix": self.source_prefix,
            "flow_sources": list(self.flow_sources),
            "strategy": self.strategy,
            "threshold": self.threshold,
            "weights": dict(self.weights),
            "rounds": list(self.rounds),
            "converged": self.converged,
            "coverage": round(self.coverage, 6),
            "entries": [e.to_dict() for e in self.entries],
            "ambiguous": [e.to_dict() for e in self.ambiguous],
            "unmatched_source": list(self.unmatched_source),
            "unmatched_target": list(self.unmatched_target),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MappingPlan:
        """Rebuild a plan from :meth:`to_dict` output.

        Raises:
            PlanError: If ``data`` is not a weight_mapper plan.
        """
        try:
            check_plan_dict(dict(data) if isinstance(data, Mapping) else data, version=PLAN_FORMAT_VERSION,
                            known_transforms=TRANSFORMS)
        except Invalid as exc:
            raise PlanError(str(exc)) from None
        return cls(
            entries=tuple(PlanEntry.from_dict(e) for e in data["entries"]),
            unmatched_source=tuple(data.get("unmatched_source", ())),
            unmatched_target=tuple(data.get("unmatched_target", ())),
            ambiguous=tuple(PlanEntry.from_dict(e) for e in data.get("ambiguous", ())),
            strategy=str(data.get("strategy", "best_match")),
            threshold=float(data.get("threshold", 0.6)),
            weights=dict(data.get("weights", {})),
            rounds=tuple(int(r) for r in data.get("rounds", (0, 0))),
            converged=bool(data.get("converged", True)),
            source_label=str(data.get("source_label", "")),
            target_label=str(data.get("target_label", "")),
            source_prefix=str(data.get("source_prefix", "")),
            flow_sources=tuple(str(x) for x in data.get("flow_sources", ("none", "none"))),
        )

    def to_json(self, path: str | Path | None = None, *, indent: int = 2) -> str:
        """Serialise; write atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            from weight_mapper.checkpoint import write_text_atomic

            write_text_atomic(Path(path), text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> MappingPlan:
        """Load a plan from a JSON string or file.

        Raises:
            PlanError: If the file is missing or is not valid plan JSON.
        """
        text, where, path = str(text_or_path), "plan", None
        if not text.lstrip().startswith("{"):
            path = Path(text_or_path)
            where = f"plan file {path}"
            try:
                if not path.is_file():  # also refuses a FIFO or a device before opening it
                    raise PlanError(f"No such plan file: {path}" if not path.exists() else
                                    f"{where} is not a regular file; pass the JSON that `weight-mapper map -o` wrote")
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError, ValueError) as exc:
                raise PlanError(f"{where} could not be read as text ({exc}); is it a checkpoint? "
                                "Pass the JSON that `weight-mapper map -o` wrote") from None
        try:
            data = loads_json(text)
        except Invalid as exc:
            raise PlanError(f"{where} is {exc if str(exc).startswith('not') else f'not usable: {exc}'}; "
                            "regenerate it with `weight-mapper map`") from None
        try:
            plan = cls.from_dict(data)
        except PlanError as exc:
            raise PlanError(f"{where}: {exc}") from None
        return plan if path is None else replace(plan, path=path)


# ---------------------------------------------------------------------------- building
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
    for k in range(len(assignment.src)):
        s, t = int(assignment.src[k]), int(assignment.tgt[k])
        components = {c: float(v[k]) for c, v in assignment.components.items()}
        entry = _entry(src_table, tgt_table, s, t, float(assignment.score[k]), float(assignment.margin[k]),
                       str(assignment.level[k]), components, source_prefix, votes.get((s, t)))
        if assignment.flags is not None and assignment.flags[k]:
            entry = replace(entry, flags=(*entry.flags, *assignment.flags[k]))
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

    >>> transform_for((3, 2), (2, 3))
    ('transpose', {})
    >>> transform_for((8, 1, 1), (8,))
    ('reshape', {'shape': [8]})
    >>> transform_for((16, 72), (16, 8, 3, 3))
    ('reshape', {'shape': [16, 8, 3, 3]})
    """
    s_shape, t_shape = tuple(s_shape), tuple(t_shape)
    if len(s_shape) == 2 and (s_type, t_type) in TRANSPOSED_TYPES:
        return ("transpose", {}) if s_shape[::-1] == t_shape else (None, {})
    if s_shape == t_shape:
        return None, {}
    if len(s_shape) == 2 and s_shape[::-1] == t_shape:
        return "transpose", {}
    if [d for d in s_shape if d != 1] == [d for d in t_shape if d != 1]:
        return "reshape", {"shape": list(t_shape)}
    if (min(len(s_shape), len(t_shape)) >= 2 and s_shape[0] == t_shape[0]
            and math.prod(s_shape) == math.prod(t_shape)):  # flattened trailing dims
        return "reshape", {"shape": list(t_shape)}
    return None, {}


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
