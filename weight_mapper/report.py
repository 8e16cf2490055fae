"""Stage 7: reports of a plan for people (rich) and for programs (JSON).

This and the CLI are the only modules that import rich.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from weight_mapper.plan import FLAG_DESCRIPTIONS, PROVENANCES, MappingPlan, PlanEntry

__all__ = ["analysis_renderable", "print_analysis", "report_dict", "export_report", "score_style", "risk_key",
           "risk_tier", "review_marks", "RISK_TIERS"]

#: Review tiers, riskiest first. ``flagged``: ambiguous or carrying a flag, not proved;
#: ``repaired``: changed by a layer-wise proof; ``unproved``: matched, never proved; ``proved``.
RISK_TIERS = ("flagged", "repaired", "unproved", "proved")
# entry.provenance -> its mark in the views (a plain "matched" has none)
PROVENANCE2MARK = {"repaired": "↻ repaired", "proved": "✓ proved"}


def score_style(score: float) -> str:
    """Colour of a score: green above 0.8, yellow from 0.6, red below."""
    return "green" if score > 0.8 else "yellow" if score >= 0.6 else "red"


def risk_tier(entry: PlanEntry) -> str:
    """The :data:`RISK_TIERS` entry of ``entry``; a proof outranks a flag.

    >>> risk_tier(PlanEntry(("a",), "b", None, 0.9, 0.001, "tensor", (2,), (2,)))
    'flagged'
    """
    if entry.provenance == "proved":
        return "proved"
    if entry.flagged:
        return "flagged"
    return "repaired" if entry.provenance == "repaired" else "unproved"


def risk_key(entry: PlanEntry) -> tuple:
    """Sort key putting the entries to review first: by tier, then lowest margin, then lowest score.

    Ties keep their order (a stable sort keeps the plan's target order).
    """
    return RISK_TIERS.index(risk_tier(entry)), _or_inf(entry.margin), _or_inf(entry.score)


def _or_inf(x: float) -> float:
    """An unscored value (NaN: a pair set by hand) sorts after every scored one."""
    return math.inf if math.isnan(x) else x


def review_marks(entry: PlanEntry) -> list[str]:
    """What a reviewer must know of ``entry`` in a few characters: ambiguity, flags, provenance."""
    marks = ["⚠"] if entry.ambiguous else []
    marks += list(entry.flags)
    if entry.provenance in PROVENANCE2MARK:
        marks.append(PROVENANCE2MARK[entry.provenance])
    return marks


def flags_legend(entries) -> str:
    """One line per flag carried by ``entries``: the flag and what it means."""
    flags = sorted({f for e in entries for f in e.flags})
    return "\n".join(f"{flag}: {FLAG_DESCRIPTIONS.get(flag, 'see the plan')}" for flag in flags)


def _shape(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def plain(text: str) -> Text:
    """``text`` as a rich Text, never read as markup, with unencodable characters (a lone
    surrogate from a file name) escaped: a hostile tensor name can never break a report."""
    return Text(text.encode("utf-8", "backslashreplace").decode("utf-8"))


def _entry_row(e: PlanEntry) -> tuple:
    marks = [e.transform] if e.transform else []
    marks += ([f"ambiguous (margin {e.margin:.3f})"] if e.ambiguous else []) + list(e.flags)
    if e.provenance in PROVENANCE2MARK:
        marks.append(PROVENANCE2MARK[e.provenance])
    return (
        plain(", ".join(e.source)),
        plain(e.target),
        Text("-", style="dim") if math.isnan(e.score) else Text(f"{e.score:.3f}", style=score_style(e.score)),
        _shape(e.source_shape) + ("" if e.source_shape == e.target_shape else " -> " + _shape(e.target_shape)),
        e.level,
        " ".join(marks),
    )


_NAME_MIN_WIDTH = 20  # a name column keeps this many characters before it wraps


def _entries_table(title: str, entries: Sequence[PlanEntry]) -> Table:
    # Names wrap instead of being cut: two names that differ only in their last characters (a
    # swap to review) must stay visibly different at 80 columns. They keep their full width up
    # to _NAME_MIN_WIDTH characters; the short columns give way first.
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
    for col, names in (("source", [", ".join(e.source) for e in entries]), ("target", [e.target for e in entries])):
        table.add_column(col, overflow="fold", min_width=min(_NAME_MIN_WIDTH, max(map(len, names), default=1)))
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
    n_repaired = sum(e.provenance == "repaired" for e in plan.entries)
    n_proved = sum(e.provenance == "proved" for e in plan.entries)
    if n_repaired or n_proved:
        summary.append(f"\nlayer-wise proof: {n_proved} proved, {n_repaired} repaired, "
                       f"{n_matched - n_proved - n_repaired} unproved")
    if plan.ambiguous:
        summary.append(f"\n{len(plan.ambiguous)} ambiguous matches withheld", style="yellow")
    flags: dict[str, int] = {}
    for e in plan.entries:
        for f in e.flags:
            flags[f] = flags.get(f, 0) + 1
    for f, n in flags.items():
        summary.append(f"\n{n} entries flagged {f}: {FLAG_DESCRIPTIONS.get(f, 'review them')}", style="yellow")
    parts: list[Any] = [Panel(summary, title="weight_mapper analysis", expand=False)]
    if top_n > 0 and plan.entries:
        shown = sorted(plan.entries, key=risk_key)[:top_n]
        table = _entries_table(f"Matches, riskiest first ({min(top_n, n_matched)} of {n_matched})", shown)
        for e in shown:
            table.add_row(*_entry_row(e))
        parts.append(table)
    if plan.ambiguous:
        shown = sorted(plan.ambiguous, key=risk_key)[:top_n]
        table = _entries_table("Withheld as ambiguous", shown)
        for e in shown:
            table.add_row(*_entry_row(e))
        parts.append(table)
    legend = flags_legend([*plan.entries, *plan.ambiguous])
    if legend and top_n > 0:
        parts.append(Text(legend, style="dim"))
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
