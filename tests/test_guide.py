"""The user guide (../shared/spec/weightmapper-guide.md), walked example by example.

Each test runs one example or API-reference entry of the guide as a reader would, adapting only
the import path (``lit_wsl.models.weight_mapper`` -> ``weight_mapper``) and the models an example
leaves undefined (``OldModel``/``NewModel`` are the fixture models of the same names). Where we
deliberately differ from the guide, README.md's "Differences from the guide" says how and why.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from fixture_models import (
    BatchNormed,
    NewModel,
    OldModel,
    Tied,
    TiedRenamed,
    Transposed,
    TransposedTarget,
)
from torch import nn

from weight_mapper import MappingPlan, PlanError, WeightMapper, WeightRenamer
from weight_mapper.checkpoint import load_checkpoint_as_dict
from weight_mapper.mapping_dict import MappingDict

X = torch.randn(1, 3, 8, 8)


@pytest.fixture
def old_model_pth(tmp_path, monkeypatch):
    """The guide's ``old_model.pth``: a Lightning checkpoint of OldModel, in the current folder."""
    monkeypatch.chdir(tmp_path)
    old = OldModel().eval()
    torch.save({"state_dict": old.state_dict(), "epoch": 3, "hyper_parameters": {"lr": 0.1}}, "old_model.pth")
    return old


def _same_outputs(old: nn.Module, new: nn.Module) -> bool:
    with torch.no_grad():
        return torch.allclose(old.eval()(X), new.eval()(X), atol=1e-6)


# ---------------------------------------------------------------------------- Usage Examples
def test_basic_usage(old_model_pth, capsys):
    new_model = NewModel()
    mapper = WeightMapper.from_checkpoint("old_model.pth", new_model)

    mapping = mapper.suggest_mapping(threshold=0.6)
    mapper.print_analysis()

    renamer = WeightRenamer("old_model.pth")
    renamer.rename_keys(mapping)
    renamer.save("adapted_weights.pth")

    new_model.load_state_dict(torch.load("adapted_weights.pth"))
    assert _same_outputs(old_model_pth, new_model)
    assert "old_model.pth -> NewModel" in capsys.readouterr().out


def test_with_execution_order_tracking(old_model_pth):
    dummy_input = torch.randn(1, 3, 224, 224)
    new_model = NewModel()
    mapper = WeightMapper.from_checkpoint("old_model.pth", new_model, dummy_input=dummy_input)
    mapping = mapper.suggest_mapping(threshold=0.6)
    assert mapping == {k: k.replace("backbone", "feature_extractor").replace("classifier", "head")
                       for k in OldModel().state_dict()}


def test_option_1_from_checkpoint_via_state_dict(old_model_pth):
    checkpoint = load_checkpoint_as_dict("old_model.pth")
    if "state_dict" in checkpoint:
        old_weights = checkpoint["state_dict"]
    else:
        old_weights = checkpoint
    new_model = NewModel()
    mapper = WeightMapper.from_state_dict(old_weights, new_model)
    mapping = mapper.suggest_mapping(threshold=0.6)
    mapper.print_analysis()
    renamer = WeightRenamer("old_model.pth")
    renamer.rename_keys(mapping)
    renamer.save("adapted_weights.pth")
    new_model.load_state_dict(torch.load("adapted_weights.pth"))
    assert _same_outputs(old_model_pth, new_model)


def test_option_2_from_two_models():
    old_model, new_model = OldModel(), NewModel()
    mapper = WeightMapper(old_model, new_model)
    mapping = mapper.suggest_mapping(threshold=0.6)
    mapper.print_analysis()
    mapping_dict = mapper.get_mapping_dict()
    assert mapping_dict == mapping and mapping_dict is not mapping and len(mapping) == 8


def test_option_3_directly_from_checkpoint_file(old_model_pth):
    mapper = WeightMapper.from_checkpoint("old_model.pth", NewModel())
    assert len(mapper.suggest_mapping()) == 8


@pytest.mark.parametrize("strategy", ["conservative", "shape_only"])
def test_strategies(strategy):
    mapper = WeightMapper(OldModel(), NewModel())
    mapping = mapper.suggest_mapping(strategy=strategy)
    assert len(mapping) == 8
    if strategy == "conservative":  # "only suggests high-confidence matches (threshold >= 0.75)"
        assert all(score >= 0.75 for _, _, score in mapper.get_mapping_with_scores())


def test_custom_weights():
    mapper = WeightMapper(OldModel(), NewModel())
    custom_weights = {"shape": 0.5, "name": 0.4, "hierarchy": 0.1}
    assert len(mapper.suggest_mapping(weights=custom_weights)) == 8


