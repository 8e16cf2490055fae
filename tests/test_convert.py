"""weight_mapper.convert: the library side of ``weight-mapper apply``."""

import pytest
import torch

from fixture_models import BatchNormed, NewModel, OldModel
from weight_mapper import WeightMapper, WeightRenamer, save_checkpoint
from weight_mapper.convert import convert_checkpoint
from weight_mapper.errors import ConversionError


@pytest.fixture
def converted_inputs(tmp_path):
    torch.manual_seed(0)
    old, new = OldModel(), NewModel()
    path = save_checkpoint(old.state_dict(), tmp_path / "old.pt")
    mapper = WeightMapper(old, new)
    mapper.suggest_mapping()
    return path, mapper.get_plan(), old, new


def test_convert_validates_saves_and_reports(converted_inputs, tmp_path):
    path, plan, old, new = converted_inputs
    calls = []
    result = convert_checkpoint(WeightRenamer(path), plan, tmp_path / "new.safetensors", target_model=new,
                                strict=True, progress=lambda done, total: calls.append((done, total)))
    assert result.validation.ok and result.format == "safetensors" and result.n_tensors == len(new.state_dict())
    assert calls[-1] == (len(calls), len(calls)) == (len(old.state_dict()),) * 2
    data = result.to_dict()
    assert data["output"] == str(tmp_path / "new.safetensors") and data["validation"]["ok"]
    assert data["verification"] is None and data["n_unmatched_source"] == 0


def test_a_strict_failure_writes_nothing(converted_inputs, tmp_path):
    path, plan, _, _ = converted_inputs
    out = tmp_path / "never.pt"
    with pytest.raises(ConversionError, match="Nothing was written to") as caught:
        convert_checkpoint(WeightRenamer(path), plan, out, target_model=BatchNormed(), strict=True)
    assert caught.value.option == "strict" and "--strict" not in str(caught.value) and not out.exists()
