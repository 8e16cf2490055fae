"""Stage 7: reports of a plan for people (rich) and for programs (JSON).

This and the CLI are the only modules that import rich.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from weight_mapper.plan import FLAG_DESCRIPTIONS, PROVENANCES, MappingPlan, PlanEntry

__all__ = ["analysis_renderable", "print_analysis", "report_dict", "export_report", "score_style"]


def score_style(score: float) -> str:
    """Colour of a score: green above 0.8, yellow from 0.6, red below."""
    return "green" if score > 0.8 else "yellow" if score >= 0.6 else "red"


def _shape(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def plain(text: str) -> Text:
    """``text`` as a rich Text, never read as markup, with unencodable characters (a lone
    surrogate from a file name) escaped: a hostile tensor name can never break a report."""
    return Text(text.encode("utf-8", "backslashreplace").decode("utf-8"))


def _entry_row(e: PlanEntry) -> tuple:
    marks = []
    if e.transform:
        marks.append(e.transform)
    if e.ambiguous:
        marks.append("ambiguous")
    marks.extend(e.flags)
    if e.provenance != "matched":
        marks.append(e.provenance)
    return (
        plain(", ".join(e.source)),
        plain(e.target),
        Text(f"{e.score:.3f}", style=score_style(e.score)),
        _shape(e.source_shape) + ("" if e.source_shape == e.target_shape else " -> " + _shape(e.target_shape)),
        e.level,
        " ".join(marks),
    )


def _entries_table(title: str) -> Table:
    # Names wrap instead of being cut: two names that differ only in their last characters (a
    # swap to review) must stay visibly different at 80 columns.
    table = Table(title=title)
    table.add_column("source", overflow="fold")
    table.add_column("target", overflow="fold")
    for col in ("score", "shape", "level", "note"):
        table.add_column(col, overflow="fold")
    return table


def analysis_renderable(plan: MappingPlan, *, top_n: int = 10, show_unmatched: bool = True) -> Group:
    """The ``print_analysis`` view as one rich renderable."""
    n_matched = len(plan.entries)
    summary = Text()
    summary.append(plain(f"{plan.source_label or 'source'} -> {plan.target_label or 'target'}\n").plain, style="bold")
    summary.append(
        f"strategy {plan.strategy}, threshold {plan.threshold:.2f}, hierarchy rounds "
        f"{plan.rounds[0]}+{plan.rounds[1]}{'' if plan.converged else ' (not converged)'}\n"
    )
    summary.append(f"target tensors filled: {n_matched}/{plan.n_target} ({plan.coverage:.1%})\n")
    summary.append(f"unmatched: {len(plan.unmatched_source)} source, {len(plan.unmatched_target)} target")
    if plan.source_prefix:
        summary.append(plain(f"\nsource prefix {plan.source_prefix!r} ignored while matching").plain)
    if tuple(plan.flow_sources) != ("none", "none"):
        summary.append(f"\ndata flow: {plan.flow_sources[0]} (source), {plan.flow_sources[1]} (target)")
    n_ambiguous = sum(e.ambiguous for e in plan.entries)
    if n_ambiguous:
        summary.append(f"\n{n_ambiguous} matches are ambiguous (runner-up within the margin): review them", style="yellow")
    if plan.ambiguous:
        summary.append(f"\n{len(plan.ambiguous)} ambiguous matches withheld", style="yellow")
    flags: dict[str, int] = {}
    for e in plan.entries:
        for f in e.flags:
            flags[f] = flags.get(f, 0) + 1
    for f, n in flags.items():
        summary.append(f"\n{n} entries flagged {f}: {FLAG_DESCRIPTIONS.get(f, 'review them')}", style="yellow")
    provenance = {p: sum(e.provenance == p for e in plan.entries) for p in PROVENANCES}
    if provenance["proved"] or provenance["repaired"]:
        summary.append(f"\nlayer-wise proof: {provenance['proved']} entries proved, {provenance['repaired']} repaired, "
                       f"{provenance['matched']} as matched")
    parts: list[Any] = [Panel(summary, title="weight_mapper analysis", expand=False)]
    if top_n > 0 and plan.entries:
        table = _entries_table(f"Matches (lowest scores first, {min(top_n, n_matched)} of {n_matched})")
        for e in sorted(plan.entries, key=lambda e: (e.score, e.target))[:top_n]:
            table.add_row(*_entry_row(e))
        parts.append(table)
    if plan.ambiguous:
        table = _entries_table("Withheld as ambiguous")
        for e in plan.ambiguous[:top_n]:
            table.add_row(*_entry_row(e))
        parts.append(table)
    if show_unmatched and (plan.unmatched_source or plan.unmatched_target):
        table = Table(title="Unmatched")
        table.add_column("source", overflow="fold")
        table.add_column("target", overflow="fold")
        n = max(len(plan.unmatched_source), len(plan.unmatched_target))
        shown = min(n, max(top_n, 1))
        for i in range(shown):
            table.add_row(
                plain(plan.unmatched_source[i] if i < len(plan.unmatched_source) else ""),
                plain(plan.unmatched_target[i] if i < len(plan.unmatched_target) else ""),
            )
        if n > shown:
            table.add_row(f"... {max(len(plan.unmatched_source) - shown, 0)} more", f"... {max(len(plan.unmatched_target) - shown, 0)} more")
        parts.append(table)
    return Group(*parts)


def print_analysis(plan: MappingPlan, *, top_n: int = 10, show_unmatched: bool = True, console: Console | None = None) -> None:
    """Print :func:`analysis_renderable` to ``console`` (stdout by default)."""
    (console or Console()).print(analysis_renderable(plan, top_n=top_n, show_unmatched=show_unmatched))


def report_dict(plan: MappingPlan) -> dict[str, Any]:
    """The JSON report: the plan (loadable by ``MappingPlan.from_dict``) plus summary counts."""
    out = plan.to_dict()
    out["summary"] = {
        "source_model": plan.source_label,
        "target_model": plan.target_label,
        "n_source": plan.n_source,
        "n_target": plan.n_target,
        "n_matched": len(plan.entries),
        "n_ambiguous": sum(e.ambiguous for e in plan.entries) + len(plan.ambiguous),
        "n_unmatched_source": len(plan.unmatched_source),
        "n_unmatched_target": len(plan.unmatched_target),
        "coverage": round(plan.coverage, 6),
        "n_flagged": sum(bool(e.flags) for e in plan.entries),
        "provenance": {p: sum(e.provenance == p for e in plan.entries) for p in PROVENANCES},
    }
    return out


def export_report(plan: MappingPlan, path: str | Path) -> Path:
    """Write :func:`report_dict` as JSON, atomically."""
    import json

    from weight_mapper.checkpoint import write_text_atomic

    path = Path(path)
    write_text_atomic(path, json.dumps(report_dict(plan), indent=2))
    return path