def test_export_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mapper = WeightMapper(OldModel(), NewModel())
    mapper.export_mapping_report("mapping_report.json")
    report = json.loads((tmp_path / "mapping_report.json").read_text())
    assert report["summary"]["n_matched"] == 8 and report["unmatched_source"] == []
    assert {"source", "target", "score", "source_shape", "target_shape"} <= set(report["entries"][0])


def test_get_mappings_with_scores():
    mapper = WeightMapper(OldModel(), NewModel())
    mapper.suggest_mapping()
    mappings = mapper.get_mapping_with_scores()
    mappings.sort(key=lambda x: x[2], reverse=True)
    low_confidence = [(s, t, score) for s, t, score in mappings if score < 0.7]
    assert len(mappings) == 8 and low_confidence == []
    assert all(isinstance(s, str) and isinstance(t, str) and 0 <= score <= 1 for s, t, score in mappings)
    assert [m[2] for m in mappings] == sorted((m[2] for m in mappings), reverse=True)


# ---------------------------------------------------------------------------- Execution order
def test_execution_order_usage(tmp_path):
    dummy_input = torch.randn(1, 3, 224, 224)
    old_model, new_model = OldModel(), NewModel()
    torch.save(old_model.state_dict(), tmp_path / "old.pth")
    state_dict = old_model.state_dict()
    mappers = [
        WeightMapper(old_model, new_model, dummy_input=dummy_input),
        WeightMapper.from_checkpoint(tmp_path / "old.pth", new_model, dummy_input=dummy_input),
        WeightMapper.from_state_dict(state_dict, new_model, dummy_input=dummy_input),
    ]
    assert all(len(m.suggest_mapping()) == 8 for m in mappers)


# ---------------------------------------------------------------------------- API reference
def test_constructor_keywords_of_the_api_reference():
    mapper = WeightMapper(source_module=OldModel(), target_module=NewModel(), shape_tolerance=0.0,
                          dummy_input=None, incompatible_pairs=None)
    assert len(mapper.suggest_mapping(threshold=0.6, strategy="best_match", weights=None)) == 8
    assert len(WeightMapper(OldModel(), NewModel(), 0.0).suggest_mapping()) == 8  # positional shape_tolerance


def test_from_state_dict_keywords_and_positions():
    sd = OldModel().state_dict()
    m1 = WeightMapper.from_state_dict(source_state_dict=sd, target_module=NewModel(), shape_tolerance=0.0,
                                      dummy_input=None, incompatible_pairs=None)
    m2 = WeightMapper.from_state_dict(sd, NewModel(), 0.1, None, [])
    assert m1.suggest_mapping() == m2.suggest_mapping()
    assert m2.shape_tolerance == 0.1


def test_from_checkpoint_keywords_and_positions(tmp_path):
    torch.save(OldModel().state_dict(), tmp_path / "old_model.pth")
    m1 = WeightMapper.from_checkpoint(checkpoint_path=tmp_path / "old_model.pth", target_module=NewModel(),
                                      shape_tolerance=0.0)
    m2 = WeightMapper.from_checkpoint(str(tmp_path / "old_model.pth"), NewModel(), 0.1)
    assert m1.suggest_mapping() == m2.suggest_mapping() and m2.shape_tolerance == 0.1


def test_methods_of_the_api_reference(tmp_path, capsys):
    mapper = WeightMapper(OldModel(), NewModel())
    mapping = mapper.suggest_mapping(threshold=0.6, strategy="best_match", weights=None)
    assert isinstance(mapping, dict)
    mapper.print_analysis(top_n=10, show_unmatched=True)
    assert ("backbone.0.weight", "feature_extractor.0.weight") in _column_cells(capsys.readouterr().out)
    assert mapper.get_unmatched() == {"source": [], "target": []}
    assert mapper.get_mapping_dict() == mapping
    out = mapper.export_mapping_report(output_path=tmp_path / "r.json")
    assert json.loads(out.read_text())["summary"]["n_matched"] == 8


# ---------------------------------------------------------------------------- incompatible pairs
class EncoderDecoderNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(5, 5)
        self.embedding = nn.Linear(5, 5)
        self.decoder = nn.Linear(5, 5)
        self.output = nn.Linear(5, 5)


