import pytest
import torch

from fixture_models import Tied, TiedRenamed, Transposed, TransposedTarget
from weight_mapper import MappingPlan, PlanEntry, PlanError, WeightMapper, apply_plan


def test_plan_json_round_trip(tmp_path):
    mapper = WeightMapper(Transposed(), TransposedTarget())
    mapper.suggest_mapping()
    plan = mapper.get_plan()
    path = tmp_path / "plan.json"
    plan.to_json(path)
    again = MappingPlan.from_json(path)
    assert again.mapping == plan.mapping
    assert [e.transform for e in again.entries] == [e.transform for e in plan.entries]
    assert again.to_dict() == plan.to_dict()


def test_plan_apply_inverse_is_identity():
    src = Transposed()
    mapper = WeightMapper(src, TransposedTarget())
    mapper.suggest_mapping()
    plan = mapper.get_plan()
    there = apply_plan(plan, src.state_dict())
    back = apply_plan(plan.inverse(), there)
    assert back.keys() == src.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in src.state_dict().items())


def test_inverse_of_a_tied_plan():
    src = Tied()
    mapper = WeightMapper(src, TiedRenamed())
    mapper.suggest_mapping()
    back = apply_plan(mapper.get_plan().inverse(), apply_plan(mapper.get_plan(), src.state_dict()))
    assert all(torch.equal(back[k], v) for k, v in src.state_dict().items())


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{", "not valid JSON"),
        ('{"entries": []}', "not a weight_mapper plan"),
        ('{"format": "weight_mapper.plan", "version": 99, "entries": []}', "newer than"),
        ('{"format": "weight_mapper.plan", "entries": [{"target": "x"}]}', "malformed plan entry"),
    ],
)
def test_bad_plans_are_rejected(text, match):
    with pytest.raises(PlanError, match=match):
        MappingPlan.from_json(text)


def test_missing_plan_file(tmp_path):
    with pytest.raises(PlanError, match="No such plan file"):
        MappingPlan.from_json(tmp_path / "nope.json")


def test_unknown_transform_is_rejected():
    plan = MappingPlan((PlanEntry(("a",), "b", "rotate", 1.0, 1.0, "tensor", (2,), (2,)),))
    with pytest.raises(PlanError, match="unknown transform 'rotate'"):
        apply_plan(plan, {"a": torch.zeros(2)})


def test_a_binary_file_is_not_a_plan(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(PlanError, match="model.pt could not be read as text"):
        MappingPlan.from_json(path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"entries": []}')
    with pytest.raises(PlanError, match="plan file .*bad.json: not a weight_mapper plan"):
        MappingPlan.from_json(bad)
