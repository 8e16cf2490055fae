"""WeightMapper end to end on tiny models, one problem each."""

import json

import pytest
import torch
from torch import nn

from fixture_models import (
    BatchNormed,
    BatchNormedRenamed,
    EncoderDecoder,
    InOrder,
    NewModel,
    OldModel,
    PartiallyCompatible,
    Reordered,
    Tied,
    TiedRenamed,
    Transposed,
    TransposedTarget,
)
from weight_mapper import MappingError, WeightMapper, WeightRenamer, apply_plan

REFERENCE_TRUTH = {
    "backbone.0.weight": "feature_extractor.0.weight",
    "backbone.0.bias": "feature_extractor.0.bias",
    "backbone.2.weight": "feature_extractor.2.weight",
    "backbone.2.bias": "feature_extractor.2.bias",
    "classifier.0.weight": "head.0.weight",
    "classifier.0.bias": "head.0.bias",
    "classifier.2.weight": "head.2.weight",
    "classifier.2.bias": "head.2.bias",
}


def convert(mapper: WeightMapper, source: nn.Module, target: nn.Module) -> nn.Module:
    converted = apply_plan(mapper.get_plan(), source.state_dict())
    target.load_state_dict(converted, strict=True)
    return target


@pytest.mark.parametrize("strategy", ["best_match", "conservative", "greedy", "shape_only"])
def test_reference_example_maps_8_of_8(strategy):
    mapper = WeightMapper(OldModel(), NewModel())
    assert mapper.suggest_mapping(strategy=strategy) == REFERENCE_TRUTH


def test_reference_example_converts_with_identical_outputs():
    old, new = OldModel().eval(), NewModel().eval()
    mapper = WeightMapper(old, new)
    mapper.suggest_mapping()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(convert(mapper, old, new)(x), old(x))


