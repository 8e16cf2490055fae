"""Stage 7, for review: a mapping, both module trees and one score breakdown, as rich renderables.

Each view is a small object that renders itself through ``__rich_console__``: build it from a
plan, tables or an explanation, then print it to any console (the terminal, a recording console
for HTML, a plain-text console in tests). Like :mod:`weight_mapper.report` and the CLI, this module
imports rich; the core modules never do, and never hold a Console.

>>> from rich.console import Console
>>> from weight_mapper.plan import MappingPlan, PlanEntry
>>> entry = PlanEntry(("fc.weight",), "head.weight", None, 0.91, 0.5, "group", (3, 2), (3, 2))
>>> view = MappingView(MappingPlan((entry,), strategy="best_match"))
>>> Console(color_system=None, width=80).print(view)  # doctest: +ELLIPSIS
╭─ Mapping review ─...
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from weight_mapper.plan import AMBIGUITY_MARGIN, MappingPlan, PlanEntry
from weight_mapper.report import flags_legend, plain, review_marks, risk_key, risk_tier, score_style
from weight_mapper.score import BASE_COMPONENTS, CONTEXT, CONTEXT_WEIGHT, KEY2COMPONENT, SUB_SCORE_LABELS
from weight_mapper.table import TensorTable
from weight_mapper.tree import ROOT, ModuleTree

__all__ = ["MappingView", "HierarchyView", "ScoreBreakdownView", "print_view", "export_html"]

# entry.level -> badge shown in the mapping table ("combined": several sources fused into one target)
LEVEL2BADGE = {"group": "GROUP", "tensor": "INDIV", "alias": "ALIAS", "combined": "FUSED", "split": "SPLIT"}
_BADGE_STYLES = {"GROUP": "bold cyan", "INDIV": "bold magenta", "ALIAS": "bold blue", "FUSED": "bold yellow"}
# entry.transform -> marker; any other registered transform shows its own name
TRANSFORM2MARKER = {None: "exact", "identity": "exact"}
# Normalised leaf -> badge of a tensor in the module trees; buffers get "buf", other parameters their name.
LEAF2BADGE = {"weight": "W", "bias": "B"}
BUFFER_BADGE = "buf"
# Score components, sub-scores and their labels come from the registry (score.SCORE_COMPONENTS).
BAR_WIDTH = 20
_MATCH_MARKS = {"all": ("✓", "bold green"), "some": ("◐", "bold yellow"), "none": ("✗", "bold red")}


# ------------------------------------------------------------------------------------ helpers


def format_shape(shape: Sequence[int]) -> str:
    """``(8, 3)`` -> ``'[8, 3]'``; a scalar is ``'[]'``."""
    return "[" + ", ".join(map(str, shape)) + "]"


def score_bar(value: float, *, width: int = BAR_WIDTH, style: str | None = None) -> Text:
    """A text bar of ``█`` proportional to ``value`` in [0, 1], on a ``░`` track.

    >>> score_bar(0.5, width=10).plain
    '█████░░░░░'
    """
    value = 0.0 if value is None or math.isnan(value) else min(max(value, 0.0), 1.0)
    n_full = round(value * width)
    return Text.assemble(("█" * n_full, style or score_style(value)), ("░" * (width - n_full), "dim"))


def _score(value: float | None) -> Text:
    if value is None or math.isnan(value):
        return Text("-", style="dim")
    return Text(f"{value:.3f}", style=score_style(value))


def _transform_marker(entry: PlanEntry) -> str:
    return TRANSFORM2MARKER.get(entry.transform, entry.transform or "exact")


def _level_badge(level: str) -> Text:
    badge = LEVEL2BADGE.get(level, level.upper())
    return Text(badge, style=_BADGE_STYLES.get(badge, "bold"))


_SHAPE_WIDTH = 36  # a longer shape (a fused entry's) wraps
_LISTED_SOURCES = 4  # a combined entry with more sources is abbreviated (256 experts are one line)


def _sources_text(sources: Sequence[str]) -> str:
    """The source keys of an entry; past a few, the first two, the last and the count."""
    if len(sources) <= _LISTED_SOURCES:
        return ", ".join(sources)
    return f"{sources[0]}, {sources[1]}, …, {sources[-1]} ({len(sources)} tensors)"


def _entry_shape(entry: PlanEntry) -> str:
    # A fused entry records every source's shape in its transform arguments.
    source_shapes = (getattr(entry, "args", None) or {}).get("source_shapes")
    if source_shapes and len(source_shapes) > _LISTED_SOURCES:
        runs: list[list] = []  # equal consecutive shapes as "n x [shape]"
        for shape in source_shapes:
            if runs and runs[-1][1] == shape:
                runs[-1][0] += 1
            else:
                runs.append([1, shape])
        parts = [f"{n} x {format_shape(shape)}" if n > 1 else format_shape(shape) for n, shape in runs]
        return " + ".join(parts) + f" -> {format_shape(entry.target_shape)}"
    if source_shapes and len(source_shapes) > 1:
        return " + ".join(map(format_shape, source_shapes)) + f" -> {format_shape(entry.target_shape)}"
    if entry.source_shape == entry.target_shape:
        return format_shape(entry.source_shape)
    return f"{format_shape(entry.source_shape)} -> {format_shape(entry.target_shape)}"


def _strip(name: str, prefix: str) -> str:
    return name[len(prefix):] if prefix and name.startswith(prefix) else name


def _more(n: int) -> str:
    return f"… {n} more" if n > 0 else ""


def _share(needs: Sequence[int], budget: int) -> list[int]:
    """Widths for two columns needing ``needs`` out of ``budget``: a column needing less than half
    leaves the rest to the other.

    >>> _share([10, 40], 30), _share([20, 20], 30), _share([5, 5], 30)
    ([10, 20], [15, 15], [5, 5])
    """
    half = budget // 2
    if sum(needs) <= budget:
        return list(needs)
    if needs[0] <= half:
        return [needs[0], budget - needs[0]]
    if needs[1] <= half:
        return [budget - needs[1], needs[1]]
    return [half, budget - half]


def _table(title: str | None = None) -> Table:
    """The tables of every view: a rule under the header, no outer edge."""
    return Table(title=Text(title, style="bold") if title else None, box=box.SIMPLE_HEAD, show_edge=False,
                 pad_edge=False, padding=(0, 1, 0, 0), title_justify="left")


# ------------------------------------------------------------------------------------ mapping


class MappingView:
    """A plan for review: summary panel, matches with scores and badges, unmatched tensors.

    Args:
        plan: The plan to show.
        source_table, target_table: Where the shapes of unmatched tensors come from; without
            them, unmatched tensors are listed by name only.
        show_unmatched: List the unmatched tensors of both sides.
        max_matches: Matches listed, riskiest first (:func:`weight_mapper.report.risk_key`:
            flagged, repaired, unproved, proved; then the lowest margin, then the lowest score).
        max_unmatched: Unmatched tensors listed per side.
    """

    def __init__(
        self,
        plan: MappingPlan,
        *,
        source_table: TensorTable | None = None,
        target_table: TensorTable | None = None,
        show_unmatched: bool = True,
        max_matches: int = 30,
        max_unmatched: int = 15,
    ):
        self.plan = plan
        self.source_table = source_table
        self.target_table = target_table
        self.show_unmatched = show_unmatched
        self.max_matches = max(int(max_matches), 0)
        self.max_unmatched = max(int(max_unmatched), 0)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self._summary()
        if self.plan.entries and self.max_matches:
            yield Text()
            yield from self._matches_table(self.plan.entries, title="Matches", max_width=options.max_width)
        if self.plan.ambiguous and self.max_matches:
            yield Text()
            yield from self._matches_table(self.plan.ambiguous, title="Withheld as ambiguous (not in the plan)",
                                           max_width=options.max_width)
        if self.show_unmatched and (self.plan.unmatched_source or self.plan.unmatched_target):
            yield Text()
            yield self._unmatched_table()

    def _summary(self) -> Panel:
        plan = self.plan
        n_matched = len(plan.entries)
        level2count = Counter(LEVEL2BADGE.get(e.level, e.level.upper()) for e in plan.entries)
        n_ambiguous = sum(e.ambiguous for e in plan.entries)
        transform2count = Counter(_transform_marker(e) for e in plan.entries)
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        grid.add_row("models", Text.assemble((plan.source_label or "source", "bold"), " -> ",
                                             (plan.target_label or "target", "bold")))
        grid.add_row("coverage", Text.assemble(
            score_bar(plan.coverage, style=score_style(plan.coverage)),
            f" {n_matched}/{plan.n_target} target tensors filled ({plan.coverage:.1%})"))
        # The levels that occur, in a fixed order (an unknown level last, under its own name).
        levels = [b for b in LEVEL2BADGE.values() if level2count[b]]
        levels += sorted(set(level2count) - set(levels))
        grid.add_row("matched", Text.assemble(
            f"{n_matched}" + (": " + ", ".join(f"{level2count[b]} {b}" for b in levels) if levels else "") + "; ",
            (f"{n_ambiguous} ambiguous", "bold yellow" if n_ambiguous else "")))
        grid.add_row("transforms", ", ".join(f"{n} {marker}" for marker, n in sorted(transform2count.items()))
                      or "none")
        tier2count = Counter(risk_tier(e) for e in plan.entries)
        grid.add_row("review", Text.assemble(
            (f"{tier2count['flagged']} flagged", "bold yellow" if tier2count["flagged"] else ""),
            f", {tier2count['repaired']} repaired, {tier2count['unproved']} unproved, {tier2count['proved']} proved"))
        grid.add_row("unmatched", f"{len(plan.unmatched_source)} source, {len(plan.unmatched_target)} target")
        if plan.ambiguous:
            grid.add_row("withheld", Text(f"{len(plan.ambiguous)} ambiguous matches (strategy {plan.strategy})",
                                          style="yellow"))
        grid.add_row("threshold", f"{plan.threshold:.2f}")
        grid.add_row("strategy", plan.strategy)
        rounds = f"{plan.rounds[0]} group-level + {plan.rounds[1]} tensor-level"
        grid.add_row("hierarchy rounds", Text.assemble(
            rounds + ", ", ("converged", "green") if plan.converged else ("not converged", "bold yellow")))
        if plan.source_prefix:
            grid.add_row("source prefix", Text(f"{plan.source_prefix!r} (ignored while matching)"))
        return Panel(grid, title="Mapping review", title_align="left", expand=False)

    def _shown_rows(self, entries: Sequence[PlanEntry]) -> list[int]:
        """Rows of ``entries`` to list, riskiest first."""
        return sorted(range(len(entries)), key=lambda i: risk_key(entries[i]))[: self.max_matches]

    def _matches_table(self, entries: Sequence[PlanEntry], *, title: str, max_width: int) -> Iterator[Any]:
        rows = self._shown_rows(entries)
        shown = [entries[i] for i in rows]
        marks = [" ".join(review_marks(e)) for e in shown]
        with_marks = any(marks)
        table = _table(f"{title}, riskiest first")
        shapes = [_entry_shape(e) for e in shown]
        # Names are what a reviewer reads: they get the width the other columns leave, and fold
        # only when that is not enough (rich would otherwise shrink the widest columns first).
        transform_width = max(len(m) for m in ["transform", *map(_transform_marker, shown)])
        other_widths = [5, 6, transform_width, len("level"), min(max(map(len, ["shape", *shapes])), _SHAPE_WIDTH)]
        other_widths += [max(map(len, ["review", *marks]))] * with_marks
        n_columns = 2 + len(other_widths)
        budget = max_width - sum(other_widths) - 2 * (n_columns - 1)  # 2: padding and rule
        sides = (("source", [_sources_text(e.source) for e in shown]), ("target", [e.target for e in shown]))
        # A list of sources wraps after its commas: it needs only its longest name in one line.
        needs = [max(len(side), *(len(part) for name in names for part in name.replace(", ", ",\n").split("\n")))
                 for side, names in sides]
        for (side, _), width in zip(sides, _share(needs, budget)):
            fits = budget >= 24
            table.add_column(side, overflow="fold", min_width=width if fits else None, max_width=width if fits else None)
        table.add_column("score", justify="right")
        table.add_column("margin", justify="right")
        table.add_column("transform")
        table.add_column("level")
        table.add_column("shape", min_width=other_widths[4])
        if with_marks:
            table.add_column("review", no_wrap=True)
        for e, shape, mark in zip(shown, shapes, marks):
            marker = _transform_marker(e)
            cells = [plain(_sources_text(e.source)), plain(e.target), _score(e.score),
                     Text("-" if math.isnan(e.margin) else f"{e.margin:.3f}", style="bold yellow" if e.ambiguous else "dim"),
                     Text(marker, style="dim" if marker == "exact" else "bold"), _level_badge(e.level), shape]
            if with_marks:
                cells.append(Text(mark, style="bold yellow" if e.flagged and e.provenance != "proved" else "green"))
            table.add_row(*cells)
        yield table
        if len(shown) < len(entries):
            rest = [entries[i] for i in sorted(set(range(len(entries))) - set(rows))]
            tiers = Counter(risk_tier(e) for e in rest)
            yield Text(f"{len(shown)} of {len(entries)} shown; the other {len(rest)}: "
                       + ", ".join(f"{tiers[t]} {t}" for t in ("flagged", "repaired", "unproved", "proved") if tiers[t])
                       + "".join(f", margin >= {m:.3f}" for m in [min((e.margin for e in rest if not math.isnan(e.margin)),
                                                                          default=math.nan)] if not math.isnan(m)),
                       style="dim")
        legend = "score: green > 0.8, yellow 0.6-0.8, red < 0.6; margin: score minus the runner-up's"
        if any(e.ambiguous for e in shown):
            legend += f"\n⚠ ambiguous: margin under {AMBIGUITY_MARGIN}"
        flags = flags_legend(shown)
        if flags:
            legend += "\n" + flags
        if any(e.provenance != "matched" for e in shown):
            legend += "\n✓ proved / ↻ repaired by a layer-wise proof (verify); the others are unproved"
        yield Text(legend, style="dim")

    def _shapes_of(self, names: Sequence[str], table: TensorTable | None, prefix: str = "") -> list[str]:
        if table is None:
            return ["" for _ in names]
        out = []
        for name in names:
            row = table.name2row.get(_strip(name, prefix), table.name2row.get(name))
            out.append("?" if row is None else format_shape(table.shapes[row]))
        return out

    def _unmatched_table(self) -> Table:
        plan, n = self.plan, self.max_unmatched
        source, target = list(plan.unmatched_source), list(plan.unmatched_target)
        source_shapes = self._shapes_of(source[:n], self.source_table, plan.source_prefix)
        target_shapes = self._shapes_of(target[:n], self.target_table)
        table = _table("Unmatched")
        with_shapes = (self.source_table is not None, self.target_table is not None)
        table.add_column(f"source ({len(source)})", overflow="fold", style="red")
        if with_shapes[0]:
            table.add_column("shape")
        table.add_column(f"target ({len(target)})", overflow="fold", style="red")
        if with_shapes[1]:
            table.add_column("shape")
        for i in range(min(max(len(source), len(target)), n)):
            cells = [plain(source[i] if i < len(source) else "")]
            if with_shapes[0]:
                cells.append(source_shapes[i] if i < len(source) else "")
            cells.append(plain(target[i] if i < len(target) else ""))
            if with_shapes[1]:
                cells.append(target_shapes[i] if i < len(target) else "")
            table.add_row(*cells)
        if len(source) > n or len(target) > n:
            cells = [_more(len(source) - n)] + ([""] if with_shapes[0] else [])
            cells += [_more(len(target) - n)] + ([""] if with_shapes[1] else [])
            table.add_row(*cells, style="dim")
        return table


# ------------------------------------------------------------------------------------ hierarchies


class HierarchyView:
    """The module trees of both sides, side by side, each tensor a badge with its shape.

    Badges: ``W`` a weight, ``B`` a bias, ``buf`` a persistent buffer, any other parameter its
    leaf name. With ``plan`` and ``show_matches``, every module is marked ✓ (all the tensors under
    it are in the plan), ◐ (some are) or ✗ (none are), and a module owning tensors shows the
    module its tensors went to.

    Args:
        source_table, target_table: The two sides.
        plan: The mapping, for ``show_matches``.
        max_depth: Module levels shown; deeper modules are summed up in a ``…`` line.
        show_matches: Mark matched modules (needs ``plan``).
    """

    def __init__(
        self,
        source_table: TensorTable,
        target_table: TensorTable,
        *,
        plan: MappingPlan | None = None,
        max_depth: int = 5,
        show_matches: bool = False,
    ):
        self.source_table = source_table
        self.target_table = target_table
        self.plan = plan
        self.max_depth = max(int(max_depth), 0)
        self.show_matches = show_matches and plan is not None

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        plan = self.plan
        src2tgt: dict[str, str] = {}
        tgt2src: dict[str, str] = {}
        src_matched: set[str] = set()
        tgt_matched: set[str] = set()
        if self.show_matches and plan is not None:
            for e in plan.entries:
                sources = [_strip(s, plan.source_prefix) for s in e.source]
                for s in sources:
                    src2tgt.setdefault(s, _module_of(e.target))
                tgt2src.setdefault(e.target, _modules_label(sources))
            src_matched = _matched_names(self.source_table, {_strip(n, plan.source_prefix)
                                                             for n in plan.unmatched_source})
            tgt_matched = _matched_names(self.target_table, set(plan.unmatched_target))
        grid = _table()
        for side, table in (("source", self.source_table), ("target", self.target_table)):
            grid.add_column(Text.assemble(f"{side}: ", (table.label or side, "bold")), ratio=1)
        grid.add_row(self._tree(self.source_table, src_matched, src2tgt, arrow="->"),
                     self._tree(self.target_table, tgt_matched, tgt2src, arrow="<-"))
        yield grid
        yield Text()
        legend = "W weight, B bias, buf persistent buffer, … deeper modules not shown"
        if self.show_matches:
            legend += ("\n✓ all tensors under the module matched, ◐ some, ✗ none; "
                       "-> / <- where its tensors go / come from")
        yield Text(legend, style="dim")

    def _tree(self, table: TensorTable, matched: set[str], name2other: Mapping[str, str], *, arrow: str) -> Tree:
        """One side's tree; ``name2other`` maps a tensor to the module(s) it matched on the other side."""
        tree = ModuleTree(table)
        graph = tree.graph
        module2rows: dict[str, list[int]] = {}
        for row, module in enumerate(table.modules):
            module2rows.setdefault(module, []).append(row)
        # tensors under each module, recursively: (n, n matched)
        module2counts: dict[str, list[int]] = {}
        for row, module in enumerate(table.modules):
            is_matched = table.names[row] in matched
            path = module
            while True:
                counts = module2counts.setdefault(path, [0, 0])
                counts[0] += 1
                counts[1] += is_matched
                if path == ROOT:
                    break
                path = path.rpartition(".")[0]

        def label(path: str) -> Text:
            name = path.rpartition(".")[2] if path else (table.label or "model")
            text = Text(name, style="bold")
            mtype = graph.nodes[path].get("type", "")
            if mtype and path:
                text.append(f" {mtype}", style="dim")
            if self.show_matches:
                n, n_matched = module2counts[path]
                mark, style = _MATCH_MARKS["all" if n_matched == n else "some" if n_matched else "none"]
                text.append(f" {mark}", style=style)
                text.stylize(style.replace("bold ", ""), 0, len(name))
                goes_to = {name2other[table.names[r]] for r in module2rows.get(path, ()) if table.names[r] in name2other}
                if len(goes_to) == 1 and path:
                    text.append(f" {arrow} {goes_to.pop() or '(root)'}", style="green")
            for row in module2rows.get(path, ()):
                text.append("  ")
                text.append_text(self._badge(table, row, matched))
            return text

        def fill(node: Tree, path: str) -> None:
            for child in graph.successors(path):
                if graph.nodes[child]["depth"] > self.max_depth:
                    n_tensors = module2counts[path][0] - len(module2rows.get(path, ()))
                    depth = max(graph.nodes[d]["depth"] for d in _descendants(graph, path))
                    n_levels = depth - graph.nodes[path]["depth"]
                    node.add(Text(f"… {n_levels} more level{'s' if n_levels > 1 else ''}, "
                                  f"{n_tensors} tensor{'s' if n_tensors != 1 else ''}", style="dim"))
                    return
                fill(node.add(label(child)), child)

        root = Tree(label(ROOT), guide_style="dim")
        root.label.append(f"  ({len(table)} tensors)", style="dim")
        fill(root, ROOT)
        return root

    @staticmethod
    def _badge(table: TensorTable, row: int, matched: set[str]) -> Text:
        name = table.names[row]
        if table.is_buffer[row]:
            badge, style = BUFFER_BADGE, "magenta"
        else:
            badge = LEAF2BADGE.get(table.leaves[row], name.rpartition(".")[2])
            style = "cyan"
        # No spaces inside a badge, so that a long line wraps between badges, never inside one.
        text = Text.assemble((badge, f"bold {style}"), format_shape(table.shapes[row]).replace(" ", ""))
        if matched and name not in matched:
            text.stylize("strike dim")
        return text


