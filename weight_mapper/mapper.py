"""``WeightMapper``: the facade users know, over table -> tree -> score -> assign -> plan."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dataclasses import replace

from torch import nn

from weight_mapper.assign import MAX_ROUNDS
from weight_mapper.errors import MappingError
from weight_mapper.mapping_dict import MappingDict
from weight_mapper.matching import (
    STRATEGIES,
    MatchOptions,
    PreparedTables,
    _collector_paused,
    match_prepared,
    prepare_tables,
)
from weight_mapper.plan import MappingPlan
from weight_mapper.flow import auto_execution_order, record_execution_order, trace_execution_order
from weight_mapper.table import TensorTable

if TYPE_CHECKING:
    from weight_mapper.verify import VerificationReport

__all__ = ["WeightMapper", "STRATEGIES"]


class WeightMapper:
    """Suggest where every tensor of a source model goes in a target model.

    Args:
        source_module: The model (or state dict, or :class:`TensorTable`) holding the weights.
        target_module: The model (or state dict of names to tensors/shapes) to fill.
        shape_tolerance: Relative difference per dimension under which two shapes still count
            as a (weak) match; 0 accepts only equal or transposed shapes.
        dummy_input: Input to run both models once and record their data flow (a tensor, a
            tuple of arguments or a dict of keyword arguments); see :mod:`weight_mapper.flow`.
        trace: Without ``dummy_input``, find the data flow of both models anyway: from
            ``torch.fx.symbolic_trace`` when both trace (nothing runs), else by running each
            once on a synthesised input with meta-device stand-ins for its weights (nothing is
            computed; a small model that fails on meta runs for real). Used only when both
            sides are modules and both get a flow; ``False`` skips it. The plan records which
            (``plan.flow_sources``).
        source_model: When the source is a state dict or a checkpoint's table: the model it was
            saved from (the meta device is fine). It adds module types, definition order and
            the data flow to the source's names and shapes (see
            :meth:`TensorTable.with_module`); the weights still come from the source.
        incompatible_pairs: Pairs of module names whose tensors must never be matched across,
            e.g. ``[("encoder", "decoder")]``, or, as in the user guide, pairs of sets of
            alternatives, ``[({"encoder", "embedding"}, {"decoder", "output"})]`` (any name on
            the left against any on the right); None or ``[]`` allows everything.

    Raises:
        MappingError: On bad options or a side without tensors.

    >>> from torch import nn
    >>> old = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> new = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    >>> WeightMapper(old, new).suggest_mapping()["2.weight"]
    '1.weight'
    """

    def __init__(
        self,
        source_module: nn.Module | Mapping[str, Any] | TensorTable,
        target_module: nn.Module | Mapping[str, Any] | TensorTable,
        shape_tolerance: float = 0.0,
        dummy_input: Any = None,
        incompatible_pairs: Sequence[tuple[Any, Any]] | None = None,
        *,
        source_prefix: str | None = None,
        trace: bool = True,
        source_model: nn.Module | None = None,
    ):
        # The options of matching that belong to the mapper (suggest_mapping adds the rest); validated here.
        options = MatchOptions(shape_tolerance=shape_tolerance, incompatible_pairs=incompatible_pairs,
                               source_prefix=source_prefix)
        self.shape_tolerance = options.shape_tolerance
        self.incompatible_pairs = options.incompatible_pairs
        self.dummy_input = dummy_input
        self.source_module = source_module if isinstance(source_module, nn.Module) else None
        self.target_module = target_module if isinstance(target_module, nn.Module) else None
        if source_model is not None and isinstance(source_module, nn.Module):
            raise MappingError("source_model describes a state dict or checkpoint source; the source is already a model")
        orders, self.flow_sources = _flow_orders(source_model if source_model is not None else source_module,
                                                 target_module, dummy_input, trace)
        self.source_table = _to_table(source_module, orders[0], "source")
        if source_model is not None:
            self.source_table = self.source_table.with_module(source_model, exec_order=orders[0])
        self.target_table = _to_table(target_module, orders[1], "target")
        # The tables as matching sees them (prefix stripped, storage inferred): views and explain read them too.
        self.source_table, self.target_table, self.source_prefix = prepare_tables(
            self.source_table, self.target_table, options=options)
        self.options = replace(options, flow_sources=self.flow_sources)
        self.plan: MappingPlan | None = None
        self._source_code = source_model if source_model is not None else self.source_module  # for conventions
        self.notes: list[str] = []  # what the conventions and the layer-wise proof did to the last plan
        self.verification: VerificationReport | None = None  # the layer-wise proof suggest_mapping ran, when it could

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_state_dict(
        cls,
        source_state_dict: Mapping[str, Any],
        target_module: nn.Module | Mapping[str, Any],
        shape_tolerance: float = 0.0,
        dummy_input: Any = None,
        incompatible_pairs: Sequence[tuple[Any, Any]] | None = None,
        *,
        key: str | None = None,
        source_model: nn.Module | None = None,
    ) -> WeightMapper:
        """Map a state dict (or anything ``torch.load`` returned, envelope included).

        Args:
            source_state_dict: Flat state dict, or a checkpoint dict (Lightning, ``{"model": ...}``).
            target_module: The model to fill.
            shape_tolerance, dummy_input, incompatible_pairs: As for :class:`WeightMapper`.
            key: Envelope key to take the state dict from when there are several candidates.
            source_model: The model the state dict was saved from, if you have it (see
                :class:`WeightMapper`).
        """
        from weight_mapper.checkpoint import unwrap_state_dict

        tensors, _, _, _ = unwrap_state_dict(source_state_dict, key=key)
        return cls(tensors, target_module, shape_tolerance, dummy_input, incompatible_pairs, source_model=source_model)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint_path: str | Path,
        target_module: nn.Module | Mapping[str, Any],
        shape_tolerance: float = 0.0,
        dummy_input: Any = None,
        incompatible_pairs: Sequence[tuple[Any, Any]] | None = None,
        *,
        key: str | None = None,
        trust_pickle: bool = False,
        source_model: nn.Module | None = None,
    ) -> WeightMapper:
        """Map a checkpoint file or sharded folder; only shapes are read for matching.

        Tied tensors (an embedding and the head sharing its storage) stay tied, as with
        :meth:`from_state_dict`. ``source_model`` is the model the checkpoint was saved from,
        if you have it (see :class:`WeightMapper`).

        Raises:
            CheckpointError: If the file is missing, corrupt, or needs ``trust_pickle=True``.
            MappingError: If ``source_model``'s tensors are not the checkpoint's.
        """
        from weight_mapper.checkpoint import load_checkpoint

        ckpt = load_checkpoint(checkpoint_path, key=key, trust_pickle=trust_pickle)
        table = TensorTable.from_checkpoint(ckpt, label=Path(checkpoint_path).name)
        return cls(table, target_module, shape_tolerance, dummy_input, incompatible_pairs, source_model=source_model)

    # ------------------------------------------------------------------ matching
    def suggest_mapping(
        self,
        threshold: float = 0.6,
        strategy: str = "best_match",
        weights: Mapping[str, float] | None = None,
        *,
        max_rounds: int = MAX_ROUNDS,
        progress: Callable[[str], None] | None = None,
        repair: bool = True,
        options: MatchOptions | None = None,
    ) -> MappingDict:
        """Match source tensors to target tensors and return ``{source_name: target_name}``.

        The dict carries its plan (``mapping.plan``): ``WeightRenamer.rename_keys(mapping)``
        applies the plan's transposes, reshapes and concatenations, as ``rename_keys(plan)`` does.
        Matching is :func:`weight_mapper.matching.match`'s core, with the options of this call and
        of the mapper in one :class:`~weight_mapper.matching.MatchOptions` (kept as ``mapper.options``);
        the convention catalogue and the layer-wise proof, which need the models, follow.

        Args:
            threshold: Minimum combined score of a match, in [0, 1].
            strategy: ``"best_match"`` (optimal assignment with hierarchy context),
                ``"conservative"`` (the same, threshold at least 0.75, ambiguous matches left
                out), ``"shape_only"`` (shapes and definition order only, like timm's
                positional remap), or ``"greedy"`` (highest score first; for comparison).
            weights: Component weights, default ``{"shape": 0.5, "name": 0.3, "hierarchy": 0.2}``.
            max_rounds: Bound on hierarchy-context rounds.
            progress: Called with a short description as each step starts (the CLI shows it
                as a status line); matching a 100,000-tensor model takes seconds.
            repair: With both models (holding weights) and ``dummy_input``, prove the plan layer
                by layer and repair what diverges (:func:`weight_mapper.verify.verify_conversion`
                with ``repair=True``; the target's weights are restored afterwards). Entries'
                ``provenance`` says ``proved`` or ``repaired``; ``mapper.verification`` keeps the
                report and ``mapper.notes`` what was done. ``False`` keeps the matcher's plan.
            options: Every matching option as one :class:`~weight_mapper.matching.MatchOptions`
                (the CLI builds it from its flags), instead of ``threshold``, ``strategy``,
                ``weights`` and ``max_rounds``; its ``shape_tolerance`` and
                ``incompatible_pairs`` replace the mapper's. Its ``source_prefix``,
                ``infer_storage`` and ``use_flow`` shaped the mapper's tables and must be the
                mapper's (``mapper.options``); ``flow_sources`` is always the mapper's.

        Raises:
            MappingError: On an unknown strategy, a threshold outside [0, 1] or bad weights;
                on ``options`` given beside the arguments it replaces, or disagreeing with the
                mapper's tables.
        """
        if options is None:
            options = replace(self.options, strategy=strategy, threshold=threshold, weights=weights,
                              max_rounds=max_rounds, shape_tolerance=self.shape_tolerance,
                              incompatible_pairs=self.incompatible_pairs)
        else:
            self._check_options(options, given=(threshold, strategy, weights, max_rounds))
            options = replace(options, flow_sources=self.flow_sources)
        self.options = options
        tables = PreparedTables(self.source_table, self.target_table, self.source_prefix)
        self.plan, self._assignment = match_prepared(tables, options=options, progress=progress)
        from weight_mapper.verify import settle_plan

        self.plan, self.notes, self.verification = settle_plan(
            self.plan, source=self.source_module, target=self.target_module, dummy_input=self.dummy_input,
            source_code=self._source_code, repair=repair, progress=progress)
        return self.get_mapping_dict()

    def _check_options(self, options: MatchOptions, *, given: tuple) -> None:
        if not isinstance(options, MatchOptions):
            raise MappingError(f"options must be a MatchOptions, got {type(options).__name__}")
        if given != (0.6, "best_match", None, MAX_ROUNDS):
            raise MappingError("pass threshold, strategy, weights and max_rounds inside options, not beside it: "
                               "suggest_mapping(options=dataclasses.replace(options, threshold=...))")
        for name in ("source_prefix", "infer_storage", "use_flow"):
            if getattr(options, name) != getattr(self.options, name):
                raise MappingError(f"options.{name} is {getattr(options, name)!r}, but the mapper's tables were "
                                   f"built with {getattr(self.options, name)!r}; build a new WeightMapper "
                                   "(source_prefix=...) or call weight_mapper.match() on the tables")

    def _plan_of(self, mapping: Mapping[str, str]) -> MappingPlan:
        """The plan a (possibly edited) mapping dict stands for, against this mapper's tables."""
        from weight_mapper.mapping_dict import plan_from_mapping

        base = getattr(mapping, "plan", None) or self._require_plan()
        if dict(mapping) == base.mapping:
            return base
        prefix = self.source_prefix
        source_shapes = {prefix + n: s for n, s in zip(self.source_table.names, self.source_table.shapes)}
        return plan_from_mapping(mapping, base, source_shapes, dict(zip(self.target_table.names, self.target_table.shapes)),
                                 source_label=self.source_table.label)

    def _require_plan(self) -> MappingPlan:
        if self.plan is None:
            self.suggest_mapping()
        assert self.plan is not None
        return self.plan

    def get_plan(self) -> MappingPlan:
        """The full :class:`MappingPlan` (runs ``suggest_mapping()`` with defaults if needed)."""
        return self._require_plan()

    def get_mapping_dict(self) -> MappingDict:
        """``{source_name: target_name}`` of the last suggestion: a new copy, carrying its plan.

        Edit it like a dict (``mapping["old.layer"] = "new.layer"``) and pass it to
        ``WeightRenamer.rename_keys``: the pairs left alone keep the plan's transforms, and the
        edited ones are checked against the target's shapes.
        """
        plan = self._require_plan()
        return MappingDict.from_plan(plan, target_shapes=dict(zip(self.target_table.names, self.target_table.shapes)))

    def get_mapping_with_scores(self) -> list[tuple[str, str, float]]:
        """``[(source_name, target_name, score), ...]`` of the last suggestion, in target order.

        A combined entry (several sources, one target) gives one tuple per source.
        """
        return [(s, e.target, e.score) for e in self._require_plan().entries for s in e.source]

    def get_unmatched(self) -> dict[str, list[str]]:
        """``{"source": [...], "target": [...]}``: tensors the last suggestion left out."""
        plan = self._require_plan()
        return {"source": list(plan.unmatched_source), "target": list(plan.unmatched_target)}

    def explain(self, source_name: str, *, top_k: int = 5) -> dict:
        """Why ``source_name`` went where it did: component and sub-scores, top alternatives.

        Adds ``target`` (the target tensor the plan fills from it, or None) and the component
        ``weights`` to the dict of :func:`weight_mapper.assign.explain`. Runs ``suggest_mapping()`` with defaults first if needed. See
        :func:`weight_mapper.assign.explain` for the returned dict.

        Raises:
            MappingError: If ``source_name`` is not a source tensor.
        """
        from weight_mapper.assign import explain

        plan = self._require_plan()
        name = source_name
        if plan.source_prefix and name.startswith(plan.source_prefix):
            name = name[len(plan.source_prefix):]
        out = explain(self._assignment, self.source_table, name, top_k=top_k)
        out["source"] = source_name
        out["target"] = plan.mapping.get(source_name)
        out["weights"] = dict(plan.weights)
        return out

    def verify(
        self,
        source_model: nn.Module | None = None,
        target_model: nn.Module | None = None,
        dummy_input: Any = None,
        *,
        atol: float = 1e-5,
        repair: bool = False,
    ):
        """Prove the conversion: load the converted weights into the target, run both models.

        Defaults to the models and ``dummy_input`` the mapper was built with. The target's
        tensors are overwritten with the converted ones. Both models run side by side with
        hooks on the module pairs the plan implies (see :mod:`weight_mapper.verify`).

        Args:
            repair: Try the known alternatives for each diverging module and keep what makes
                it agree; the repaired plan (``report.plan``) becomes the mapper's plan.

        Returns:
            A :class:`~weight_mapper.verify.VerificationReport`: max abs output difference,
            target tensors left at their initial values, per-entry status (proved / diverges /
            not reached), the first divergence, ``ok``, and the plan with each entry's provenance.

        Raises:
            MappingError: If a model or the input is missing.
            ConversionError: If the models fail on the input or give nothing to compare.
        """
        from weight_mapper.verify import verify_conversion

        source = source_model if source_model is not None else self.source_module
        target = target_model if target_model is not None else self.target_module
        x = dummy_input if dummy_input is not None else self.dummy_input
        if source is None or target is None or x is None:
            raise MappingError(
                "verify() needs both models and an input: pass source_model, target_model and dummy_input "
                "(the mapper was built from a state dict or without dummy_input)"
            )
        report = verify_conversion(self._require_plan(), source, target, x, atol=atol, repair=repair)
        if repair and report.plan is not None:
            self.plan = report.plan
        return report

    def export_rules(self, *, max_groups: int | None = None) -> list:
        """Compress the mapping's renames into a short list of regex rename rules.

        The rules reproduce every 1:1 entry of the plan exactly when the first matching rule
        wins and, whenever one list can do both, when every rule is applied in turn;
        entries built from several sources (concat / stack) are not renames and are left out,
        as are transforms. Use them as transformers' ``from_pretrained(key_mapping=...)``
        (:func:`~weight_mapper.rules.rules_to_key_mapping`), mmengine's ``revise_keys``
        (:func:`~weight_mapper.rules.rules_to_revise_keys`) or a torchtune-style table.

        Args:
            max_groups: At most this many ``(\\d+)`` groups per rule; transformers 5 fills only
                ``\\1`` of each ``key_mapping`` entry, so pass 1 for it.

        Returns:
            A list of :class:`~weight_mapper.rules.RenameRule`.
        """
        from weight_mapper.rules import infer_rules

        plan = self._require_plan()
        return infer_rules({e.source[0]: e.target for e in plan.entries if len(e.source) == 1},
                           max_groups=max_groups)

    # ------------------------------------------------------------------ reporting
    def print_analysis(self, top_n: int = 10, show_unmatched: bool = True, *, console: Any = None) -> None:
        """Print a short summary: counts, coverage, the top matches, ambiguity, unmatched."""
        from weight_mapper.report import print_analysis

        print_analysis(self._require_plan(), top_n=top_n, show_unmatched=show_unmatched, console=console)

    def export_mapping_report(self, output_path: str | Path) -> Path:
        """Write the JSON report (the plan plus counts and coverage) atomically to ``output_path``."""
        from weight_mapper.report import export_report

        return export_report(self._require_plan(), output_path)

    def export_review_page(
        self,
        path: str | Path,
        *,
        explain: Iterable[str] = (),
        max_breakdowns: int | None = None,
        title: str | None = None,
        protected: Iterable[str | Path] = (),
    ) -> Path:
        """Write the plan as one self-contained HTML page to review it in (see :mod:`weight_mapper.page`).

        Args:
            path: The HTML file to write, atomically.
            explain: Source tensors whose score breakdowns must be in the page.
            max_breakdowns: Breakdowns (sub-scores, alternatives) embedded besides ``explain``,
                riskiest entries first; default :data:`weight_mapper.page.MAX_BREAKDOWNS`.
            title: The page title.
            protected: Paths the page must never overwrite.

        Raises:
            MappingError: If a name in ``explain`` is not a source tensor.
            CheckpointError: If ``path`` is protected or its folder is missing.
        """
        from weight_mapper.assign import explain_many
        from weight_mapper.page import MAX_BREAKDOWNS, breakdown_candidates, export_review_page

        plan = self._require_plan()
        limit = MAX_BREAKDOWNS if max_breakdowns is None else max_breakdowns
        names = list(dict.fromkeys([*explain, *breakdown_candidates(plan, limit=limit)]))
        prefix = plan.source_prefix
        stripped = [n[len(prefix):] if prefix and n.startswith(prefix) else n for n in names]
        explanations = dict(zip(names, explain_many(self._assignment, self.source_table, stripped)))
        return export_review_page(plan, path, source_table=self.source_table, target_table=self.target_table,
                                  explanations=explanations, title=title, protected=protected)

    def visualize_mapping(
        self,
        result: MappingPlan | Mapping[str, str] | None = None,
        *,
        show_unmatched: bool = True,
        max_matches: int = 30,
        max_unmatched: int = 15,
        console: Any = None,
    ) -> None:
        """Print the mapping for review: summary, scored matches with badges, unmatched tensors.

        Args:
            result: A :class:`MappingPlan`, or a ``{source: target}`` dict (the one
                ``suggest_mapping`` returned, edited or not; pairs changed by hand show as
                ``MANUAL``, unscored); default the last plan.
            show_unmatched: List the unmatched tensors of both sides, with their shapes.
            max_matches: Matches listed, riskiest first (flagged, repaired, unproved, proved; then the
                lowest margin), see :func:`weight_mapper.report.risk_key`.
            max_unmatched: Unmatched tensors listed per side.
            console: A ``rich.console.Console``; default a new one on stdout.

        Raises:
            PlanError: If ``result`` names a tensor the source lacks or pairs shapes no transform fixes.
        """
        from weight_mapper.views import MappingView, print_view

        plan = self._require_plan() if result is None or result is self.plan else result
        if not isinstance(plan, MappingPlan):
            plan = self._plan_of(plan)
        print_view(MappingView(plan, source_table=self.source_table, target_table=self.target_table,
                               show_unmatched=show_unmatched, max_matches=max_matches,
                               max_unmatched=max_unmatched), console=console)

    def visualize_hierarchies(self, max_depth: int = 5, show_matches: bool = False, *, console: Any = None) -> None:
        """Print both module trees side by side: W/B/buf badges with shapes, matched modules marked.

        Args:
            max_depth: Module levels shown; deeper ones are summed up in a ``…`` line.
            show_matches: Mark every module ✓/◐/✗ by how many of its tensors the plan matched
                (runs ``suggest_mapping()`` with defaults first if needed).
            console: A ``rich.console.Console``; default a new one on stdout.
        """
        from weight_mapper.views import HierarchyView, print_view

        plan = self._require_plan() if show_matches else self.plan
        print_view(HierarchyView(self.source_table, self.target_table, plan=plan, max_depth=max_depth,
                                 show_matches=show_matches), console=console)

    def visualize_score_breakdown(self, param_name: str, *, console: Any = None) -> None:
        """Print why ``param_name`` went where it did: weighted scores, sub-scores, alternatives.

        Raises:
            MappingError: If ``param_name`` is not a source tensor.
        """
        from weight_mapper.views import ScoreBreakdownView, print_view

        if self.source_prefix and param_name in self.source_table.name2row:
            param_name = self.source_prefix + param_name  # the plan's keys carry the wrapper prefix
        explanation = self.explain(param_name)
        print_view(ScoreBreakdownView.from_plan(explanation, self._require_plan()), console=console)


_Orders = tuple[dict[str, float] | None, dict[str, float] | None]


def _flow_orders(source: Any, target: Any, dummy_input: Any, trace: bool) -> tuple[_Orders, tuple[str, str]]:
    """Data-flow positions of both sides, and where they came from (keys of ``flow.FLOW_SOURCES``).

    From ``dummy_input`` if given; else from fx traces when both sides trace; else from a
    synthesised input on the meta device (:func:`~weight_mapper.flow.auto_execution_order`).
    Without ``dummy_input`` a flow is only worth finding when both sides are modules and both
    get one: execution order is compared between the two sides, and one side alone says nothing.
    """
    src_module = source if isinstance(source, nn.Module) else None
    tgt_module = target if isinstance(target, nn.Module) else None
    if dummy_input is not None:
        orders = (record_execution_order(src_module, dummy_input) if src_module is not None else None,
                  record_execution_order(tgt_module, dummy_input) if tgt_module is not None else None)
        return orders, ("dummy_input" if orders[0] is not None else "none",
                        "dummy_input" if orders[1] is not None else "none")
    if not trace or src_module is None or tgt_module is None:
        return (None, None), ("none", "none")
    source_order = trace_execution_order(src_module)
    target_order = trace_execution_order(tgt_module) if source_order is not None else None
    if target_order is not None:
        return (source_order, target_order), ("fx", "fx")
    source_order, source_how = auto_execution_order(src_module)
    if source_order is None:
        return (None, None), ("none", "none")
    target_order, target_how = auto_execution_order(tgt_module)
    if target_order is None:
        return (None, None), ("none", "none")
    return (source_order, target_order), (source_how, target_how)


@_collector_paused()  # a big model's table is many small objects, as matching's are
def _to_table(side: Any, exec_order: Mapping[str, float] | None, which: str) -> TensorTable:
    if isinstance(side, TensorTable):
        return side
    if isinstance(side, nn.Module):
        return TensorTable.from_module(side, exec_order=exec_order)
    if isinstance(side, Mapping):
        return TensorTable.from_state_dict(side, label=f"{which} state_dict")
    raise MappingError(
        f"{which} must be an nn.Module, a state dict or a TensorTable, got {type(side).__name__}; "
        "for a file use WeightMapper.from_checkpoint"
    )
