import pytest
import torch

from fixture_models import NewModel, OldModel
from weight_mapper import ConversionError, MappingPlan, PlanEntry, PlanError, apply_plan, validate_state_dict
from weight_mapper.apply import ConvertedTensors


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


class _CountingPlanEntries(tuple):
    """A plan's entries that count how often they are walked."""

    walks = 0

    def __iter__(self):
        type(self).walks += 1
        return super().__iter__()


class _CountingTensors(dict):
    """A state dict that records which tensors are read."""

    def __init__(self, *args):
        super().__init__(*args)
        self.read = []

    def __getitem__(self, key):
        self.read.append(key)
        return super().__getitem__(key)


def _wide_plan(n: int) -> MappingPlan:
    copies = tuple(PlanEntry((f"s{i}",), f"t{i}", None, 1.0, 1.0, "tensor", (2,), (2,)) for i in range(n))
    cat = PlanEntry(("s0", "s1"), "qkv", "concat", 1.0, 1.0, "combined", (2,), (4,), args={"dim": 0, "sizes": [2, 2]})
    return MappingPlan(_CountingPlanEntries((*copies, cat)))


def test_converted_read_runs_its_own_entry_only():
    tensors = _CountingTensors({f"s{i}": torch.full((2,), float(i)) for i in range(50)})
    converted = ConvertedTensors(_wide_plan(50), tensors)
    _CountingPlanEntries.walks = 0
    assert torch.equal(converted["t7"], torch.full((2,), 7.0))
    assert torch.equal(converted["qkv"], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    assert "t49" in converted and "s1" not in converted
    assert tensors.read == ["s7", "s0", "s1"]  # the sources that feed them, nothing else
    assert _CountingPlanEntries.walks == 0  # the key index is built once, not per read
    with pytest.raises(KeyError):
        converted["nope"]
    assert len(dict(converted)) == 51 and _CountingPlanEntries.walks == 0