def test_incompatible_pairs_take_sets_of_alternatives():
    custom_pairs = [
        ({"encoder", "embedding"}, {"decoder", "output"}),
        ({"attention"}, {"feedforward", "mlp"}),
    ]
    source = {"encoder.weight": torch.zeros(5, 5), "embedding.weight": torch.zeros(5, 5)}
    target = {"decoder.weight": torch.zeros(5, 5), "output.weight": torch.zeros(5, 5)}
    assert WeightMapper(source, target, incompatible_pairs=[]).suggest_mapping(threshold=0.0) != {}
    # any name on the left against any name on the right, in both directions
    assert WeightMapper(source, target, incompatible_pairs=custom_pairs).suggest_mapping(threshold=0.0) == {}
    assert WeightMapper(target, source, incompatible_pairs=custom_pairs).suggest_mapping(threshold=0.0) == {}
    mapper = WeightMapper(EncoderDecoderNet(), EncoderDecoderNet(), incompatible_pairs=custom_pairs)
    assert mapper.suggest_mapping()["encoder.weight"] == "encoder.weight"
    # our pair form keeps its meaning: only encoder <-> decoder is forbidden
    pair_form = WeightMapper(source, target, incompatible_pairs=[("encoder", "decoder")]).suggest_mapping(threshold=0.0)
    assert pair_form.get("encoder.weight") != "decoder.weight" and len(pair_form) == 2


def test_incompatible_pairs_pair_form_and_mixed_form():
    source = {"encoder.weight": torch.zeros(5, 5)}
    target = {"decoder.weight": torch.zeros(5, 5)}
    for rules in ([("encoder", "decoder")], [({"encoder"}, "decoder")], [(["encoder", "x"], {"decoder"})]):
        assert WeightMapper(source, target, incompatible_pairs=rules).suggest_mapping(threshold=0.0) == {}
    assert WeightMapper(source, target, incompatible_pairs=[("enc", "decoder")]).suggest_mapping(
        threshold=0.0) == {"encoder.weight": "decoder.weight"}


@pytest.mark.parametrize("bad", [[({"encoder"},)], [(set(), {"decoder"})], [({"encoder", 3}, {"decoder"})], "encoder"])
def test_malformed_incompatible_pairs_are_refused_by_name(bad):
    from weight_mapper import MappingError

    with pytest.raises(MappingError, match="incompatible_pairs"):
        WeightMapper(OldModel(), NewModel(), incompatible_pairs=bad)


def test_the_guides_incompatible_pairs_examples_run():
    vision_pairs = [
        ({"backbone", "encoder", "feature"}, {"head", "classifier", "decoder"}),
        ({"backbone", "encoder"}, {"neck", "fpn"}),
    ]
    vit_pairs = [
        ({"patch", "embedding"}, {"head", "classifier"}),
        ({"encoder", "transformer"}, {"decoder", "mlp_head"}),
    ]
    detection_pairs = [
        ({"backbone", "resnet", "vgg"}, {"rpn", "head", "neck"}),
        ({"fpn", "pafpn"}, {"roi", "head"}),
    ]
    for pairs in (vision_pairs, vit_pairs, detection_pairs):
        assert len(WeightMapper(OldModel(), NewModel(), incompatible_pairs=pairs).suggest_mapping()) == 8
    # vision_pairs forbid backbone -> head: OldModel's backbone never lands in NewModel's head
    mapping = WeightMapper(OldModel(), NewModel(), incompatible_pairs=vision_pairs).suggest_mapping(threshold=0.0)
    assert not any(s.startswith("backbone") and t.startswith("head") for s, t in mapping.items())
    assert len(WeightMapper(OldModel(), NewModel()).suggest_mapping()) == 8  # default: no restrictions


# ---------------------------------------------------------------------------- Best practices
def test_manual_override_then_apply_and_test_loading():
    old, new = OldModel(), NewModel()
    mapper = WeightMapper(old, new)
    mapper.suggest_mapping()
    mapping = mapper.get_mapping_dict()
    # Manually adjust specific mappings (here: a swap of two same-shaped biases, on purpose)
    mapping["classifier.0.bias"], mapping["classifier.2.bias"] = "head.0.bias", "head.2.bias"
    renamer = WeightRenamer(old.state_dict())
    adapted_weights = renamer.rename_keys(mapping)
    try:
        new.load_state_dict(adapted_weights)
        loaded = True
    except Exception:  # noqa: BLE001  (the guide's own words)
        loaded = False
    assert loaded and _same_outputs(old, new)


# ---------------------------------------------------------------------------- Visualization
def test_visualizing_mapping_results_with_an_edited_dict(capsys):
    old, new = OldModel(), NewModel()
    checkpoint = {"state_dict": old.state_dict(), "epoch": 1}
    mapper = WeightMapper.from_state_dict(checkpoint, new)
    result = mapper.suggest_mapping(threshold=0.6)
    mapper.visualize_mapping(result=result, show_unmatched=True, max_matches=30, max_unmatched=15)
    first = capsys.readouterr().out
    assert "head.2.bias" in first and "unmatched" not in first.lower().split("score:")[0].split("target tensors")[0]
    edited = dict(result)
    del edited["classifier.2.bias"]
    edited["classifier.0.bias"] = "head.2.bias"  # a hand edit whose shapes do not fit is refused, by name
    with pytest.raises(PlanError, match="classifier.0.bias"):
        mapper.visualize_mapping(result=edited)
    del edited["classifier.0.bias"]
    mapper.visualize_mapping(result=edited)
    shown = capsys.readouterr().out
    assert "Unmatched" in shown and "classifier.0.bias" in shown and "classifier.2.bias" in shown


