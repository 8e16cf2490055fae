"""The library core: two tables and one set of options in, a :class:`MappingPlan` out.

``match(source_table, target_table, *, options)`` runs the whole matcher on two
:class:`~weight_mapper.table.TensorTable` objects: the wrapper prefix and the ``[in, out]``
storage of untyped sides are settled first (:func:`prepare_tables`), then the 1:1 assignment
(:func:`~weight_mapper.assign.assign`), the choice between twin source towers
(:func:`~weight_mapper.towers.tower_exclusions`), the concat / stack / split proposals
(:func:`~weight_mapper.combine.combine`, :func:`~weight_mapper.combine.split`), the 1:1
assignment again without the tensors those take, and the plan
(:func:`~weight_mapper.planner.build_plan`). Every option travels in one frozen
:class:`MatchOptions`, validated when it is built.

:class:`~weight_mapper.mapper.WeightMapper` is a facade over this module: it builds the tables
from models, state dicts or checkpoints (with their data flow), calls the same core, and then
does what needs the models themselves (the convention catalogue and the layer-wise proof, see
:func:`weight_mapper.verify.settle_plan`).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np

from weight_mapper.assign import MAX_ROUNDS, Assignment, assign
from weight_mapper.combine import combine, split
from weight_mapper.errors import MappingError
from weight_mapper.flow import FLOW_SOURCES
from weight_mapper.plan import MappingPlan
from weight_mapper.planner import build_plan
from weight_mapper.score import (
    DEFAULT_WEIGHTS,
    validate_incompatible_pairs,
    validate_weights,
)
from weight_mapper.storage import infer_storage
from weight_mapper.table import TensorTable
from weight_mapper.towers import tower_exclusions

__all__ = [
    "STRATEGIES",
    "MatchOptions",
    "Matched",
    "PreparedTables",
    "Strategy",
    "match",
    "match_prepared",
    "prepare_tables",
    "strip_source_prefix",
]


class Strategy(NamedTuple):
    """What a strategy name stands for: one row of :data:`STRATEGIES`."""

    solver: str  # "optimal" (linear_sum_assignment) or "greedy" (highest score first)
    use_context: bool  # re-solve with the hierarchy context until the assignment is stable
    min_threshold: float  # the threshold is raised to at least this
    withhold_ambiguous: bool  # flagged entries go to plan.ambiguous instead of the mapping
    weights: dict[str, float] | None  # forced component weights (the user's are ignored), or None
    combined: bool  # propose concat / stack / split matches besides the 1:1 ones


#: Strategy name -> what it does.
STRATEGIES: dict[str, Strategy] = {
    "best_match": Strategy("optimal", True, 0.0, False, None, True),
    "conservative": Strategy("optimal", True, 0.75, True, None, True),
    "shape_only": Strategy("optimal", False, 0.0, False, {c: float(c == "shape") for c in DEFAULT_WEIGHTS}, False),
    "greedy": Strategy("greedy", True, 0.0, False, None, True),
}

IncompatibleRules = tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]


@dataclass(frozen=True)
class MatchOptions:
    """Every option of matching, validated once when built; change one with :func:`dataclasses.replace`.

    Attributes:
        strategy: A key of :data:`STRATEGIES`: ``"best_match"`` (optimal assignment with
            hierarchy context), ``"conservative"`` (the same, threshold at least 0.75, flagged
            matches withheld), ``"shape_only"`` (shapes and definition order only, like timm's
            positional remap; no combined matches) or ``"greedy"`` (highest score first).
        threshold: Minimum final score of a match, in [0, 1]. Matching runs with every
            admissible pair and the threshold filters the final scores, so a pair's score never
            depends on it.
        weights: Component weights (``{"shape": 0.5, "name": 0.3, "hierarchy": 0.2}`` by
            default), scaled to sum to 1 when used; ``shape_only`` forces its own.
        shape_tolerance: Relative difference per dimension under which two shapes still count
            as a (weak) match, in [0, 1); 0 accepts only equal or transposed shapes.
        incompatible_pairs: Pairs of module names (or of sets of alternatives) whose tensors
            are never matched across, e.g. ``[("encoder", "decoder")]``; kept in the validated
            form of :func:`~weight_mapper.score.validate_incompatible_pairs`.
        max_rounds: Bound on the hierarchy-context rounds per level, >= 1.
        source_prefix: Wrapper prefix of the source names (``"module."``) to ignore while
            matching and put back on the plan's keys; None detects a known one
            (DDP, ``torch.compile``, Lightning) that the target lacks; ``""`` strips nothing.
        infer_storage: Read the ``[in, out]`` storage of untyped sides (state dicts) off their
            non-square weights (:func:`~weight_mapper.storage.infer_storage`).
        use_flow: Use the tables' data-flow positions (``exec_pos``) in the scores; False
            matches as if neither side had any.
        flow_sources: Where each side's data-flow positions came from (keys of
            :data:`~weight_mapper.flow.FLOW_SOURCES`), recorded in ``plan.flow_sources``.

    Raises:
        MappingError: Naming the bad option and what it accepts.

    >>> MatchOptions(strategy="conservative", threshold=0.5).effective_threshold
    0.75
    >>> MatchOptions(threshold=2)
    Traceback (most recent call last):
    ...
    weight_mapper.errors.MappingError: threshold must be a number in [0, 1], got 2
    """

    strategy: str = "best_match"
    threshold: float = 0.6
    weights: Mapping[str, float] | None = field(default=None, hash=False)
    shape_tolerance: float = 0.0
    incompatible_pairs: IncompatibleRules | Iterable[tuple[Any, Any]] | None = ()
    max_rounds: int = MAX_ROUNDS
    source_prefix: str | None = None
    infer_storage: bool = True
    use_flow: bool = True
    flow_sources: tuple[str, str] = ("none", "none")

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise MappingError(f"unknown strategy {self.strategy!r}; choose one of {sorted(STRATEGIES)}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1:
            raise MappingError(f"threshold must be a number in [0, 1], got {t!r}")
        if not isinstance(self.max_rounds, int) or self.max_rounds < 1:
            raise MappingError(f"max_rounds must be an integer >= 1, got {self.max_rounds!r}")
        validate_weights(self.weights)  # raises on bad weights; the given values are kept as given
        tol = self.shape_tolerance
        if not isinstance(tol, (int, float)) or not 0 <= tol < 1:
            raise MappingError(f"shape_tolerance must be a number in [0, 1), got {tol!r}")
        if self.source_prefix is not None and not isinstance(self.source_prefix, str):
            raise MappingError(f"source_prefix must be a string such as 'module.' (or None to detect one), "
                               f"got {self.source_prefix!r}")
        for name in ("infer_storage", "use_flow"):
            if not isinstance(getattr(self, name), bool):
                raise MappingError(f"{name} must be True or False, got {getattr(self, name)!r}")
        sources = self.flow_sources
        if not isinstance(sources, (tuple, list)) or len(sources) != 2 or any(s not in FLOW_SOURCES for s in sources):
            raise MappingError(f"flow_sources must be a (source, target) pair of {sorted(FLOW_SOURCES)}, "
                               f"got {sources!r}")
        # Frozen: store the normalised forms (immutable, so that the options cannot change under a plan).
        object.__setattr__(self, "threshold", float(t))
        object.__setattr__(self, "shape_tolerance", float(tol))
        object.__setattr__(self, "incompatible_pairs", validate_incompatible_pairs(self.incompatible_pairs))
        object.__setattr__(self, "flow_sources", (sources[0], sources[1]))
        if self.weights is not None:
            object.__setattr__(self, "weights", MappingProxyType(dict(self.weights)))

    @property
    def rule(self) -> Strategy:
        """The :data:`STRATEGIES` row of :attr:`strategy`."""
        return STRATEGIES[self.strategy]

    @property
    def effective_weights(self) -> dict[str, float]:
        """The component weights matching uses: the strategy's forced ones or :attr:`weights`, scaled to sum to 1."""
        forced = self.rule.weights
        return validate_weights(forced if forced is not None else self.weights)

    @property
    def effective_threshold(self) -> float:
        """:attr:`threshold`, raised to the strategy's minimum."""
        return max(self.threshold, self.rule.min_threshold)