def test_batchnorm_buffers_travel_with_their_layer():
    old, new = BatchNormed(), BatchNormedRenamed()
    with torch.no_grad():  # non-trivial running stats
        for bn in (old.bn1, old.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.num_batches_tracked.fill_(7)
    mapper = WeightMapper(old, new)
    mapping = mapper.suggest_mapping()
    assert mapping["bn1.running_mean"] == "stem.norm.running_mean"
    assert mapping["bn2.running_var"] == "block.norm.running_var"
    assert mapping["bn2.num_batches_tracked"] == "block.norm.num_batches_tracked"
    assert mapper.get_unmatched() == {"source": [], "target": []}
    old.eval()
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(convert(mapper, old, new.eval())(x), old(x))


def test_tied_weights_are_matched_together_and_filled_once():
    old, new = Tied(), TiedRenamed()
    mapper = WeightMapper(old, new)
    mapping = mapper.suggest_mapping()
    assert mapping["embed.weight"] == "tok_embeddings.weight"
    assert mapping["head.weight"] == "output.weight"
    plan = mapper.get_plan()
    assert {e.level for e in plan.entries if e.target == "output.weight"} == {"alias"}
    converted = apply_plan(plan, old.state_dict())
    shared = converted["output.weight"].untyped_storage().data_ptr()
    assert shared == converted["tok_embeddings.weight"].untyped_storage().data_ptr()
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(convert(mapper, old, new)(ids), old(ids))


def test_partially_compatible_group_falls_back_to_tensors():
    mapper = WeightMapper(OldModel(), PartiallyCompatible())
    mapping = mapper.suggest_mapping()
    assert mapping["backbone.0.weight"] == "backbone.0.weight"
    levels = {e.target: e.level for e in mapper.get_plan().entries}
    assert levels["backbone.0.weight"] == "tensor"
    assert levels["classifier.2.weight"] == "group"
    unmatched = mapper.get_unmatched()
    assert unmatched["source"] == ["backbone.0.bias"]
    assert unmatched["target"] == ["extra.weight", "extra.bias"]


def test_transposed_weights_get_a_transpose_transform():
    old, new = Transposed(), TransposedTarget()
    mapper = WeightMapper(old, new)
    mapping = mapper.suggest_mapping()
    assert mapping == {
        "c_fc.weight": "fc_in.weight",
        "c_fc.bias": "fc_in.bias",
        "c_proj.weight": "fc_out.weight",
        "c_proj.bias": "fc_out.bias",
    }
    transforms = {e.target: e.transform for e in mapper.get_plan().entries}
    assert transforms["fc_in.weight"] == "transpose"
    assert transforms["fc_in.bias"] is None
    x = torch.randn(3, 4)
    assert torch.allclose(convert(mapper, old, new)(x), old(x))


def test_execution_order_resolves_reordered_definitions():
    old, new = Reordered(), InOrder()
    x = torch.randn(2, 6)
    mapper = WeightMapper(old, new, dummy_input=x)
    mapping = mapper.suggest_mapping()
    assert mapping["first.weight"] == "layers.0.weight"
    assert mapping["second.weight"] == "layers.1.weight"
    assert mapping["third.weight"] == "layers.2.weight"
    assert torch.equal(convert(mapper, old, new)(x), old(x))


def test_failing_dummy_input_warns_and_continues():
    with pytest.warns(UserWarning, match="forward pass of OldModel"):
        mapper = WeightMapper(OldModel(), NewModel(), dummy_input=torch.randn(2, 5))
    assert mapper.suggest_mapping() == REFERENCE_TRUTH


def test_dummy_input_does_not_touch_batchnorm_statistics_or_mode():
    old = BatchNormed().train()
    before = {k: v.clone() for k, v in old.state_dict().items()}
    WeightMapper(old, BatchNormedRenamed(), dummy_input=torch.randn(2, 3, 6, 6))
    assert old.training
    assert all(torch.equal(before[k], v) for k, v in old.state_dict().items())


def test_never_pairs_incompatible_shapes():
    src = {"a.weight": torch.zeros(3, 5)}
    tgt = nn.Conv2d(1, 2, 1)  # weight (2, 1, 1, 1), bias (2,)
    mapper = WeightMapper(src, tgt)
    for strategy in ("best_match", "greedy", "shape_only", "conservative"):
        assert mapper.suggest_mapping(threshold=0.0, strategy=strategy) == {}


def test_incompatible_pairs_forbid_rather_than_penalise():
    src, tgt = EncoderDecoder(), EncoderDecoder()
    free = WeightMapper(src, tgt, incompatible_pairs=None).suggest_mapping()
    assert free["encoder.weight"] == "encoder.weight"
    swapped = {"decoder.weight": torch.zeros(5, 5), "decoder.bias": torch.zeros(5)}
    mapper = WeightMapper(swapped, {"encoder.weight": torch.zeros(5, 5)}, incompatible_pairs=[("encoder", "decoder")])
    assert mapper.suggest_mapping(threshold=0.0) == {}
    assert WeightMapper(swapped, {"encoder.weight": torch.zeros(5, 5)}, incompatible_pairs=[]).suggest_mapping(
        threshold=0.0
    ) == {"decoder.weight": "encoder.weight"}


def test_incompatible_pairs_split_names_into_chunks():
    src = {"yolo_backbone.conv.weight": torch.zeros(4, 4)}
    tgt = {"resnet.backbone.conv.weight": torch.zeros(4, 4)}
    rule = [("yolo_backbone", "resnet")]
    assert WeightMapper(src, tgt, incompatible_pairs=rule).suggest_mapping(threshold=0.0) == {}


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ({"shape": 0.5, "nam": 0.5}, "unknown score component"),
        ({"shape": -1}, "finite number >= 0"),
        ({"shape": float("nan")}, "finite number >= 0"),
        ({"shape": 0, "name": 0}, "must not all be zero"),
        ([0.5, 0.5], "must be a dict"),
    ],
)
def test_bad_weights_are_rejected_clearly(weights, match):
    with pytest.raises(MappingError, match=match):
        WeightMapper(OldModel(), NewModel()).suggest_mapping(weights=weights)


def test_custom_weights_are_used_and_recorded():
    mapper = WeightMapper(OldModel(), NewModel())
    assert mapper.suggest_mapping(weights={"shape": 1, "name": 1, "hierarchy": 0}) == REFERENCE_TRUTH
    assert mapper.get_plan().weights == {"shape": 0.5, "name": 0.5, "hierarchy": 0.0}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strategy": "best"}, "unknown strategy"),
        ({"threshold": 1.5}, "threshold must be"),
        ({"max_rounds": 0}, "max_rounds"),
    ],
)
def test_bad_options_are_rejected_clearly(kwargs, match):
    with pytest.raises(MappingError, match=match):
        WeightMapper(OldModel(), NewModel()).suggest_mapping(**kwargs)


def test_bad_constructor_arguments():
    with pytest.raises(MappingError, match="shape_tolerance"):
        WeightMapper(OldModel(), NewModel(), shape_tolerance=-0.1)
    with pytest.raises(MappingError, match="incompatible_pairs entry"):
        WeightMapper(OldModel(), NewModel(), incompatible_pairs=[("encoder",)])
    with pytest.raises(MappingError, match="must be an nn.Module"):
        WeightMapper("old.pth", NewModel())
    with pytest.raises(MappingError, match="no parameters"):
        WeightMapper(nn.ReLU(), NewModel())


def test_shape_tolerance_admits_near_shapes_only_when_asked():
    src = {"fc.weight": torch.zeros(10, 8)}
    tgt = {"fc.weight": torch.zeros(11, 8)}
    assert WeightMapper(src, tgt).suggest_mapping(threshold=0.0) == {}
    assert WeightMapper(src, tgt, shape_tolerance=0.2).suggest_mapping(threshold=0.0) == {"fc.weight": "fc.weight"}