def _module_of(name: str) -> str:
    return name.rpartition(".")[0]


def _modules_label(names: Sequence[str]) -> str:
    """The module of ``names``; several (a fused entry) as ``common.{a,b,c}``."""
    modules = list(dict.fromkeys(map(_module_of, names)))
    if len(modules) == 1:
        return modules[0]
    parts = [m.split(".") for m in modules]
    n_common = 0
    while all(len(p) > n_common + 1 and p[n_common] == parts[0][n_common] for p in parts):
        n_common += 1
    common = ".".join(parts[0][:n_common])
    rest = ",".join(".".join(p[n_common:]) for p in parts)
    return f"{common}.{{{rest}}}" if common else f"{{{rest}}}"


def _matched_names(table: TensorTable, unmatched: set[str]) -> set[str]:
    """Names of ``table`` the plan uses; a tied alias counts as its canonical tensor does."""
    out = {name for row, name in enumerate(table.names) if table.is_canonical[row] and name not in unmatched}
    out.update(name for row, name in enumerate(table.names)
               if not table.is_canonical[row] and name not in unmatched and table.names[table.alias_of[row]] in out)
    return out


def _descendants(graph, path: str) -> Iterator[str]:
    stack = list(graph.successors(path))
    while stack:
        node = stack.pop()
        yield node
        stack.extend(graph.successors(node))


