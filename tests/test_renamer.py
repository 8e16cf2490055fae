import json
import os

import pytest
import torch
from safetensors.torch import save_file

from fixture_models import BatchNormed, BatchNormedRenamed
import weight_mapper.renamer as renamer_module
from weight_mapper import (CheckpointError, ConversionError, MappingPlan, PlanEntry, PlanError, WeightMapper, WeightRenamer,
                           load_checkpoint)


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


def _mapped_shards(folder) -> set[str]:
    """Names of the files in ``folder`` this process has memory-mapped now."""
    root = str(folder.resolve())
    with open("/proc/self/maps") as f:
        return {line.split()[-1].rsplit("/", 1)[-1] for line in f if line.rstrip().endswith(".safetensors")
                and line.split()[-1].startswith(root)}


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="counts memory maps through /proc (Linux)")
def test_sharded_save_lets_go_of_each_source_shard_once_its_outputs_are_written(tmp_path, monkeypatch):
    shards = {f"model-{i:05d}-of-00003.safetensors": {f"l{i}.w": torch.full((4, 4), float(i)),
                                                      f"l{i}.b": torch.full((4,), float(i))} for i in range(1, 4)}
    src = tmp_path / "src"
    src.mkdir()
    for name, tensors in shards.items():
        save_file(tensors, src / name)
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, t in shards.items() for k in t}}))
    renamer = WeightRenamer(src)
    prefetched, mapped_at_write = [], []
    real_prefetch, real_save = renamer.tensors.prefetch, renamer_module.save_checkpoint
    renamer.tensors.prefetch = lambda shard: (prefetched.append(shard), real_prefetch(shard))

    def save_and_look(*args, **kwargs):  # which source files are mapped while an output shard is written
        mapped_at_write.append(sorted(n[:11] for n in _mapped_shards(src)))
        return real_save(*args, **kwargs)

    monkeypatch.setattr(renamer_module, "save_checkpoint", save_and_look)
    copies = [PlanEntry((k,), f"new.{k}", None, 1.0, 1.0, "tensor", tuple(t.shape), tuple(t.shape))
              for tensors in shards.values() for k, t in tensors.items()]
    # Built from shards 1 and 3: written with shard 1's outputs, so shard 3 is read early and kept until its own turn.
    both = PlanEntry(("l1.b", "l3.b"), "new.both", "concat", 1.0, 1.0, "combined", (4,), (8,),
                     args={"dim": 0, "sizes": [4, 4]})
    for plan, expected in (
        (MappingPlan(tuple(copies)), [["model-00001"], ["model-00002"], ["model-00003"]]),
        (MappingPlan((*copies, both)), [["model-00001", "model-00003"], ["model-00002", "model-00003"],
                                        ["model-00003"]]),
    ):
        renamer.rename_keys(plan)
        renamer.tensors["l1.w"]  # a read before saving opens shard 1 too
        mapped_at_write.clear()
        out = renamer.save(tmp_path / f"out{len(plan.entries)}")
        assert mapped_at_write == expected
        assert _mapped_shards(src) == set()  # every source map is let go by the end
        assert prefetched == [1, 2]  # before each output shard, the next one's source shard only
        prefetched.clear()
        converted = load_checkpoint(out).tensors
        assert torch.equal(converted["new.l2.w"], shards["model-00002-of-00003.safetensors"]["l2.w"])
    assert torch.equal(converted["new.both"], torch.tensor([1.0] * 4 + [3.0] * 4))


def test_sharded_torch_checkpoint_converts_and_lets_go_of_its_last_shard(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shards = [{f"l{i}.w": torch.full((2, 3), float(i))} for i in range(3)]
    for i, shard in enumerate(shards):
        torch.save(shard, src / f"pytorch_model-{i + 1:05d}-of-00003.bin")
    renamer = WeightRenamer(src)
    renamer.rename_keys(MappingPlan(tuple(PlanEntry((f"l{i}.w",), f"new.{i}", "transpose", 1.0, 1.0, "tensor", (2, 3),
                                                    (3, 2)) for i in range(3))))
    out = renamer.save(tmp_path / "out")
    assert renamer.tensors._loaded is None  # the last shard read is not kept after the save
    converted = load_checkpoint(out).tensors
    assert all(torch.equal(converted[f"new.{i}"], shards[i][f"l{i}.w"].T) for i in range(3))