class PreparedTables(NamedTuple):
    """Both sides as matching sees them: source prefix stripped, storage of untyped sides inferred."""

    source: TensorTable
    target: TensorTable
    source_prefix: str  # the prefix stripped from the source names ("" for none)


def strip_source_prefix(source_table: TensorTable, target_table: TensorTable, *,
                        prefix: str | None = None) -> tuple[TensorTable, str]:
    """The source table without a wrapper prefix (``module.``) that the target lacks, and that prefix.

    Args:
        source_table, target_table: The two sides; neither is modified.
        prefix: The prefix to strip; None detects a known wrapper prefix
            (:func:`~weight_mapper.checkpoint.detect_wrapper_prefix`). Nothing is stripped when
            the target's names carry the same prefix.

    Returns:
        ``(table, prefix)``: a new table with the prefix removed from every name and the prefix
        removed, or ``(source_table, "")`` when there is none.

    Raises:
        MappingError: If ``prefix`` does not start every source name.

    >>> src = TensorTable.from_state_dict({"module.fc.weight": (2, 2)})
    >>> table, prefix = strip_source_prefix(src, TensorTable.from_state_dict({"fc.weight": (2, 2)}))
    >>> table.names, prefix
    (('fc.weight',), 'module.')
    """
    from weight_mapper.checkpoint import detect_wrapper_prefix

    src, tgt = source_table, target_table
    found = prefix if prefix is not None else detect_wrapper_prefix(src.names)
    if not found or detect_wrapper_prefix(tgt.names) == found:
        return src, ""
    if not all(n.startswith(found) for n in src.names):
        raise MappingError(f"source_prefix {found!r} is not a prefix of every source key")
    # A new table (not a copy of the old one's cached columns): every derived column follows the names.
    return replace(src, names=tuple(n[len(found):] for n in src.names)), found


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while the matcher runs (restored after, also on error).

    Matching allocates millions of small tuples and lists (names' tokens, candidate keys) and
    makes no reference cycles of its own; each time those allocations trip the collector's
    thresholds, a full collection walks every tracked object of the process, the caller's model
    too. With a 671B DeepSeek-V3 on the meta device alive (460,000 tracked objects) the 45,395-tensor
    mapping spent 1.0 of its 3.4 s of CPU in five full collections. The mapper builds its tables
    under it too. Nested uses are harmless: the collector is re-enabled only by the use that paused
    it, and never if the caller had disabled it.
    """
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


@_collector_paused()
def prepare_tables(source_table: TensorTable, target_table: TensorTable, *,
                   options: MatchOptions = MatchOptions()) -> PreparedTables:
    """Both tables as matching sees them (new tables; the given ones are not modified).

    The source's wrapper prefix is stripped (``options.source_prefix``), the ``[in, out]``
    storage of untyped sides inferred (``options.infer_storage``) and, with
    ``options.use_flow=False``, the data-flow positions dropped.

    Raises:
        MappingError: If ``options.source_prefix`` does not start every source name.
    """
    source, prefix = strip_source_prefix(source_table, target_table, prefix=options.source_prefix)
    target = target_table
    if options.infer_storage:  # untyped sides (state dicts): read their [in, out] storage off non-square weights
        source = infer_storage(source, target)
        target = infer_storage(target, source)
    if not options.use_flow:
        source, target = (replace(t, exec_pos=np.full(len(t), np.nan)) for t in (source, target))
    return PreparedTables(source, target, prefix)


class Matched(NamedTuple):
    """What the core computed: the plan and the 1:1 assignment behind it (for ``explain``)."""

    plan: MappingPlan
    assignment: Assignment


def match(
    source_table: TensorTable,
    target_table: TensorTable,
    *,
    options: MatchOptions = MatchOptions(),
    progress: Callable[[str], None] | None = None,
) -> MappingPlan:
    """Match the tensors of two tables and return the plan: the library's one route from tables to a plan.

    Args:
        source_table: The tensors to convert (:meth:`TensorTable.from_module`,
            :meth:`~TensorTable.from_state_dict` or :meth:`~TensorTable.from_checkpoint`).
        target_table: The tensors to fill.
        options: Every matching option (:class:`MatchOptions`).
        progress: Called with a short description as each step starts (for a status line).

    Returns:
        The :class:`MappingPlan`: entries with transforms, scores and margins; unmatched
        tensors of both sides; the options that made it.

    Raises:
        MappingError: If ``options.source_prefix`` does not start every source name.

    >>> from torch import nn
    >>> old = TensorTable.from_module(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    >>> new = TensorTable.from_module(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)))
    >>> match(old, new, options=MatchOptions(strategy="conservative")).mapping["2.weight"]
    '1.weight'
    """
    return match_prepared(prepare_tables(source_table, target_table, options=options), options=options,
                          progress=progress).plan


@_collector_paused()
def match_prepared(
    tables: PreparedTables,
    *,
    options: MatchOptions,
    progress: Callable[[str], None] | None = None,
) -> Matched:
    """The core of :func:`match`, on tables :func:`prepare_tables` made (``options.source_prefix``,
    ``infer_storage`` and ``use_flow`` were applied there; ``tables.source_prefix`` is recorded).

    Returns:
        The plan and the final 1:1 :class:`~weight_mapper.assign.Assignment` (every pair at
        least the effective threshold), which :func:`weight_mapper.assign.explain` reads.
    """
    src, tgt = tables.source, tables.target
    rule = options.rule
    weights = options.effective_weights
    threshold = options.effective_threshold
    pairs = validate_incompatible_pairs(options.incompatible_pairs)  # already normalised: typed here

    def assign_all(skip_src: np.ndarray | None = None, skip_tgt: np.ndarray | None = None) -> Assignment:
        # Every admissible pair competes (threshold 0); the threshold then filters the final scores.
        return assign(src, tgt, weights=weights, threshold=0.0, solver=rule.solver, use_context=rule.use_context,
                      tolerance=options.shape_tolerance, incompatible_pairs=pairs, max_rounds=options.max_rounds,
                      skip_src=skip_src, skip_tgt=skip_tgt, progress=progress)

    every = assign_all()
    # Two source towers that could each supply the whole target (T5's encoder and decoder for
    # an encoder): the target draws from one of them (weight_mapper/towers.py).
    towers = tower_exclusions(src, tgt, every.src)
    left_out = towers.rows if towers is not None else np.zeros(0, np.int64)
    if towers is not None:
        if progress is not None:
            progress(f"towers: {towers.describe()}")
        every = assign_all(skip_src=left_out)
    combinations, splits = [], []
    if rule.combined:
        if progress is not None:
            progress("combined matches: looking for concat / stack / split candidates")
        combinations = combine(src, tgt, every, weights=weights, threshold=threshold, incompatible_pairs=pairs,
                               skip_src=left_out)
        splits = split(src, tgt, every, weights=weights, threshold=threshold, incompatible_pairs=pairs,
                       taken=combinations, skip_src=left_out)
    if combinations or splits:  # re-match 1:1 without the tensors the combinations and splits take
        every = assign_all(
            skip_src=np.concatenate([left_out, np.array([r for c in combinations for r in c.src]
                                                        + [c.tgt for c in splits], dtype=np.int64)]),
            skip_tgt=np.array([c.tgt for c in combinations] + [r for c in splits for r in c.src], dtype=np.int64),
        )
    assignment = every.above(threshold)
    plan = build_plan(
        assignment, src, tgt,
        strategy=options.strategy,
        threshold=threshold,
        weights=weights,
        withhold_ambiguous=rule.withhold_ambiguous,
        source_prefix=tables.source_prefix,
        combinations=combinations,
        splits=splits,
        flow_sources=options.flow_sources if options.use_flow else ("none", "none"),
    )
    return Matched(plan, assignment)
