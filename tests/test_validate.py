"""Checks at the edge (weight_mapper/validate.py) and the readers and writers that use them."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from weight_mapper import MappingPlan, PlanEntry, WeightMapper, WeightRenamer, load_checkpoint
from weight_mapper.checkpoint import clean_stale_temporaries, save_checkpoint, temporary_path_for
from weight_mapper.cli import main
from weight_mapper.errors import CheckpointError, MappingError, PlanError
from weight_mapper.table import TensorTable
from weight_mapper.transforms import invert_entries
from weight_mapper.validate import Invalid, check_name, json_depth, loads_json


def _safetensors(path, header: dict, n_data: int) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(n_data))


def _plan(entries: list[dict]) -> str:
    return json.dumps({"format": "weight_mapper.plan", "version": 1, "entries": entries})


def _entry(source, target, transform=None, **kw):
    return {"source": source, "target": target, "transform": transform, **kw}


# ------------------------------------------------------------------------------------ bounds


def test_names_are_bounded_in_length_and_depth():
    check_name("a." * 998 + "w")
    with pytest.raises(Invalid, match="5000 characters"):
        check_name("w" * 5000)
    with pytest.raises(Invalid, match="1201 dotted components, more than 1000"):
        check_name("a." * 1200 + "w")


def test_json_nesting_is_measured_before_parsing():
    assert json_depth('{"a": [1, {"b": "[[[["}]}') == 3
    with pytest.raises(Invalid, match="nested 5000 levels deep"):
        loads_json("[" * 5000 + "]" * 5000)


def test_a_deep_tensor_name_is_refused_in_bounded_memory(tmp_path):
    # 50,000 dotted levels in a 100 KB file: every module path would be kept (10k levels: 1 GB)
    path = tmp_path / "deep.safetensors"
    save_file({"a." * 50_000 + "w": torch.ones(1), "fc.weight": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match=r"\(100001 characters\) is longer than 4096 characters; names beyond"):
        load_checkpoint(path)
    save_file({"a." * 1500 + "w": torch.ones(1)}, path)
    with pytest.raises(CheckpointError, match="1501 dotted components, more than 1000"):
        load_checkpoint(path)
    with pytest.raises(MappingError, match="more than 1000"):
        TensorTable.from_state_dict({"a." * 1500 + "w": (1,)})


# ------------------------------------------------------------------------------------ safetensors


@pytest.mark.parametrize(("edit", "match"), [
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}, r"starts at byte 12.*ends at byte 8 \(gap\)"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, r"starts at byte 4.*\(overlap\)"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, "8 trailing bytes belong to no tensor"),
    ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, r"shape \[-4\]: expected a list"),
    ({"w": {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}}, "non-negative integers"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, "0 <= begin <= end"),
    ({"__metadata__": True, "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, "__metadata__ is a bool"),
    ({"__metadata__": {"a": {"b": "c"}}, "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
     "'a' is not a string"),
])
def test_bad_headers_are_refused_when_the_file_is_opened(tmp_path, edit, match):
    path = tmp_path / "bad.safetensors"
    _safetensors(path, edit, 16)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)  # inspect and map read headers only: they see it too
    assert main(["inspect", str(path)]) == 1


def test_a_header_nested_thousands_deep_is_our_error(tmp_path):
    path = tmp_path / "deep.safetensors"
    raw = b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match="nested 5001 levels deep"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------------ torch files


def test_keys_1_and_str_1_are_an_error_naming_both(tmp_path):
    path = tmp_path / "clash.pt"
    torch.save({1: torch.ones(1), "1": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match=r"two keys named '1': 1 \(int\) and '1' \(str\)"):
        load_checkpoint(path)


@pytest.mark.parametrize("kind", ["nested", "sparse"])
def test_tensors_that_are_not_dense_are_refused(tmp_path, kind):
    t = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]) if kind == "nested" else torch.ones(2, 2).to_sparse()
    path = tmp_path / "odd.pt"
    torch.save({"w": t, "b": torch.ones(1)}, path)
    with pytest.raises(CheckpointError, match="only dense tensors can be mapped"):
        load_checkpoint(path)


def test_an_envelope_nested_too_deep_is_refused(tmp_path):
    deep = 1
    for _ in range(500):
        deep = {"x": deep}
    path = tmp_path / "deep.ckpt"
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)  # torch.save recurses
    try:
        torch.save({"state_dict": {"w": torch.ones(1)}, "hyper_parameters": deep}, path)
    finally:
        sys.setrecursionlimit(limit)
    with pytest.raises(CheckpointError, match="envelope nests more than 100 levels deep"):
        load_checkpoint(path)


def test_a_damaged_legacy_pickle_is_our_error(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(4)}, path, _use_new_zipfile_serialization=False)
    data = bytearray(path.read_bytes())
    data[len(data) // 2:] = bytes(len(data) - len(data) // 2)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="legacy.pt could not be read"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------------ files and indexes


def test_a_fifo_is_refused_before_it_is_opened(tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    os.mkfifo(folder / "model.safetensors.index.json")
    with pytest.raises(CheckpointError, match="FIFO"):
        load_checkpoint(folder / "model.safetensors.index.json")  # would block forever if opened
    os.mkfifo(tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="FIFO"):
        load_checkpoint(tmp_path / "model.pt")


@pytest.mark.parametrize(("shard", "match"), [("../outside.safetensors", "not a file name inside"),
                                                ("/dev/zero", "not a file name inside"),
                                                ("zero.safetensors", "it is a device")])
def test_index_shards_must_be_regular_files_inside_the_folder(tmp_path, shard, match):
    folder = tmp_path / "sharded"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, tmp_path / "outside.safetensors")
    os.symlink("/dev/zero", folder / "zero.safetensors")
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(index)


def test_an_index_symlinked_to_dev_zero_is_refused(tmp_path):
    os.symlink("/dev/zero", tmp_path / "model.safetensors.index.json")
    with pytest.raises(CheckpointError, match="it is a device"):
        load_checkpoint(tmp_path / "model.safetensors.index.json")


# ------------------------------------------------------------------------------------ plans


@pytest.mark.parametrize(("entries", "match"), [
    ([_entry("a", "x"), _entry("b", "x")], "entries 0 and 1 both fill target 'x'"),
    (["a"], "malformed plan entry 0: it is a str, not an object"),
    ([_entry([], "x")], r"entry 0 \(target 'x'\): field 'source' is \[\]"),
    ([_entry([["a"]], "x")], "field 'source'"),
    ([_entry(["a", "b"], "x", "stack_concat", args={"parts": "two", "concat_dim": 1, "sizes": [1, 1]})],
     "args.parts is 'two'"),
    ([_entry(["a", "b"], "x", "stack_concat", args={"parts": 0, "concat_dim": 1, "sizes": []})],
     "args.parts = 0 does not divide"),
    ([_entry(["a", "b"], "x", "stack_concat", args={"parts": 2, "sizes": [1, 1]})], "needs args.concat_dim"),
    ([_entry("a", "x", "slice", args={"start": 2, "length": 3}, source_shape=[4])], "beyond the 4 rows"),
    ([_entry("a", "x", "index", args={"index": 4}, source_shape=[4, 2])], "args.index = 4 is beyond"),
    ([_entry(["a", "b"], "x", "concat", args={"sizes": [2, 2]}, target_shape=[5])], "add up to 4"),
    ([_entry("a", "x", "rotate")], "not a known transform"),
])
def test_bad_plan_entries_get_one_error_naming_entry_and_field(entries, match):
    with pytest.raises(PlanError, match=match):
        MappingPlan.from_json(_plan(entries))


@pytest.mark.parametrize(("field", "value", "match"), [("version", [1], "field 'version' is \\[1\\]"),
                                                       ("threshold", "high", "field 'threshold' is 'high'"),
                                                       ("entries", "x", "expected a list of entries"),
                                                       ("unmatched_source", 99, "expected a list of names")])
def test_bad_plan_fields_are_named(field, value, match):
    data = json.loads(_plan([_entry("a", "x")]))
    data[field] = value
    with pytest.raises(PlanError, match=match):
        MappingPlan.from_json(json.dumps(data))


def test_a_plan_nested_thousands_deep_is_our_error():
    with pytest.raises(PlanError, match="nested 5001 levels deep"):
        MappingPlan.from_json('{"format": "weight_mapper.plan", "entries": ' + "[" * 5000 + "]" * 5000 + "}")


def test_inverting_bad_transform_arguments_is_a_plan_error():
    e = PlanEntry(("a", "b"), "x", "stack_concat", 1.0, 1.0, "combined", (2,), (2, 2), args={"parts": 0})
    with pytest.raises(PlanError, match="transform arguments are missing or out of range"):
        invert_entries([e])


def test_a_plan_is_never_overwritten_by_the_conversion_it_drives(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(_plan([_entry("a", "b", source_shape=[2], target_shape=[2])]))
    renamer = WeightRenamer({"a": torch.ones(2)})
    renamer.rename_keys(MappingPlan.from_json(path))
    with pytest.raises(CheckpointError, match="Refusing to overwrite"):
        renamer.save(path)
    assert json.loads(path.read_text())["format"] == "weight_mapper.plan"


def test_an_in_memory_plan_filling_one_target_twice_is_refused():
    plan = MappingPlan((PlanEntry(("a",), "x", None, 1.0, 1.0, "tensor", (2,), (2,)),
                        PlanEntry(("b",), "x", None, 1.0, 1.0, "tensor", (2,), (2,))))
    with pytest.raises(PlanError, match=r"fills 'x' twice \(from \['a'\] and \['b'\]\)"):
        WeightRenamer({"a": torch.ones(2), "b": torch.ones(2)}).rename_keys(plan)


# ------------------------------------------------------------------------------------ outputs


def test_stale_temporaries_of_dead_runs_are_cleaned_by_the_next_write(tmp_path):
    out = tmp_path / "out.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    ours = temporary_path_for(out)
    stale = ours.with_name(ours.name.rsplit("-", 2)[0] + f"-{dead}-0000")
    stale.mkdir()
    (stale / "out.safetensors").write_bytes(b"partial")
    alive = ours.with_name(ours.name.rsplit("-", 2)[0] + f"-{os.getpid()}-1111")
    alive.write_bytes(b"another run still writing")
    unrelated = tmp_path / ".out.safetensors.tmp123"
    unrelated.write_bytes(b"not ours")
    save_checkpoint({"w": torch.ones(2)}, out)
    assert not stale.exists() and alive.exists() and unrelated.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, alive.name, unrelated.name])
    assert clean_stale_temporaries(tmp_path) == []


def test_map_prints_a_lone_surrogate_name_escaped(tmp_path, capsysbinary):
    source = tmp_path / "odd.pt"
    torch.save({"layers.\udcff.weight": torch.ones(3, 2), "fc.weight": torch.ones(4, 3)}, source)
    target = tmp_path / "target.safetensors"
    save_file({"fc.weight": torch.ones(4, 3), "block.weight": torch.ones(3, 2)}, target)
    assert main(["map", str(source), str(target), "-o", str(tmp_path / "plan.json")]) == 0
    assert b"layers.\\udcff.weight" in capsysbinary.readouterr().out
    assert "layers.\udcff.weight" in MappingPlan.from_json(tmp_path / "plan.json").mapping


def test_map_publishes_nothing_when_a_later_output_fails(tmp_path, capsys):
    source = tmp_path / "a.safetensors"
    save_file({"fc.weight": torch.ones(4, 3)}, source)
    rules = tmp_path / "rules.json"
    rules.mkdir()  # the rules cannot be written: the plan must not be either
    assert main(["map", str(source), str(source), "-o", str(tmp_path / "plan.json"), "--rules", str(rules)]) == 1
    assert "it is a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "rules.json"]


def test_unencodable_names_are_refused_before_a_safetensors_write(tmp_path):
    with pytest.raises(CheckpointError, match="not valid Unicode"):
        save_checkpoint({"a\udcff": torch.ones(1)}, tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_mapper_from_a_checkpoint_with_hostile_names(tmp_path):
    path = tmp_path / "names.safetensors"
    save_file({"[/]x.[bold]y[/bold].weight": torch.ones(2, 2), "fc.weight": torch.ones(3)}, path)
    mapper = WeightMapper.from_checkpoint(path, {"a.weight": (2, 2), "b.weight": (3,)})
    mapper.suggest_mapping()
    assert main(["inspect", str(path)]) == 0


def test_a_name_given_twice_in_a_header_is_an_error_not_a_dropped_tensor(tmp_path):
    path = tmp_path / "twice.safetensors"
    raw = (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
           b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}')
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    with pytest.raises(CheckpointError, match="key 'w' appears twice"):
        load_checkpoint(path)
    with pytest.raises(PlanError, match="key 'target' appears twice"):
        MappingPlan.from_json('{"format": "weight_mapper.plan", "entries": [{"source": "a", "target": "x", '
                              '"target": "y"}]}')


def test_map_and_its_review_page_take_a_name_999_levels_deep(tmp_path):
    source = tmp_path / "deep.safetensors"
    save_file({"a." * 998 + "w": torch.ones(3), "fc.weight": torch.ones(4, 3)}, source)
    target = tmp_path / "target.safetensors"
    save_file({"b." * 998 + "w": torch.ones(3), "head.weight": torch.ones(4, 3)}, target)
    assert main(["map", str(source), str(target), "-o", str(tmp_path / "plan.json"), "--json",
                 "--html", str(tmp_path / "review.html")]) == 0
    assert (tmp_path / "review.html").stat().st_size > 0