def test_visualizing_hierarchies_and_score_breakdowns(capsys):
    mapper = WeightMapper(OldModel(), NewModel())
    mapper.visualize_hierarchies(max_depth=5)
    mapper.visualize_hierarchies(5)  # positional max_depth
    mapper.suggest_mapping()
    mapper.visualize_hierarchies(show_matches=True, max_depth=5)
    mapper.visualize_score_breakdown("backbone.0.weight")
    out = capsys.readouterr().out
    assert "feature_extractor" in out and "backbone.0.weight" in out


# ---------------------------------------------------------------------------- Part 2: groups
def test_group_members_move_together():
    """conv1.weight and conv1.bias (and a BatchNorm's four tensors) are always mapped together."""
    mapper = WeightMapper(BatchNormed(), BatchNormed())
    mapping = mapper.suggest_mapping()
    modules = {}
    for name in BatchNormed().state_dict():
        if name.endswith("num_batches_tracked"):
            continue
        modules.setdefault(name.rsplit(".", 1)[0], []).append(name in mapping)
    assert all(all(v) or not any(v) for v in modules.values())


# ---------------------------------------------------------------------------- issue 13, item by item
class SeparateQKV(nn.Module):
    """Separate q/k/v projections (grouped-query: k and v are narrower)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"q_proj": nn.Linear(16, 16, bias=False), "k_proj": nn.Linear(16, 4, bias=False),
                                   "v_proj": nn.Linear(16, 4, bias=False)})


class FusedQKV(nn.Module):
    """The same projections fused into one qkv Linear."""

    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"qkv": nn.Linear(16, 24, bias=False)})


class PointwiseConv(nn.Module):
    """A 1x1 conv and a layer scale of shape [C, 1, 1]."""

    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(8, 8, 1)
        self.gamma = nn.Parameter(torch.randn(8, 1, 1))


class PointwiseLinear(nn.Module):
    """The same as a Linear and a layer scale of shape [C]."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.ls = nn.Parameter(torch.ones(8))