# ------------------------------------------------------------------------------------ breakdown


class ScoreBreakdownView:
    """Why one source tensor went where it did: every score and weight, then the alternatives.

    Args:
        explanation: The dict of :meth:`WeightMapper.explain <weight_mapper.mapper.WeightMapper.explain>`.
        threshold: The plan's threshold, to say why an unmatched tensor stayed unmatched.
        entry: The plan entry the tensor is in, if any. A combined entry (several sources fused
            into one target) is shown from its own components, which the 1:1 explanation lacks.
        max_alternatives: Alternatives listed, best first.
    """

    def __init__(
        self,
        explanation: Mapping[str, Any],
        *,
        threshold: float | None = None,
        entry: PlanEntry | None = None,
        max_alternatives: int = 5,
    ):
        if entry is not None and len(entry.source) > 1 and not explanation.get("components"):
            explanation = {**explanation, "level": entry.level, "candidate": ", ".join(entry.source),
                           "target_label": entry.target, "score": entry.score, "components": dict(entry.components),
                           "sub_scores": {}, "transform": entry.transform}
        self.explanation = explanation
        self.threshold = threshold
        self.max_alternatives = max(int(max_alternatives), 0)

    @classmethod
    def from_plan(cls, explanation: Mapping[str, Any], plan: MappingPlan, *, max_alternatives: int = 5):
        """The breakdown with what ``plan`` knows: its threshold, and the entry holding the tensor."""
        source = explanation["source"]
        entry = next((e for e in (*plan.entries, *plan.ambiguous) if source in e.source), None)
        return cls(explanation, threshold=plan.threshold, entry=entry, max_alternatives=max_alternatives)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        ex = self.explanation
        if ex["target"] is not None:
            title = Text.assemble("Why ", (ex["source"], "bold"), " -> ", (ex["target"], "bold"), "?")
        else:
            title = Text.assemble("Why is ", (ex["source"], "bold"), " ", ("not in the plan", "bold red"), "?")
        parts: list[Any] = [self._verdict()]
        if ex.get("components"):
            parts += [Text(), *self._score_table()]
        if ex.get("alternatives") and self.max_alternatives:
            parts += [Text(), self._alternatives_table()]
        yield Panel(Group(*parts), title=title, title_align="left", expand=False)

    def _verdict(self) -> Text:
        ex = self.explanation
        alternatives = ex.get("alternatives") or []
        text = Text()
        if ex["score"] is not None:
            if ex["level"] not in ("group", "tensor"):  # a combined entry, see __init__
                text.append(f"Combined ({ex.get('transform')}) from ")
                text.append(ex["candidate"], style="bold")
                text.append(", score ")
                text.append_text(_score(ex["score"]))
                text.append("\nThe set is scored as one match, its first tensor standing for its name and place.")
                return text
            if ex["level"] == "group":
                text.append("Matched as part of module ")
                text.append(ex["candidate"] or "(root)", style="bold")
                text.append(" -> ")
                text.append(ex["target_label"] or "(root)", style="bold")
            else:
                text.append("Matched as a single tensor")
            text.append(", score ")
            text.append_text(_score(ex["score"]))
            if ex["target"] is None and self.threshold is not None and ex["score"] < self.threshold:
                text.append(f"\nThe assignment chose it, but its score is under the threshold {self.threshold:.2f}: "
                            "it is not in the plan" + (" (nor is the rest of its module)." if ex["level"] == "group"
                                                      else "."), style="yellow")
            elif ex["target"] is None:
                text.append("\nThe assignment chose it, but it was withheld as ambiguous: it is not in the plan.",
                            style="yellow")
            if alternatives:
                runner_up, gap = alternatives[0]["label"] or "(root)", ex["score"] - alternatives[0]["score"]
                if gap >= 0:
                    text.append(f"\nIt beats the runner-up {runner_up} by {gap:.3f}")
                else:
                    text.append(f"\n{runner_up} scores {-gap:.3f} more, but the assignment gave it to another "
                                "source: the total is higher this way")
                if gap < AMBIGUITY_MARGIN:
                    text.append(" (ambiguous: check it)", style="bold yellow")
            else:
                what = "module" if ex["level"] == "group" else "tensor"
                text.append(f"\nNo alternative: no other target {what} was a candidate for it.")
            return text
        if ex["target"] is not None:
            text.append(f"It is in the plan, filling {ex['target']}, but not through a scored match; see its entry "
                        "in the mapping view.")
            return text
        text.append(f"{ex['source']} stayed unmatched", style="bold red")
        if not alternatives:
            text.append(": no target tensor had a compatible shape (or incompatible_pairs forbade them all).")
        elif self.threshold is not None and alternatives[0]["score"] < self.threshold:
            text.append(f": its best candidate {alternatives[0]['label']} scores {alternatives[0]['score']:.3f}, "
                        f"under the threshold {self.threshold:.2f}.")
        else:
            text.append(": its candidates went to better matches in the assignment.")
        return text

    def _score_table(self) -> tuple[Table, Text]:
        ex = self.explanation
        components, sub_scores = ex["components"], ex.get("sub_scores") or {}
        weights = {c: float(ex.get("weights", {}).get(c, 0.0)) for c in BASE_COMPONENTS}
        legend = "weight of a sub-score: its share of the component\n" if sub_scores else ""
        legend += "adds: its part of the score"
        context = components.get(CONTEXT)
        uses_context = not (context is None or (isinstance(context, float) and math.isnan(context)))
        if uses_context:
            legend += f"\nscore = {1 - CONTEXT_WEIGHT:.2f} × base + {CONTEXT_WEIGHT:.2f} × max(base, context)"
        table = _table()
        table.add_column("score component")
        table.add_column("weight", justify="right")
        table.add_column("score", justify="right")
        table.add_column("", no_wrap=True)
        table.add_column("adds", justify="right")
        base = 0.0
        for component in BASE_COMPONENTS:
            value, weight = float(components[component]), weights[component]
            base += weight * value
            table.add_row(Text(_label(component), style="bold"), f"{weight:.2f}", _score(value), score_bar(value),
                          f"{weight * value:.3f}")
            for key, share in _sub_weights(component, sub_scores).items():
                sub = sub_scores[key]
                table.add_row(Text(f"  {SUB_SCORE_LABELS.get(key, key)}", style="dim"), Text(f"{share:.2f}", "dim"),
                              _score(sub), score_bar(sub, style="dim"), Text(f"{weight * share * sub:.3f}", "dim"))
        table.add_section()
        table.add_row(Text("base", style="bold"), "", _score(base), score_bar(base), f"{base:.3f}")
        if not uses_context:
            table.add_row(CONTEXT, "", Text("-", style="dim"), Text("not used (no hierarchy rounds)", "dim"), "")
        else:
            lift = ex["score"] - base
            table.add_row(CONTEXT, f"{CONTEXT_WEIGHT:.2f}", _score(context), score_bar(context),
                          f"{'+' if lift >= 0 else ''}{lift:.3f}")
        table.add_section()
        table.add_row(Text("score", style="bold"), "", _score(ex["score"]), score_bar(ex["score"]),
                      Text(f"{ex['score']:.3f}", style="bold"))
        return table, Text(legend, style="dim")

    def _alternatives_table(self) -> Table:
        ex = self.explanation
        alternatives = ex["alternatives"][: self.max_alternatives]
        title = ("Alternatives (best first)" if ex["score"] is not None else "Best candidates")
        table = _table(title)
        table.add_column("candidate", overflow="fold")
        table.add_column("score", justify="right")
        if ex["score"] is not None:
            table.add_column("vs chosen", justify="right")
        for component in (*BASE_COMPONENTS, CONTEXT):
            table.add_column(_label(component), justify="right")
        for alt in alternatives:
            cells: list[Any] = [plain(alt["label"] or "(root)"), _score(alt["score"])]
            if ex["score"] is not None:
                cells.append(f"{alt['score'] - ex['score']:+.3f}")
            cells += [_score(alt["components"].get(c)) for c in (*BASE_COMPONENTS, CONTEXT)]
            table.add_row(*cells)
        n_more = len(ex["alternatives"]) - len(alternatives)
        if n_more > 0:
            table.add_row(Text(f"… {n_more} more", style="dim"))
        return table


