from rich.console import Console

from fixture_models import OldModel, PartiallyCompatible
from weight_mapper import MappingPlan, PlanEntry, WeightMapper
from weight_mapper.report import report_dict, risk_key, risk_tier, score_style


def render(mapper, **kwargs) -> str:
    console = Console(color_system=None, width=100, record=True)
    mapper.print_analysis(console=console, **kwargs)
    return console.export_text()


def test_print_analysis_shows_counts_and_unmatched():
    mapper = WeightMapper(OldModel(), PartiallyCompatible())
    mapper.suggest_mapping()
    text = render(mapper, top_n=3)
    assert "OldModel -> PartiallyCompatible" in text
    assert "target tensors filled: 7/9 (77.8%)" in text
    assert "Matches, riskiest first (3 of 7)" in text
    assert "extra.weight" in text and "backbone.0.bias" in text


def test_print_analysis_can_hide_unmatched():
    mapper = WeightMapper(OldModel(), PartiallyCompatible())
    mapper.suggest_mapping()
    assert "Unmatched" not in render(mapper, show_unmatched=False)


def test_report_summary():
    mapper = WeightMapper(OldModel(), PartiallyCompatible())
    mapper.suggest_mapping()
    summary = report_dict(mapper.get_plan())["summary"]
    assert summary == {
        "source_model": "OldModel", "target_model": "PartiallyCompatible", "n_source": 8, "n_target": 9,
        "n_matched": 7, "n_ambiguous": 0, "n_unmatched_source": 1, "n_unmatched_target": 2, "coverage": 0.777778,
        "n_flagged": 0, "provenance": {"matched": 7, "repaired": 0, "proved": 0},
    }


def test_score_colours():
    assert [score_style(s) for s in (0.9, 0.7, 0.5)] == ["green", "yellow", "red"]


def test_score_colour_boundaries():
    """The views colour scores with score_style: 0.8 is still yellow, 0.6 is not yet red."""
    assert [score_style(s) for s in (0.81, 0.8, 0.6, 0.59)] == ["green", "yellow", "yellow", "red"]


def _entry(target: str, *, score: float = 0.9, margin: float = 0.5, flags=(), provenance="matched") -> PlanEntry:
    return PlanEntry((f"src.{target}",), target, None, score, margin, "tensor", (4,), (4,),
                     flags=tuple(flags), provenance=provenance)


RISKY = [  # in review order
    _entry("ambiguous", margin=0.001),
    _entry("order", margin=0.3, flags=("order_only",)),
    _entry("repaired", margin=0.05, provenance="repaired"),
    _entry("low_margin", margin=0.03),
    _entry("low_score", score=0.61, margin=0.2),
    _entry("sure", score=0.7, margin=0.2),
    _entry("proved_ambiguous", margin=0.001, provenance="proved"),
    _entry("proved", margin=0.4, provenance="proved"),
]


def test_risk_order_is_flagged_repaired_unproved_proved_then_margin_then_score():
    shuffled = RISKY[::-1]
    assert [e.target for e in sorted(shuffled, key=risk_key)] == [e.target for e in RISKY]
    assert [risk_tier(e) for e in RISKY] == ["flagged", "flagged", "repaired", "unproved", "unproved", "unproved",
                                             "proved", "proved"]


def test_print_analysis_lists_the_riskiest_first_with_flags_and_provenance():
    plan = MappingPlan(tuple(RISKY[::-1]))
    console = Console(color_system=None, width=140, record=True)
    from weight_mapper.report import print_analysis

    print_analysis(plan, top_n=4, console=console)
    text = console.export_text()
    rows = [line.split()[1] for line in text.splitlines() if line.startswith(" src.")]
    assert rows == ["ambiguous", "order", "repaired", "low_margin"]
    assert "order_only: decided by order alone" in text
    assert "↻ repaired" in text and "layer-wise proof: 2 proved, 1 repaired, 5 unproved" in text
    assert "1 entries flagged order_only: decided by order alone" in text


def test_an_unscored_entry_set_by_hand_sorts_after_the_scored_ones_of_its_tier():
    import math

    manual = PlanEntry(("src.manual",), "manual", None, math.nan, math.nan, "manual", (4,), (4,))
    order = sorted([manual, *RISKY[::-1]], key=risk_key)
    assert [e.target for e in order].index("manual") == [e.target for e in RISKY].index("proved_ambiguous")
    console = Console(color_system=None, width=140, record=True)
    from weight_mapper.report import print_analysis

    print_analysis(MappingPlan((manual,)), console=console)
    import re

    assert re.search(r"src\.manual[ │]+manual[ │]+-[ │]+\[4\]", console.export_text())