@pytest.mark.parametrize(("make_source", "make_target", "transform"), [
    (Transposed, TransposedTarget, "transpose"),
    (PointwiseConv, PointwiseLinear, "reshape"),
    (SeparateQKV, FusedQKV, "concat"),
])
def test_dict_path_and_plan_path_convert_the_same(make_source, make_target, transform, tmp_path):
    """Item 1: rename_keys(suggest_mapping()) == rename_keys(get_plan()), tensor for tensor."""
    source, target = make_source(), make_target()
    torch.save(source.state_dict(), tmp_path / "old.pth")
    mapper = WeightMapper.from_checkpoint(tmp_path / "old.pth", target)
    mapping = mapper.suggest_mapping()
    plan = mapper.get_plan()
    assert isinstance(mapping, MappingDict) and mapping.plan is plan
    assert transform in {e.transform for e in plan.entries}
    by_dict = dict(WeightRenamer(tmp_path / "old.pth").rename_keys(mapping).items())
    by_plan = dict(WeightRenamer(tmp_path / "old.pth").rename_keys(plan).items())
    assert by_dict.keys() == by_plan.keys() == target.state_dict().keys()
    assert all(torch.equal(by_dict[k], by_plan[k]) for k in by_plan)
    target.load_state_dict(by_dict)  # the right shapes under the right keys
    # ... and through save(): the same file contents
    for name, m in (("a.pth", mapping), ("b.pth", plan)):
        r = WeightRenamer(tmp_path / "old.pth")
        r.rename_keys(m)
        r.save(tmp_path / name)
    a, b = torch.load(tmp_path / "a.pth"), torch.load(tmp_path / "b.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_edited_mapping_keeps_its_transforms_and_checks_the_edits():
    source, target = Transposed(), TransposedTarget()
    mapper = WeightMapper(source, target)
    mapping = mapper.get_mapping_dict()
    renamer = WeightRenamer(source.state_dict())
    # dropping a pair keeps the others' transposes
    del mapping["c_proj.bias"]
    out = renamer.rename_keys(mapping)
    assert torch.equal(out["fc_in.weight"], source.c_fc.weight.T) and "fc_out.bias" not in out
    # a pair set by hand gets the transform its shapes need
    mapping = mapper.get_mapping_dict()
    mapping.pop("c_fc.weight")
    mapping["c_fc.weight"] = "fc_in.weight"
    assert torch.equal(renamer.rename_keys(mapping)["fc_in.weight"], source.c_fc.weight.T)
    # a pair no transform fixes is refused, naming the keys and shapes
    mapping["c_fc.bias"] = "fc_out.bias"
    mapping.pop("c_proj.bias")
    with pytest.raises(PlanError, match=r"'c_fc.bias' \[7\] cannot fill 'fc_out.bias' \[3\]"):
        renamer.rename_keys(mapping)


def test_a_plain_dict_cannot_carry_fused_sources_and_says_what_to_do():
    source = SeparateQKV()
    mapper = WeightMapper(source, FusedQKV())
    plain = dict(mapper.suggest_mapping())
    with pytest.raises(PlanError, match=r"fused sources .*get_plan\(\)"):
        WeightRenamer(source.state_dict()).rename_keys(plain)
    # dropping one of the fused sources from the dict is refused too
    partial = mapper.get_mapping_dict()
    del partial["attn.v_proj.weight"]
    with pytest.raises(PlanError, match="partial concat"):
        WeightRenamer(source.state_dict()).rename_keys(partial)


def test_a_plain_dict_is_checked_against_a_given_target():
    source, target = Transposed(), TransposedTarget()
    plain = {"c_fc.weight": "fc_in.weight", "c_fc.bias": "fc_in.bias"}
    renamer = WeightRenamer(source.state_dict())
    assert renamer.rename_keys(plain)["fc_in.weight"].shape == (4, 7)  # a plain dict only renames ...
    out = renamer.rename_keys(plain, target=target)  # ... unless it is told the target's shapes
    assert torch.equal(out["fc_in.weight"], source.c_fc.weight.T)
    with pytest.raises(PlanError, match="no transpose or reshape"):
        renamer.rename_keys({"c_fc.bias": "fc_out.bias"}, target=target)


def test_save_writes_a_plain_state_dict_unless_asked_to_keep_the_envelope(old_model_pth):
    """Item 6."""
    renamer = WeightRenamer("old_model.pth")
    renamer.rename_keys(WeightMapper.from_checkpoint("old_model.pth", NewModel()).suggest_mapping())
    plain = torch.load(renamer.save("plain.pth"))
    assert set(plain) == set(NewModel().state_dict())
    kept = torch.load(renamer.save("kept.ckpt", keep_envelope=True))
    assert kept["epoch"] == 3 and set(kept["state_dict"]) == set(plain)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_ties_survive_from_checkpoint(tmp_path, suffix):
    """Item 8: a tied embedding/head keeps its tie through from_checkpoint, as from_state_dict."""
    source = Tied()
    path = tmp_path / f"tied{suffix}"
    if suffix == ".safetensors":
        from weight_mapper import save_checkpoint

        save_checkpoint(source.state_dict(), path)
    else:
        torch.save(source.state_dict(), path)
    by_file = WeightMapper.from_checkpoint(path, TiedRenamed())
    by_dict = WeightMapper.from_state_dict(source.state_dict(), TiedRenamed())
    def ties(mapper):
        t = mapper.source_table
        return {frozenset((t.names[r], t.names[int(a)])) for r, a in enumerate(t.alias_of) if a >= 0}

    assert ties(by_file) == ties(by_dict) == {frozenset(("embed.weight", "head.weight"))}
    assert by_file.suggest_mapping() == by_dict.suggest_mapping()
    assert by_file.get_unmatched() == by_dict.get_unmatched() == {"source": [], "target": []}
    aliases = [e for e in by_file.get_plan().entries if e.level == "alias"]
    assert [(e.source, e.target) for e in aliases] == [(("head.weight",), "output.weight")]


# ---------------------------------------------------------------------------- item 4: one score
def _entries_at(mapper, threshold, strategy="best_match"):
    mapper.suggest_mapping(threshold=threshold, strategy=strategy)
    return {(e.source, e.target): e.score for e in mapper.get_plan().entries}


@pytest.mark.parametrize("make", ["ShortcutFirst-ShortcutLast", "NestedLayerScale-FlatLayerScale",
                                  "BatchNormed-BatchNormedRenamed", "Reordered-InOrder", "OldModel-NewModel"])
def test_the_threshold_filters_the_score_shown(make):
    """Item 4: a pair's shown score does not change with the threshold, and a pair shown at
    score s at a low threshold is kept at every threshold up to s."""
    import fixture_models

    source, target = (getattr(fixture_models, n)() for n in make.split("-"))
    mapper = WeightMapper(source, target)
    thresholds = [0.0, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
    runs = {t: _entries_at(mapper, t) for t in thresholds}
    everything = runs[0.0]
    for t, entries in runs.items():
        assert all(score >= t for score in entries.values())  # compared with the score shown
        for pair, score in entries.items():
            assert score == pytest.approx(everything[pair], abs=1e-12)  # same pair, same score
        assert set(entries) == {p for p, s in everything.items() if s >= t}  # raising it only removes


def test_explain_and_the_tables_show_the_compared_score():
    mapper = WeightMapper(OldModel(), NewModel())
    mapper.suggest_mapping(threshold=0.85)
    plan = mapper.get_plan()
    for e in plan.entries:
        assert e.score >= 0.85
        assert mapper.explain(e.source[0])["score"] == pytest.approx(e.score)


# ---------------------------------------------------------------------------- item 5: atomic groups
def test_a_module_group_under_the_threshold_is_left_out_whole():
    from fixture_models import BatchNormedRenamed

    source, target = BatchNormed(), BatchNormedRenamed()
    mapper = WeightMapper(source, target)
    scores = {}
    for s, _, score in mapper.get_mapping_with_scores():
        scores.setdefault(s.rsplit(".", 1)[0], set()).add(round(score, 12))
    assert all(len(v) == 1 for v in scores.values())  # a group's tensors share its score
    levels = sorted({next(iter(v)) for v in scores.values()})
    assert len(levels) > 1
    cut = levels[len(levels) // 2]
    mapping = mapper.suggest_mapping(threshold=cut)
    assert 0 < len(mapping) < len(source.state_dict())
    for module in scores:
        members = [n for n in source.state_dict() if n.rsplit(".", 1)[0] == module]
        assert all(n in mapping for n in members) or not any(n in mapping for n in members)


def test_a_split_module_is_flagged_and_conservative_withholds_it_whole():
    """A BatchNorm whose weight/bias and running statistics land apart: flagged split_group."""
    from weight_mapper.plan import FLAG_DESCRIPTIONS

    source = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8))
    target = {"0.kernel": torch.zeros(8, 3, 3, 3), "1.gamma": torch.zeros(8), "1.beta": torch.zeros(8),
              "1.running_mean": torch.zeros(8), "1.running_var": torch.zeros(8)}
    mapper = WeightMapper(source, target)
    scores = {s: score for s, _, score in mapper.get_mapping_with_scores()}
    assert scores["1.weight"] < scores["1.running_mean"]
    threshold = (max(scores["1.weight"], scores["1.bias"]) + min(scores["1.running_mean"], scores["1.running_var"])) / 2
    mapper.suggest_mapping(threshold=threshold)
    entries = {e.source[0]: e for e in mapper.get_plan().entries}
    assert "1.weight" not in entries and "1.running_mean" in entries
    assert "split_group" in entries["1.running_mean"].flags and "split_group" in FLAG_DESCRIPTIONS
    assert entries["0.weight"].flags == ()  # the whole conv is not flagged
    conservative = mapper.suggest_mapping(threshold=threshold, strategy="conservative")
    assert not any(k.startswith("1.") for k in conservative)
    assert {e.source[0] for e in mapper.get_plan().ambiguous} >= {"1.running_mean", "1.running_var"}


# ---------------------------------------------------------------------------- item 9: rules in sequence
_META2HF = {"embed_tokens": "tok_embeddings", "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
            "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1",
            "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
            "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}


def _meta_name(hf_key: str) -> str:
    if hf_key == "lm_head.weight":
        return "output.weight"
    key = hf_key.removeprefix("model.")
    for hf, meta in _META2HF.items():
        key = key.replace(hf, meta)
    return key


def _first_match(key_mapping: dict[str, str], keys):
    """transformers 4.x ``key_mapping``: the first pattern that replaces anything wins."""
    import re

    out = {}
    for key in keys:
        new = key
        for pattern, replacement in key_mapping.items():
            new, n = re.subn(pattern, replacement, new)
            if n:
                break
        out[key] = new
    return out


def _revise_keys(revise_keys, state_dict):
    """mmengine's ``revise_keys``: every pair, in turn, over every key."""
    import re

    for pattern, replacement in revise_keys:
        state_dict = {re.sub(pattern, replacement, k): v for k, v in state_dict.items()}
    return state_dict


def test_exported_rules_are_exact_under_first_match_and_in_sequence(tmp_path):
    transformers = pytest.importorskip("transformers")
    from weight_mapper.rules import check_rules, rules_to_key_mapping, rules_to_revise_keys

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=6,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(config)
    meta_sd = {_meta_name(k): v.clone() for k, v in hf.state_dict().items()}
    truth = {_meta_name(k): k for k in hf.state_dict()}
    assert len(truth) == 57
    mapper = WeightMapper(meta_sd, hf)
    mapping = mapper.suggest_mapping()
    assert dict(mapping) == truth
    rules = mapper.export_rules()
    assert rules and all(r.pattern != "^" for r in rules)  # no root rule that fires again on every key
    assert check_rules(rules, truth) == [] and check_rules(rules, truth, chained=True) == []
    # transformers-style first match and mmengine-style sequential application, reimplemented
    renamed = _first_match(rules_to_key_mapping(rules, truth), meta_sd)
    assert renamed == truth
    revised = _revise_keys(rules_to_revise_keys(rules, truth), meta_sd)
    assert set(revised) == set(hf.state_dict())
    hf.load_state_dict(revised, strict=True)
    assert all(torch.equal(hf.state_dict()[truth[k]], v) for k, v in meta_sd.items())
    single = mapper.export_rules(max_groups=1)
    assert _revise_keys(rules_to_key_mapping(single, truth, transformers5=True).items(), meta_sd).keys() == \
        hf.state_dict().keys()


def test_a_form_that_would_be_wrong_is_refused():
    from weight_mapper import MappingError
    from weight_mapper.rules import RenameRule, infer_rules, rules_to_key_mapping, rules_to_revise_keys

    swap = {**{f"a.{i}.w": f"b.{i}.w" for i in range(3)}, **{f"b.{i}.w": f"a.{i}.w" for i in range(3)}}
    rules = infer_rules(swap)
    assert _first_match(rules_to_key_mapping(rules, swap), swap) == swap  # first match: exact
    with pytest.raises(MappingError, match="refusing to write revise_keys: .*'a.0.w'"):
        rules_to_revise_keys(rules, swap)  # in sequence a swap cannot be written
    with pytest.raises(MappingError, match="refusing to write key_mapping for transformers 5"):
        rules_to_key_mapping(rules, swap, transformers5=True)
    with pytest.raises(MappingError, match="refusing to write key_mapping: "):
        rules_to_key_mapping([RenameRule(r"^a\.", "c.")], swap)


def test_cli_rules_writes_only_the_forms_that_are_exact(tmp_path, capsys):
    from weight_mapper.cli import _write_rules
    from weight_mapper.plan import PlanEntry

    from weight_mapper.rules import rule_forms

    swap = {**{f"a.{i}.w": f"b.{i}.w" for i in range(3)}, **{f"b.{i}.w": f"a.{i}.w" for i in range(3)}}
    plan = MappingPlan(tuple(PlanEntry((s,), t, None, 1.0, 1.0, "tensor", (2,), (2,)) for s, t in swap.items()))
    assert set(rule_forms(plan).refused) == {"revise_keys", "key_mapping_transformers5"}  # the library says why
    data = json.loads(_write_rules(plan, tmp_path / "rules.json").read_text())
    assert data["key_mapping"] and data["revise_keys"] is None and data["key_mapping_transformers5"] is None
    assert "revise_keys" in data["refused"] and "revise_keys not written" in capsys.readouterr().err


# ---------------------------------------------------------------------------- item 10: smaller things
def test_demo_workdir_is_created(tmp_path, capsys):
    from weight_mapper.cli import main

    folder = tmp_path / "new" / "demo_files"
    assert main(["demo", "--workdir", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["new_model.safetensors", "old_model.pth"]
    (tmp_path / "a_file").write_text("")
    assert main(["demo", "--workdir", str(tmp_path / "a_file")]) == 1
    assert "is a file" in capsys.readouterr().err


def test_sharded_output_folders_follow_the_umask(tmp_path):
    import os

    renamer = WeightRenamer(OldModel().state_dict())
    renamer.rename_keys(WeightMapper(OldModel(), NewModel()).suggest_mapping())
    old = os.umask(0o022)
    try:
        out = renamer.save(tmp_path / "sharded")
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o755
    assert all((p.stat().st_mode & 0o777) == 0o644 for p in out.iterdir())


def test_a_factory_that_needs_arguments_gets_one_clear_error(tmp_path, monkeypatch, capsys):
    import warnings

    from weight_mapper import MappingError
    from weight_mapper.cli import _build_model

    calls = []
    module = type(sys)("needs_args_factories")

    def make(num_classes):
        calls.append(num_classes)
        return nn.Linear(2, num_classes)

    module.make = make
    monkeypatch.setitem(sys.modules, "needs_args_factories", module)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no misleading meta-device warning
        with pytest.raises(MappingError, match=r"needs arguments \(num_classes\) but is called with none"):
            _build_model("needs_args_factories:make")
    assert calls == []  # never called, let alone twice


def test_a_class_pickled_from_the_current_folder_loads_under_trust_pickle(tmp_path, monkeypatch, capsys):
    from weight_mapper.cli import main

    (tmp_path / "my_config.py").write_text("class Config:\n    def __init__(self):\n        self.width = 3\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_config

    torch.save({"state_dict": OldModel().state_dict(), "config": my_config.Config()}, tmp_path / "pickled.pt")
    monkeypatch.delitem(sys.modules, "my_config")
    # as the console script runs: neither "" nor the current folder on sys.path
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path), os.getcwd())])
    assert main(["inspect", "pickled.pt", "--trust-pickle", "--json"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["n_tensors"] == 8


def test_an_input_failure_is_reported_as_the_input(tmp_path, monkeypatch, capsys):
    from weight_mapper.cli import main

    module = type(sys)("guide_inputs")
    module.old_model, module.new_model = OldModel, NewModel

    def broken():
        raise ValueError("no data here")

    module.broken = broken
    module.wrong_shape = lambda: torch.randn(2, 5)
    monkeypatch.setitem(sys.modules, "guide_inputs", module)
    torch.save(OldModel().state_dict(), tmp_path / "old.pt")
    plan = WeightMapper(OldModel(), NewModel()).get_plan()
    plan.to_json(tmp_path / "plan.json")
    common = ["apply", str(tmp_path / "old.pt"), str(tmp_path / "plan.json"), "--validate", "guide_inputs:new_model",
              "--verify", "guide_inputs:old_model"]
    assert main([*common, "-o", str(tmp_path / "a.safetensors"), "--input", "guide_inputs:broken"]) == 1
    err = capsys.readouterr().err
    assert "--input 'guide_inputs:broken' raised ValueError: no data here" in err and "dummy_input" not in err
    assert main([*common, "-o", str(tmp_path / "b.safetensors"), "--input", "guide_inputs:wrong_shape"]) == 1
    err = capsys.readouterr().err
    assert "--input guide_inputs:wrong_shape()" in err and "dummy_input" not in err
    assert main([*common, "-o", str(tmp_path / "c.safetensors"), "--input", "guide_inputs:nothing"]) == 1
    assert "--input factory 'guide_inputs:nothing'" in capsys.readouterr().err


def test_at_80_columns_the_analysis_wraps_names_so_a_swap_shows():
    import io

    from rich.console import Console

    class Swapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.feature_extractor_stage = nn.ModuleDict({
                "attention_projection_query": nn.Linear(4, 4), "attention_projection_value": nn.Linear(4, 4)})

    mapper = WeightMapper(Swapped(), Swapped())
    plan = mapper.get_plan()
    swapped = [(e.source[0], e.target) for e in plan.entries]
    console = Console(width=80, file=io.StringIO(), color_system=None, record=True)
    mapper.print_analysis(console=console)
    text = console.export_text()
    assert "…" not in text
    cells = _column_cells(text)
    for source, target in swapped:
        assert (source, target) in cells


def _column_cells(text: str) -> set[tuple[str, str]]:
    """(source, target) of every row of the analysis' match tables, whose cells may wrap onto
    several lines: columns are cut where the header line puts them."""
    rows: set[tuple[str, str]] = set()
    lines = text.splitlines()
    for h, header in enumerate(lines):
        if not (header.strip().startswith("source") and " target " in header and " score " in header):
            continue
        at_target, at_score, at_shape = header.index(" target ") + 1, header.index(" score "), header.index(" shape ")
        current = None
        for line in lines[h + 2:]:  # after the rule under the header
            if not line.strip() or line.strip().startswith(("─", "╭", "Withheld", "Unmatched")):
                break
            source, target = line[:at_target].strip(), line[at_target:at_score].strip()
            if line[at_score:at_shape].strip():  # a score starts a row
                if current:
                    rows.add(current)
                current = (source, target)
            elif current:
                current = (current[0] + source, current[1] + target)
        if current:
            rows.add(current)
    return rows



def test_a_square_transposed_pair_moved_by_hand_keeps_its_transpose():
    """Shapes cannot show that a square Conv1D weight needs a transpose; its matched entry can."""
    from fixture_models import Conv1D

    class Square(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Conv1D(4, 4), Conv1D(4, 4)

    class SquareLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    source = Square()
    mapper = WeightMapper(source, SquareLinear())
    mapping = mapper.get_mapping_dict()
    assert {e.target: e.transform for e in mapper.get_plan().entries}["a.weight"] == "transpose"
    mapping["a.weight"], mapping["b.weight"] = "b.weight", "a.weight"  # swapped by hand
    out = WeightRenamer(source.state_dict()).rename_keys(mapping)
    assert torch.equal(out["b.weight"], source.a.weight.T) and torch.equal(out["a.weight"], source.b.weight.T)
