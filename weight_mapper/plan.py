"""Stage 5: the mapping plan, a frozen JSON-serialisable record of what goes where.

Matching produces a :class:`MappingPlan` (:func:`weight_mapper.planner.build_plan` builds it
from the matcher's output); applying it (:mod:`weight_mapper.apply`) never scores anything.
This module is data only: it imports nothing of the matcher (no numpy, scipy or
rapidfuzz), so reading, inverting and applying a plan loads none of them. Entries carry source keys (a tuple, so that fused tensors can come later),
the target key, a transform from :mod:`weight_mapper.transforms`, the score and its margin.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from weight_mapper.errors import PlanError
from weight_mapper.transforms import TRANSFORMS, invert_entries
from weight_mapper.validate import Invalid, check_plan_dict, loads_json, short

__all__ = ["PlanEntry", "MappingPlan", "PLAN_FORMAT_VERSION", "FLAG_DESCRIPTIONS", "PROVENANCES", "AMBIGUITY_MARGIN"]

PLAN_FORMAT_VERSION = 1
#: A match whose runner-up scored closer than this is ambiguous (:attr:`PlanEntry.ambiguous`).
#: It lives with the plan, which reads it; :mod:`weight_mapper.assign` re-exports it.
AMBIGUITY_MARGIN = 0.02

#: What each entry flag means (shown in reports and views).
FLAG_DESCRIPTIONS = {
    "order_only": "decided by order alone: names and shapes could not tell the candidates apart",
    "split_group": "its module moved only in part: other tensors of the source module stayed unmatched "
                   "while the target module still has tensors to fill (a BatchNorm's running statistics "
                   "without its weight and bias); map the rest or none of it",
    "names_disagree": "another candidate's name fits clearly better: order or context overrode the names",
    "contested_name": "one side's module name means different layers in different architectures "
                      "(data/vocabulary.json 'contested': post_attention_layernorm beside a pre_feedforward_layernorm "
                      "is Gemma's attention-output norm, not Llama's MLP norm): check it",
    "swap_partner": "a doubtful entry (ambiguous or flagged) could be exchanged with this one at a cost under "
                    "0.1 of their summed score: the two may be swapped, review them together",
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
