import json

import pytest
import torch
from safetensors.torch import save_file

from fixture_models import BatchNormed, BatchNormedRenamed
import weight_mapper.renamer as renamer_module
from weight_mapper import CheckpointError, ConversionError, PlanError, WeightMapper, WeightRenamer, load_checkpoint


def write_sharded(model, folder, n_shards=3):
    """A Hugging Face style sharded safetensors checkpoint of ``model``."""
    folder.mkdir()
    items = list(model.state_dict().items())
    per = -(-len(items) // n_shards)
    weight_map = {}
    for i in range(n_shards):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        chunk = dict(items[i * per:(i + 1) * per])
        save_file({k: v.contiguous() for k, v in chunk.items()}, folder / name)
        weight_map.update({k: name for k in chunk})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def renamed_shards(old, new, folder):
    """``(folder, renamer)``: ``old`` written as shards, renamed by the plan mapping ``old`` onto
    ``new`` (the mapping from the models, the conversion from the files)."""
    src = write_sharded(old, folder)
    mapper = WeightMapper(old, new)
    mapper.suggest_mapping()
    renamer = WeightRenamer(src)
    renamer.rename_keys(mapper.get_plan())
    return src, renamer


@pytest.fixture
def trained_pair():
    old, new = BatchNormed(), BatchNormedRenamed()
    with torch.no_grad():
        old.train()(torch.randn(8, 3, 6, 6))
    return old.eval(), new.eval()


def test_sharded_checkpoint_converts_shard_by_shard(tmp_path, trained_pair):
    old, new = trained_pair
    _, renamer = renamed_shards(old, new, tmp_path / "src")
    assert renamer.validate(new).ok
    calls = []
    out = renamer.save(tmp_path / "converted", progress=lambda done, total: calls.append((done, total)))
    n_sources = len({name for e in renamer.plan.entries for name in e.source})
    assert calls == [(i, n_sources) for i in range(1, n_sources + 1)]  # one call per tensor read, each read once
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) == 3
    converted = load_checkpoint(out)
    new.load_state_dict(dict(converted.tensors.items()), strict=True)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(new(x), old(x))


def test_interrupted_sharded_save_leaves_nothing(tmp_path, trained_pair, monkeypatch):
    old, new = trained_pair
    _, renamer = renamed_shards(old, new, tmp_path / "src")
    real_save, calls = renamer_module.save_checkpoint, []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    monkeypatch.setattr(renamer_module, "save_checkpoint", failing_save)
    with pytest.raises(KeyboardInterrupt):
        renamer.save(tmp_path / "converted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_existing_output_folder_and_source_are_refused(tmp_path, trained_pair):
    old, new = trained_pair
    src, renamer = renamed_shards(old, new, tmp_path / "src")
    (tmp_path / "taken").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        renamer.save(tmp_path / "taken")
    with pytest.raises(CheckpointError, match="(?i)refusing to overwrite the source"):
        renamer.save(src)


def test_dict_mapping_keep_unmapped_and_errors():
    renamer = WeightRenamer({"a": torch.ones(2), "b": torch.zeros(3)})
    with pytest.raises(ConversionError, match="call rename_keys"):
        renamer.save("x.pt")
    assert list(renamer.rename_keys({"a": "x"})) == ["x"]
    assert sorted(renamer.rename_keys({"a": "x"}, keep_unmapped=True)) == ["b", "x"]
    with pytest.raises(PlanError, match="both mapped to 'x'"):
        renamer.rename_keys({"a": "x", "b": "x"})
    with pytest.raises(PlanError, match="has no tensor 'zz'"):
        renamer.rename_keys({"zz": "x"})
    with pytest.raises(PlanError, match="collides"):
        renamer.rename_keys({"a": "b"}, keep_unmapped=True)


def test_lightning_envelope_is_written_back(tmp_path):
    src = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"model.w": torch.ones(2)}, "epoch": 4, "hyper_parameters": {"lr": 0.1}}, src)
    before = src.read_bytes()
    renamer = WeightRenamer(src)
    renamer.rename_keys({"model.w": "w"})
    out = renamer.save(tmp_path / "new.ckpt", keep_envelope=True)
    saved = torch.load(out, weights_only=True)
    assert saved["epoch"] == 4 and saved["hyper_parameters"] == {"lr": 0.1}
    assert list(saved["state_dict"]) == ["w"]
    assert src.read_bytes() == before
    with pytest.raises(CheckpointError, match="(?i)refusing to overwrite"):
        renamer.save(src)