def _sub_weights(component: str, sub_scores: Mapping[str, float]) -> dict[str, float]:
    """The share of each sub-score in its component, rescaled over the ones present (as score.py does)."""
    spec = KEY2COMPONENT.get(component)
    return spec.rescaled_shares(sub_scores) if spec is not None else {}


def _label(component: str) -> str:
    """How a score component is called (:data:`~weight_mapper.score.SCORE_COMPONENTS`)."""
    spec = KEY2COMPONENT.get(component)
    return spec.label if spec is not None else component


# ------------------------------------------------------------------------------------ output


def print_view(*renderables: Any, console: Console | None = None) -> None:
    """Print views to ``console`` (a new stdout Console by default)."""
    (console or Console()).print(*renderables)


_HTML_TEMPLATE = """<!DOCTYPE html>
<html>
<head>
<meta charset="UTF-8">
<title>{title}</title>
<style>
{{stylesheet}}
body {{{{
    color: {{foreground}};
    background-color: {{background}};
}}}}
</style>
</head>
<body>
<pre style="font-family:Menlo,'DejaVu Sans Mono',consolas,'Courier New',monospace"><code style="font-family:inherit">{{code}}</code></pre>
</body>
</html>
"""


def export_html(renderables: Iterable[Any], path: str | Path, *, title: str = "weight_mapper review",
                width: int = 120, protected: Iterable[str | Path] = ()) -> Path:
    """Render views into one self-contained HTML file (inline styles, no scripts), atomically.

    Args:
        renderables: The views, in order.
        path: The HTML file to write.
        title: The page title.
        width: Characters per line of the rendering.
        protected: Paths the file must never overwrite (the checkpoints, the plan).

    Raises:
        CheckpointError: If ``path`` is protected or its folder is missing.
    """
    import html
    import io

    from weight_mapper.checkpoint import write_text_atomic

    console = Console(record=True, file=io.StringIO(), width=width, color_system="truecolor", force_terminal=True)
    for i, renderable in enumerate(renderables):
        if i:
            console.print()
        console.print(renderable)
    template = _HTML_TEMPLATE.format(title=html.escape(title))
    return write_text_atomic(path, console.export_html(inline_styles=True, code_format=template), protected=protected)