def test_conservative_withholds_ambiguous_matches():
    # Two identical layers and no name, order or execution signal between the candidates.
    src = {"a.weight": torch.zeros(4, 4), "b.weight": torch.zeros(4, 4)}
    tgt = {"x.weight": torch.zeros(4, 4), "y.weight": torch.zeros(4, 4)}
    mapper = WeightMapper(src, tgt)
    mapper.suggest_mapping(threshold=0.0, weights={"shape": 1.0})
    assert all(e.ambiguous for e in mapper.get_plan().entries)
    assert mapper.suggest_mapping(strategy="conservative", weights={"shape": 1.0}) == {}
    assert len(mapper.get_plan().ambiguous) == 2


def test_from_state_dict_unwraps_envelopes_and_prefixes():
    old, new = OldModel(), NewModel()
    wrapped = {"state_dict": {f"module.{k}": v for k, v in old.state_dict().items()}, "epoch": 3}
    mapper = WeightMapper.from_state_dict(wrapped, new)
    mapping = mapper.suggest_mapping()
    assert mapping == {f"module.{k}": v for k, v in REFERENCE_TRUTH.items()}
    assert mapper.get_plan().source_prefix == "module."


def test_from_checkpoint_reads_the_file(tmp_path):
    old, new = OldModel(), NewModel()
    path = tmp_path / "old.pth"
    torch.save(old.state_dict(), path)
    mapper = WeightMapper.from_checkpoint(path, new)
    assert mapper.suggest_mapping() == REFERENCE_TRUTH


def test_meta_device_models_match_without_data():
    with torch.device("meta"):
        old, new = OldModel(), NewModel()
    assert WeightMapper(old, new).suggest_mapping() == REFERENCE_TRUTH


def test_getters_and_reports(tmp_path):
    mapper = WeightMapper(OldModel(), PartiallyCompatible())
    mapping = mapper.suggest_mapping()
    assert mapper.get_mapping_dict() == mapping
    scored = mapper.get_mapping_with_scores()
    assert {s for s, _, _ in scored} == set(mapping)
    assert all(t == mapping[s] and 0.6 <= score <= 1.0 for s, t, score in scored)
    path = mapper.export_mapping_report(tmp_path / "report.json")
    report = json.loads(path.read_text())
    assert report["summary"]["n_matched"] == len(mapping)
    assert report["summary"]["n_unmatched_target"] == 2
    assert report["strategy"] == "best_match" and report["threshold"] == 0.6
    assert {e["target"] for e in report["entries"]} == set(mapping.values())


def test_renamer_round_trip_through_a_file(tmp_path):
    old, new = OldModel(), NewModel()
    src = tmp_path / "old.pt"
    torch.save({"model": old.state_dict(), "step": 10}, src)
    mapper = WeightMapper.from_checkpoint(src, new)
    mapper.suggest_mapping()
    renamer = WeightRenamer(src)
    renamer.rename_keys(mapper.get_plan())
    assert renamer.validate(new).ok
    out = renamer.save(tmp_path / "new.safetensors")
    from safetensors.torch import load_file

    new.load_state_dict(load_file(out))
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(new.eval()(x), old.eval()(x))


def test_explain_gives_scores_and_alternatives():
    mapper = WeightMapper(OldModel(), PartiallyCompatible())
    mapper.suggest_mapping()
    why = mapper.explain("classifier.2.weight")
    assert why["target"] == "classifier.2.weight" and why["level"] == "group"
    assert set(why["components"]) == {"shape", "name", "hierarchy", "context"}
    assert {"tokens", "edit", "lcs", "index", "leaf", "depth", "order"} <= set(why["sub_scores"])
    scores = {s: score for s, _, score in mapper.get_mapping_with_scores()}
    assert why["score"] == pytest.approx(scores["classifier.2.weight"])
    assert all(a["score"] <= why["score"] for a in why["alternatives"])
    lost = mapper.explain("backbone.0.bias")
    assert lost["target"] is None and lost["score"] is None
    with pytest.raises(MappingError, match="not a source tensor"):
        mapper.explain("nope.weight")


def test_explain_lists_the_runner_up_of_an_ambiguous_match():
    src = {"a.weight": torch.zeros(4, 4), "b.weight": torch.zeros(4, 4)}
    tgt = {"x.weight": torch.zeros(4, 4), "y.weight": torch.zeros(4, 4)}
    mapper = WeightMapper(src, tgt)
    mapper.suggest_mapping(threshold=0.0, weights={"shape": 1.0})
    why = mapper.explain("a.weight")
    assert len(why["alternatives"]) == 1
    assert why["alternatives"][0]["score"] == pytest.approx(why["score"])
