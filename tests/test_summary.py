"""weight_mapper.summary: what ``inspect`` shows, as data."""

import pytest
import torch

from fixture_models import Tied
from weight_mapper.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from weight_mapper.summary import summarize_checkpoint


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_tied_weights_count_once(tmp_path, suffix):
    model = Tied()
    path = save_checkpoint(model.state_dict(), tmp_path / f"tied{suffix}")
    summary = summarize_checkpoint(load_checkpoint(path), depth=1)
    n_unique = sum(p.numel() for p in model.parameters())  # parameters() yields a tied one once
    assert summary.n_tied == 1 and summary.n_tensors == len(model.state_dict())
    assert summary.n_parameters == n_unique and summary.n_bytes == 4 * n_unique
    assert summary.format == ("torch" if suffix == ".pt" else "safetensors")
    data = summary.to_dict()
    assert data["path"] == str(path) and data["modules"][0] == summary.modules[0].to_dict()


def test_the_depth_counts_below_a_wrapper_prefix():
    state = {f"module.{m}.{i}.weight": torch.ones(2, 2) for m in ("a", "b") for i in range(2)}
    summary = summarize_checkpoint(Checkpoint.from_state_dict(state), depth=1)
    assert summary.wrapper_prefix == "module." and summary.path == "<state dict>"
    assert [(r.path, r.n_tensors, r.n_parameters) for r in summary.modules] == [
        ("module", 4, 16), ("module.a", 2, 8), ("module.b", 2, 8)]
