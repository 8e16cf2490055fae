"""Stage 7, for review: the plan as one self-contained HTML page to work in.

The page is a table of every entry (and every unmatched tensor) that sorts by risk, score,
margin or name, filters by review tier and by name, shows each entry's score breakdown on a
click, and the two module trees. Everything it shows is computed here, in Python, and embedded
as compact JSON; the page's own script (``review_page.html``, inline, no network) only renders
it, row by row as they scroll into view, so that 50,000 entries load in under 2 s
(measured by ``python -m benchmarks.review_page``).

Sub-scores and alternatives (what :func:`weight_mapper.assign.explain` gives) are embedded for
the riskiest entries only, up to ``max_breakdowns``; every entry has its component scores.

>>> from weight_mapper.plan import MappingPlan, PlanEntry
>>> entry = PlanEntry(("fc.weight",), "head.weight", None, 0.91, 0.5, "group", (3, 2), (3, 2))
>>> data = review_data(MappingPlan((entry,)))
>>> [PAGE_STATUSES[s] for s in data["rows"]["status"]], data["source"]["leaves"]
(['unproved'], ['weight'])
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from weight_mapper.plan import AMBIGUITY_MARGIN, FLAG_DESCRIPTIONS, MappingPlan
from weight_mapper.report import RISK_TIERS, risk_key, risk_tier
from weight_mapper.score import (
    BASE_COMPONENTS,
    CONTEXT,
    CONTEXT_WEIGHT,
    REPORTED_COMPONENTS,
    SCORE_COMPONENTS,
    SUB_SCORE_LABELS,
    SUB_SCORES,
)
from weight_mapper.table import TensorTable

__all__ = ["review_data", "export_review_page", "breakdown_candidates", "PAGE_STATUSES", "MAX_BREAKDOWNS"]

#: Row statuses of the page, riskiest first: the review tiers, with the unmatched tensors
#: after the flagged entries (a target left unmatched keeps its initial values).
PAGE_STATUSES = (RISK_TIERS[0], "unmatched", *RISK_TIERS[1:])
#: Entries whose sub-scores and alternatives are embedded by default, riskiest first.
MAX_BREAKDOWNS = 2000
# Components and sub-scores travel in the order of the registry (score.SCORE_COMPONENTS).
COMPONENTS = REPORTED_COMPONENTS
_CONTEXT_SHORT = "ctx"  # the context's column head in the narrow alternatives table
_SCALE = 1000  # scores travel as integers in thousandths: "812" is shorter than "0.8123"
_NONE = None  # no value (NaN, not used, no score): null, which no value in thousandths can be
_NO_ID = -1  # no tensor (an unmatched tensor's other side), no level or transform code
_TEMPLATE = "review_page.html"


def _milli(x: float | None) -> int | None:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return _NONE
    return round(float(x) * _SCALE)


class _Side:
    """One side's tensors and module tree, interned into compact columns."""

    def __init__(self, label: str):
        self.label = label
        self.node2id: dict[str, int] = {"": 0}
        self.node_parent: list[int] = [0]
        self.node_name: list[str] = [""]
        self.node_type: list[int] = [0]
        self.types: dict[str, int] = {"": 0}
        self.leaves: dict[str, int] = {}
        self.shapes: dict[str, int] = {"?": 0}
        self.name2id: dict[str, int] = {}
        self.t_node: list[int] = []
        self.t_leaf: list[int] = []
        self.t_shape: list[int] = []
        self.buffers: list[int] = []

    def _node(self, path: str, mtype: str = "") -> int:
        node = self.node2id.get(path)
        if node is None:
            # Ancestors first, without recursion: a name may nest 1,000 levels (validate.MAX_NAME_PARTS).
            missing = [path]
            while missing[-1].rpartition(".")[0] not in self.node2id:
                missing.append(missing[-1].rpartition(".")[0])
            node = self.node2id[missing[-1].rpartition(".")[0]]
            for ancestor in reversed(missing):
                parent, node = node, len(self.node_parent)
                self.node2id[ancestor] = node
                self.node_parent.append(parent)
                self.node_name.append(ancestor.rpartition(".")[2])
                self.node_type.append(self.types.setdefault(mtype if ancestor == path else "", len(self.types)))
        elif mtype and self.node_type[node] == 0:
            self.node_type[node] = self.types.setdefault(mtype, len(self.types))
        return node

    def add(self, name: str, shape: Sequence[int] | None = None, *, mtype: str = "", buffer: bool = False) -> int:
        """Id of tensor ``name``, added on first sight; a shape learnt later fills a ``?``."""
        shape_key = "?" if shape is None else ",".join(map(str, shape))
        tensor = self.name2id.get(name)
        if tensor is not None:
            if self.t_shape[tensor] == 0 and shape is not None:
                self.t_shape[tensor] = self.shapes.setdefault(shape_key, len(self.shapes))
            return tensor
        module, _, leaf = name.rpartition(".")
        tensor = len(self.t_node)
        self.name2id[name] = tensor
        self.t_node.append(self._node(module, mtype))
        self.t_leaf.append(self.leaves.setdefault(leaf, len(self.leaves)))
        self.t_shape.append(self.shapes.setdefault(shape_key, len(self.shapes)))
        if buffer:
            self.buffers.append(tensor)
        return tensor

    def add_table(self, table: TensorTable, prefix: str = "") -> None:
        for row, name in enumerate(table.names):
            self.add(prefix + name, table.shapes[row], mtype=table.module_types[row], buffer=bool(table.is_buffer[row]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "nodes": {"parent": self.node_parent, "name": self.node_name, "type": self.node_type},
            "types": list(self.types),
            "leaves": list(self.leaves),
            "shapes": list(self.shapes),
            "tensors": {"node": self.t_node, "leaf": self.t_leaf, "shape": self.t_shape, "buffers": self.buffers},
        }


def breakdown_candidates(plan: MappingPlan, *, limit: int = MAX_BREAKDOWNS) -> list[str]:
    """The source tensors whose breakdowns the page embeds: the riskiest entries' first sources,
    then the unmatched sources, at most ``limit``.

    >>> from weight_mapper.plan import PlanEntry
    >>> sure = PlanEntry(("a",), "x", None, 0.9, 0.5, "tensor", (2,), (2,))
    >>> close = PlanEntry(("b",), "y", None, 0.9, 0.001, "tensor", (2,), (2,))
    >>> breakdown_candidates(MappingPlan((sure, close), unmatched_source=("c",)), limit=2)
    ['b', 'c']
    """
    entries = sorted([*plan.entries, *plan.ambiguous], key=risk_key)
    flagged = [e.source[0] for e in entries if risk_tier(e) == "flagged" and e.level != "alias"]
    rest = [e.source[0] for e in entries if risk_tier(e) != "flagged" and e.level != "alias"]
    names = list(dict.fromkeys([*flagged, *plan.unmatched_source, *rest]))
    return names[: max(int(limit), 0)]


def _breakdown(ex: Mapping[str, Any]) -> list:
    """An explanation, compactly: ``[level, candidate, target_label, sub_scores, alternatives]``."""
    sub = ex.get("sub_scores") or {}
    alternatives = [[alt["label"], _milli(alt["score"]), *(_milli(alt["components"].get(c)) for c in COMPONENTS)]
                    for alt in ex.get("alternatives") or ()]
    return [ex.get("level"), ex.get("candidate"), ex.get("target_label"),
            [_milli(sub.get(k)) for k in SUB_SCORES], alternatives]


def review_data(
    plan: MappingPlan,
    *,
    source_table: TensorTable | None = None,
    target_table: TensorTable | None = None,
    explanations: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Everything the review page shows, as compact JSON-ready columns.

    Args:
        plan: The plan to review.
        source_table, target_table: Both sides in full (module types, buffers, shapes of the
            unmatched tensors); without them the sides are rebuilt from the plan's names.
        explanations: Source name -> :meth:`WeightMapper.explain
            <weight_mapper.mapper.WeightMapper.explain>` dict, for the entries whose sub-scores
            and alternatives the page shows.

    Returns:
        ``{"meta", "source", "target", "rows", "breakdowns"}``. ``rows`` holds one column per
        field (``src``, ``tgt``: tensor ids, -1 for none; ``score``, ``margin``: thousandths,
        None for none;
        ``status``: index in :data:`PAGE_STATUSES`; ``risk``: rank in review order ...).
    """
    explanations = explanations or {}
    source, target = _Side(plan.source_label or "source"), _Side(plan.target_label or "target")
    if source_table is not None:
        source.add_table(source_table, plan.source_prefix)
    if target_table is not None:
        target.add_table(target_table)
    levels: dict[str, int] = {}
    transforms: dict[str, int] = {}
    flags: dict[str, int] = {}
    rows: dict[str, list] = {k: [] for k in ("src", "tgt", "score", "margin", "level", "transform", "status",
                                             "components")}
    sparse: dict[str, dict[int, Any]] = {"sources": {}, "flags": {}, "withheld": {}}
    breakdowns: dict[int, list] = {}
    entries = [(e, False) for e in plan.entries] + [(e, True) for e in plan.ambiguous]
    for row, (entry, withheld) in enumerate(entries):
        shapes = (entry.args or {}).get("source_shapes") or [entry.source_shape] * len(entry.source)
        src_ids = [source.add(name, shape) for name, shape in zip(entry.source, shapes)]
        rows["src"].append(src_ids[0])
        rows["tgt"].append(target.add(entry.target, entry.target_shape))
        rows["score"].append(_milli(entry.score))
        rows["margin"].append(_milli(entry.margin))
        rows["level"].append(levels.setdefault(entry.level, len(levels)))
        rows["transform"].append(transforms.setdefault(entry.transform or "exact", len(transforms)))
        rows["status"].append(PAGE_STATUSES.index(risk_tier(entry)))
        rows["components"].extend(_milli(entry.components.get(c)) for c in COMPONENTS)
        if len(src_ids) > 1:
            sparse["sources"][row] = src_ids
        if entry.flags:
            sparse["flags"][row] = [flags.setdefault(f, len(flags)) for f in entry.flags]
        if withheld:
            sparse["withheld"][row] = 1
        ex = explanations.get(entry.source[0])
        if ex is not None and entry.level != "alias":
            breakdowns[row] = _breakdown(ex)
    unmatched = [(name, None) for name in plan.unmatched_source] + [(None, name) for name in plan.unmatched_target]
    for name_src, name_tgt in unmatched:
        row = len(rows["src"])
        rows["src"].append(source.add(name_src) if name_src is not None else _NO_ID)
        rows["tgt"].append(target.add(name_tgt) if name_tgt is not None else _NO_ID)
        rows["score"].append(_NONE)
        rows["margin"].append(_NONE)
        rows["level"].append(_NO_ID)
        rows["transform"].append(_NO_ID)
        rows["status"].append(PAGE_STATUSES.index("unmatched"))
        rows["components"].extend([_NONE] * len(COMPONENTS))
        ex = explanations.get(name_src) if name_src is not None else None
        if ex is not None:
            breakdowns[row] = _breakdown(ex)
    # Review order, computed once here: risk_key for entries; the unmatched after the flagged.
    n_entries = len(entries)

    def order_key(row: int) -> tuple:
        if row < n_entries:
            tier, margin, score = risk_key(entries[row][0])
            return PAGE_STATUSES.index(RISK_TIERS[tier]), margin, score, row
        return PAGE_STATUSES.index("unmatched"), 0.0, 0.0, row

    risk = [0] * len(rows["src"])
    for rank, row in enumerate(sorted(range(len(risk)), key=order_key)):
        risk[row] = rank
    rows["risk"] = risk
    n_matched = len(plan.entries)
    meta = {
        "source_label": plan.source_label, "target_label": plan.target_label, "strategy": plan.strategy,
        "threshold": plan.threshold, "coverage": round(plan.coverage, 6), "n_target": plan.n_target,
        "n_source": plan.n_source, "n_matched": n_matched, "n_withheld": len(plan.ambiguous),
        "n_unmatched_source": len(plan.unmatched_source), "n_unmatched_target": len(plan.unmatched_target),
        "rounds": list(plan.rounds), "converged": plan.converged, "source_prefix": plan.source_prefix,
        "weights": {k: float(v) for k, v in plan.weights.items()},
        "context_weight": CONTEXT_WEIGHT, "ambiguity_margin": AMBIGUITY_MARGIN, "statuses": list(PAGE_STATUSES),
        "components": list(COMPONENTS), "base_components": list(BASE_COMPONENTS),
        "component_labels": {c.key: c.label for c in SCORE_COMPONENTS},
        "component_short_labels": {**{c.key: c.short_label for c in SCORE_COMPONENTS}, CONTEXT: _CONTEXT_SHORT},
        "sub_scores": list(SUB_SCORES), "sub_labels": dict(SUB_SCORE_LABELS), "shares": _shares(),
        "levels": list(levels), "transforms": list(transforms), "flags": list(flags),
        "flag_descriptions": {f: FLAG_DESCRIPTIONS.get(f, "") for f in flags},
        "n_breakdowns": len(breakdowns),
    }
    return {"meta": meta, "source": source.to_dict(), "target": target.to_dict(), "rows": rows,
            "sources": sparse["sources"], "flags": sparse["flags"], "withheld": list(sparse["withheld"]),
            "breakdowns": breakdowns}


def _shares() -> dict[str, list]:
    """Each component's share tables, as the page picks them: ``[[sub-score or None, {key: share}], ...]``,
    the first whose sub-score is available (None: always) in force (see ``Component.shares_for``)."""
    return {c.key: [*([k, dict(t)] for k, t in c.shares_when), [None, dict(c.shares)]]
            for c in SCORE_COMPONENTS if c.parts}


def render_page(data: Mapping[str, Any], *, title: str) -> str:
    """The page's HTML with ``data`` embedded (``</`` escaped so that no name can end the script)."""
    import html

    template = resources.files("weight_mapper").joinpath(_TEMPLATE).read_text(encoding="utf-8")
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False).replace("</", "<\\/")
    head, _, tail = template.partition("__DATA__")
    return head.replace("__TITLE__", html.escape(title)) + payload + tail


def export_review_page(
    plan: MappingPlan,
    path: str | Path,
    *,
    source_table: TensorTable | None = None,
    target_table: TensorTable | None = None,
    explanations: Mapping[str, Mapping[str, Any]] | None = None,
    title: str | None = None,
    protected: Iterable[str | Path] = (),
) -> Path:
    """Write the review page of ``plan`` as one self-contained HTML file, atomically.

    Args:
        plan: The plan to review.
        path: The HTML file to write.
        source_table, target_table, explanations: See :func:`review_data`.
        title: The page title; default ``weight_mapper review: SOURCE -> TARGET``.
        protected: Paths the file must never overwrite (the checkpoints, the plan).

    Raises:
        CheckpointError: If ``path`` is protected or its folder is missing.
    """
    from weight_mapper.checkpoint import write_text_atomic

    data = review_data(plan, source_table=source_table, target_table=target_table, explanations=explanations)
    title = title or f"weight_mapper review: {plan.source_label or 'source'} -> {plan.target_label or 'target'}"
    return write_text_atomic(path, render_page(data, title=title), protected=protected)

