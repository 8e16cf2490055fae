import pytest
import torch

from fixture_models import NewModel, OldModel
from weight_mapper import ConversionError, MappingPlan, PlanEntry, PlanError, apply_plan, validate_state_dict


def test_missing_source_key_names_it():
    plan = MappingPlan((PlanEntry(("a",), "b", None, 1.0, 1.0, "tensor", (2,), (2,)),))
    with pytest.raises(PlanError, match="old.pt has no tensor 'a'"):
        apply_plan(plan, {"z": torch.zeros(2)}, source="old.pt")


def test_wrong_shape_is_caught():
    plan = MappingPlan((PlanEntry(("a",), "b", None, 1.0, 1.0, "tensor", (2,), (2,)),))
    with pytest.raises(PlanError, match="expects \\[2\\] for 'b'"):
        apply_plan(plan, {"a": torch.zeros(3)})


def test_validation_words_like_load_state_dict():
    model = NewModel()
    sd = dict(model.state_dict())
    sd.pop("head.0.bias")
    sd["extra"] = torch.zeros(1)
    sd["head.2.weight"] = torch.zeros(3, 3)
    report = validate_state_dict(sd, model)
    missing, unexpected = report
    assert missing == ["head.0.bias"] and unexpected == ["extra"]
    text = report.message("NewModel")
    assert 'Missing key(s) in state_dict: "head.0.bias"' in text
    assert "size mismatch for head.2.weight: copying a param with shape torch.Size([3, 3])" in text
    with pytest.raises(ConversionError, match="Error\\(s\\) in loading state_dict for NewModel"):
        validate_state_dict(sd, model, strict=True)
    assert validate_state_dict(OldModel().state_dict(), OldModel()).ok
