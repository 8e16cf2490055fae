from rich.console import Console

from fixture_models import OldModel, PartiallyCompatible
from weight_mapper import WeightMapper
from weight_mapper.report import report_dict, score_style


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
    assert "Matches (lowest scores first, 3 of 7)" in text
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
