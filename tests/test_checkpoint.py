"""Tests for weight_mapper.checkpoint: reading and writing checkpoints safely."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import warnings

import tempfile

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from weight_mapper import checkpoint
from weight_mapper.checkpoint import (
    Checkpoint,
    detect_wrapper_prefix,
    load_checkpoint,
    load_checkpoint_as_dict,
    save_checkpoint,
    unwrap_state_dict,
)
from weight_mapper.errors import CheckpointError, UnsafeCheckpointError

_DIM = 8
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------- tiny fixture models


class Mlp(nn.Module):
    """Nothing wrong with it: the baseline."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(_DIM, 2 * _DIM)
        self.fc2 = nn.Linear(2 * _DIM, _DIM)


class Tied(nn.Module):
    """Embedding and output head share one weight."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(_DIM, 4)
        self.head = nn.Linear(4, _DIM, bias=False)
        self.head.weight = self.embed.weight


class NonContiguous(nn.Module):
    """A transposed (non-contiguous) weight."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(_DIM, 4)
        self.fc.weight = nn.Parameter(torch.randn(_DIM, 4).t())


class Payload:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def _mixed_dtypes() -> dict[str, torch.Tensor]:
    return {f"t_{str(d).split('.')[-1]}": (torch.randn(3, _DIM) * 10).to(d) for d in _DTYPES}


def _assert_same(actual, expected):
    assert list(actual) == list(expected) or sorted(actual) == sorted(expected)
    for name, t in expected.items():
        assert actual[name].dtype == t.dtype, name
        assert torch.equal(actual[name], t), name


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_shards(folder: pathlib.Path, tensors: dict, *, n_shards: int = 3, suffix: str = ".safetensors",
                  index: bool = True) -> list[pathlib.Path]:
    names = list(tensors)
    paths, weight_map = [], {}
    for i in range(n_shards):
        shard = {n: tensors[n] for n in names[i::n_shards]}
        path = folder / f"model-{i + 1:05d}-of-{n_shards:05d}{suffix}"
        if suffix == ".safetensors":
            safetensors.torch.save_file(shard, path)
        else:
            torch.save(shard, path)
        paths.append(path)
        weight_map.update(dict.fromkeys(shard, path.name))
    if index:
        stem = "model.safetensors" if suffix == ".safetensors" else "pytorch_model.bin"
        (folder / f"{stem}.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return paths


def _many_tensors() -> dict[str, torch.Tensor]:
    return {f"layers.{i}.weight": torch.randn(_DIM, i + 1) for i in range(7)}


# ---------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".ckpt", ".safetensors"])
def test_round_trip_preserves_values_and_dtypes(tmp_path, suffix):
    tensors = {**Mlp().state_dict(), **_mixed_dtypes()}
    path = save_checkpoint(tensors, tmp_path / f"model{suffix}")
    ckpt = load_checkpoint(path)
    assert ckpt.format == ("safetensors" if suffix == ".safetensors" else "torch")
    assert ckpt.path == path and ckpt.state_key is None and ckpt.envelope == {}
    _assert_same(ckpt.tensors, tensors)
    _assert_same(load_checkpoint_as_dict(path), tensors)


def test_non_contiguous_tensor_saved_to_safetensors(tmp_path):
    state_dict = NonContiguous().state_dict()
    assert not state_dict["fc.weight"].is_contiguous()
    path = save_checkpoint(state_dict, tmp_path / "model.safetensors")
    _assert_same(load_checkpoint_as_dict(path), state_dict)


def test_legacy_non_zip_file_loads(tmp_path):
    tensors = Mlp().state_dict()
    path = tmp_path / "legacy.pt"
    torch.save(tensors, path, _use_new_zipfile_serialization=False)
    _assert_same(load_checkpoint(path).tensors, tensors)


def test_safetensors_under_another_extension_is_recognised(tmp_path):
    tensors = Mlp().state_dict()
    path = tmp_path / "model.bin"
    safetensors.torch.save_file(tensors, path)
    assert load_checkpoint(path).format == "safetensors"


def test_safetensors_metadata_kept(tmp_path):
    path = save_checkpoint({"w": torch.ones(2)}, tmp_path / "m.safetensors", metadata={"arch": "mlp"})
    assert load_checkpoint(path).metadata == {"arch": "mlp", "format": "pt"}


def test_safetensors_metadata_must_be_str(tmp_path):
    with pytest.raises(CheckpointError, match=r"m\.safetensors.*'epoch'.*str\(\)"):
        save_checkpoint({"w": torch.ones(2)}, tmp_path / "m.safetensors", metadata={"epoch": 3})


# ------------------------------------------------------------------------------------ envelopes


def test_lightning_envelope_unwrapped_and_kept_on_save(tmp_path):
    state_dict = {f"model.{k}": v for k, v in Mlp().state_dict().items()}
    envelope = {"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
                "hyper_parameters": {"lr": 0.1}}
    path = tmp_path / "last.ckpt"
    torch.save({**envelope, "state_dict": state_dict}, path)

    ckpt = load_checkpoint(path)
    assert ckpt.state_key == "state_dict" and ckpt.envelope == envelope
    _assert_same(ckpt.tensors, state_dict)
    assert detect_wrapper_prefix(ckpt.tensors) == "model."

    out = save_checkpoint(ckpt.tensors, tmp_path / "out.ckpt", envelope=ckpt.envelope,
                          state_key=ckpt.state_key)
    reloaded = torch.load(out, weights_only=True)
    assert {k: v for k, v in reloaded.items() if k != "state_dict"} == envelope
    _assert_same(reloaded["state_dict"], state_dict)


@pytest.mark.parametrize("key", ["model", "model_state_dict", "ema", "module", "state_dict_ema"])
def test_known_envelope_keys(tmp_path, key):
    state_dict = Mlp().state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save({key: state_dict, "optimizer": {"state": {}, "param_groups": []}, "epoch": 1}, path)
    ckpt = load_checkpoint(path)
    assert ckpt.state_key == key
    assert set(ckpt.envelope) == {"optimizer", "epoch"}
    _assert_same(ckpt.tensors, state_dict)


@pytest.mark.parametrize("keys", [("state_dict", "state_dict_ema"), ("model", "ema")])
def test_several_state_dicts_need_key(tmp_path, keys):
    state_dict, ema = Mlp().state_dict(), Mlp().state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save({keys[0]: state_dict, keys[1]: ema, "epoch": 2}, path)
    with pytest.raises(CheckpointError, match=rf"ckpt\.pt.*'{keys[0]}'.*'{keys[1]}'.*key=") as caught:
        load_checkpoint(path)
    assert (caught.value.option, caught.value.value) == ("key", keys[0])  # the CLI names --key from these
    ckpt = load_checkpoint(path, key=keys[1])
    assert ckpt.state_key == keys[1] and set(ckpt.envelope) == {keys[0], "epoch"}
    _assert_same(ckpt.tensors, ema)


def test_unknown_key_lists_available_keys(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": Mlp().state_dict(), "epoch": 2}, path)
    with pytest.raises(CheckpointError, match=r"ckpt\.pt has no key 'weights'.*'epoch'.*'state_dict'"):
        load_checkpoint(path, key="weights")


def test_key_on_bare_state_dict_says_drop_it(tmp_path):
    path = tmp_path / "bare.pt"
    torch.save(Mlp().state_dict(), path)
    with pytest.raises(CheckpointError, match=r"bare\.pt has no key 'model'.*bare state dict.*drop key="):
        load_checkpoint(path, key="model")


def test_unknown_envelope_key_is_suggested(tmp_path):
    path = tmp_path / "gan.pt"
    torch.save({"generator": Mlp().state_dict(), "step": 3}, path)
    with pytest.raises(CheckpointError, match=r"gan\.pt contains no tensors.*key= one of 'generator'"):
        load_checkpoint(path)
    assert load_checkpoint(path, key="generator").state_key == "generator"


def test_unwrap_in_memory_and_from_state_dict():
    state_dict = Mlp().state_dict()
    tensors, state_key, envelope, skipped = unwrap_state_dict({"model_state_dict": state_dict, "loss": 0.5})
    assert (state_key, envelope, skipped) == ("model_state_dict", {"loss": 0.5}, ())
    _assert_same(tensors, state_dict)
    ckpt = Checkpoint.from_state_dict(state_dict)
    assert (ckpt.format, ckpt.path, ckpt.state_key) == ("state_dict", None, None)
    assert ckpt.tensors.shards() == [(None, list(state_dict))]


def test_pickled_module_contributes_its_state_dict():
    model = Mlp()
    tensors, state_key, envelope, _ = unwrap_state_dict({"model": model, "epoch": 1})
    assert state_key == "model" and envelope == {"epoch": 1}
    _assert_same(tensors, model.state_dict())
    _assert_same(unwrap_state_dict(model)[0], model.state_dict())


def test_pickled_module_needs_trust_pickle(tmp_path):
    model = Mlp()
    path = tmp_path / "whole_model.pt"
    torch.save({"model": model, "epoch": 4}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"whole_model\.pt.*Mlp.*trust_pickle=True"):
        load_checkpoint(path)
    ckpt = load_checkpoint(path, trust_pickle=True)
    assert ckpt.state_key == "model" and ckpt.envelope == {"epoch": 4}
    _assert_same(ckpt.tensors, model.state_dict())


def test_alias_colliding_with_a_tensor_of_another_shard(tmp_path):
    save_checkpoint(Tied().state_dict(), tmp_path / "a.safetensors")
    safetensors.torch.save_file({"head.weight": torch.ones(1)}, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match=r"'head\.weight' appears in both .*a\.safetensors and .*b\.safe"):
        load_checkpoint(tmp_path)


def test_non_tensor_entries_skipped_with_warning(tmp_path):
    state_dict = {**Mlp().state_dict(), "n_averaged": 3, "note": "hi", "extra": None}
    path = tmp_path / "swa.pt"
    torch.save(state_dict, path)
    with pytest.warns(UserWarning, match=r"swa\.pt: skipped 3 non-tensor entries.*'n_averaged'"):
        ckpt = load_checkpoint(path)
    assert ckpt.skipped == ("n_averaged", "note", "extra")
    assert set(ckpt.tensors) == set(Mlp().state_dict())


def test_skipped_warning_collapses_long_lists():
    state_dict = {"w": torch.ones(1), **{f"meta{i}": i for i in range(9)}}
    state_dict.update({f"w{i}": torch.ones(1) for i in range(9)})
    with pytest.warns(UserWarning, match=r"skipped 9 .*'meta4' and 4 more"):
        unwrap_state_dict(state_dict, source="mem")


# -------------------------------------------------------------------------- safetensors lazily


def test_safetensors_shapes_and_meta_read_header_only(tmp_path, monkeypatch):
    tensors = _mixed_dtypes()
    path = save_checkpoint(tensors, tmp_path / "model.safetensors")

    def forbidden(*args, **kwargs):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(checkpoint, "safe_open", forbidden)
    source = load_checkpoint(path).tensors
    assert source.shapes() == {n: tuple(t.shape) for n, t in tensors.items()}
    assert source.dtypes() == {n: t.dtype for n, t in tensors.items()}
    meta = source.meta()
    assert all(t.is_meta and t.shape == tensors[n].shape and t.dtype == tensors[n].dtype
               for n, t in meta.items())
    assert "t_float32" in source and "nope" not in source and len(source) == len(tensors)
    with pytest.raises(AssertionError, match="tensor data was read"):
        source["t_float32"]


def test_safetensors_handle_opened_once_per_shard(tmp_path, monkeypatch):
    path = save_checkpoint(_many_tensors(), tmp_path / "model.safetensors")
    calls = []
    real = checkpoint.safe_open
    monkeypatch.setattr(checkpoint, "safe_open", lambda *a, **k: calls.append(a) or real(*a, **k))
    dict(load_checkpoint(path).tensors.items())
    assert len(calls) == 1


# -------------------------------------------------------------------------------------- sharded


def test_sharded_safetensors_via_index_and_folder(tmp_path):
    tensors = _many_tensors()
    paths = _write_shards(tmp_path, tensors)
    index = tmp_path / "model.safetensors.index.json"
    for path in (index, tmp_path):
        ckpt = load_checkpoint(path)
        assert ckpt.format == "sharded-safetensors" and ckpt.path == index
        _assert_same(ckpt.tensors, tensors)
        assert [p for p, _ in ckpt.tensors.shards()] == paths
        assert sorted(n for _, names in ckpt.tensors.shards() for n in names) == sorted(tensors)
        assert set(ckpt.files) == {index, *paths}


def test_sharded_torch_bin_with_index_loads_one_shard_at_a_time(tmp_path, monkeypatch):
    tensors = _many_tensors()
    paths = _write_shards(tmp_path, tensors, suffix=".bin")
    ckpt = load_checkpoint(tmp_path / "pytorch_model.bin.index.json")
    assert ckpt.format == "sharded-torch"
    assert ckpt.tensors.shapes() == {n: tuple(t.shape) for n, t in tensors.items()}

    loaded = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda p, **kw: loaded.append(pathlib.Path(p).name) or real(p, **kw))
    _assert_same(dict(ckpt.tensors.items()), tensors)
    assert loaded == [p.name for p in paths]  # each shard loaded once, in order


def test_folder_of_torch_shards_without_index(tmp_path):
    tensors = _many_tensors()
    _write_shards(tmp_path, tensors, suffix=".pt", index=False)
    torch.save({"step": 1}, tmp_path / "optimizer.pt")  # not a weight file: ignored
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.format == "sharded-torch"
    _assert_same(ckpt.tensors, tensors)


def test_folder_with_one_file_loads_that_file(tmp_path):
    path = save_checkpoint(Mlp().state_dict(), tmp_path / "model.safetensors")
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.format == "safetensors" and ckpt.path == path


def test_duplicate_keys_across_shards(tmp_path):
    tensors = _many_tensors()
    paths = _write_shards(tmp_path, tensors, index=False)
    safetensors.torch.save_file({"layers.0.weight": torch.ones(1)}, tmp_path / "stale.safetensors")
    with pytest.raises(CheckpointError, match=rf"'layers.0.weight' appears in both .*{paths[0].name} and "
                                              rf".*stale\.safetensors"):
        load_checkpoint(tmp_path)


def test_index_not_matching_shards(tmp_path):
    _write_shards(tmp_path, _many_tensors())
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["ghost.weight"] = "model-00001-of-00003.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"index\.json says 'ghost\.weight' is in model-00001"):
        load_checkpoint(index)


def test_index_with_missing_shard(tmp_path):
    paths = _write_shards(tmp_path, _many_tensors())
    paths[1].unlink()
    with pytest.raises(CheckpointError, match=rf"lists shard\(s\) '{paths[1].name}' that do not exist"):
        load_checkpoint(tmp_path)


def test_folder_with_nothing(tmp_path):
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(CheckpointError, match=rf"{tmp_path.name} contains no checkpoint; looked for "
                                              r"\*\.index\.json, \*\.safetensors and \*\.bin"):
        load_checkpoint(tmp_path)


# ------------------------------------------------------------------------------------- security


def test_malicious_pickle_refused_unless_trusted(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.ones(2), "payload": Payload(marker)}, path)

    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pt.*arbitrary code.*global: getattr.*NOT run.*"
                                                    r"trust_pickle=True") as caught:
        load_checkpoint(path)
    assert caught.value.option == "trust_pickle" and "--trust-pickle" not in str(caught.value)  # the CLI's word
    assert not marker.exists()

    with pytest.warns(UserWarning, match="'payload'"):
        ckpt = load_checkpoint(path, trust_pickle=True)
    assert marker.exists()
    assert list(ckpt.tensors) == ["weight"]


# ------------------------------------------------------------------------------ broken inputs


def _broken(tmp_path: pathlib.Path, kind: str) -> pathlib.Path:
    good_pt, good_st = tmp_path / "good.pt", tmp_path / "good.safetensors"
    torch.save(Mlp().state_dict(), good_pt)
    safetensors.torch.save_file(Mlp().state_dict(), good_st)
    path = tmp_path / {"empty": "empty.pt", "truncated_pt": "half.pt", "truncated_st": "half.safetensors",
                       "random": "noise.bin", "list": "list.pt", "ints": "ints.pt",
                       "bad_header": "header.safetensors"}[kind]
    if kind == "empty":
        path.touch()
    elif kind == "truncated_pt":
        path.write_bytes(good_pt.read_bytes()[: good_pt.stat().st_size // 2])
    elif kind == "truncated_st":
        path.write_bytes(good_st.read_bytes()[: good_st.stat().st_size // 2])
    elif kind == "random":
        path.write_bytes(bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).tolist()))
    elif kind == "list":
        torch.save([1, 2, 3], path)
    elif kind == "ints":
        torch.save({"a": 1, "b": 2}, path)
    elif kind == "bad_header":
        path.write_bytes((10).to_bytes(8, "little") + b"{not json!")
    return path


@pytest.mark.parametrize("kind, match", [
    ("empty", r"empty\.pt is empty"),
    ("truncated_pt", r"half\.pt could not be read: truncated or corrupt \(.+\)"),
    ("truncated_st", r"half\.safetensors could not be read: truncated or corrupt"),
    ("random", r"noise\.bin could not be read: truncated or corrupt"),
    ("list", r"list\.pt contains no tensors \(it holds a list\); expected a state dict .*state_dict, model"),
    ("ints", r"ints\.pt contains no tensors; expected a state dict or a checkpoint dict with one of: "
             r"state_dict"),
    ("bad_header", r"header\.safetensors could not be read: truncated or corrupt \(header is not valid JSON"),
])
def test_broken_files_raise_checkpoint_error_naming_file(tmp_path, kind, match):
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(_broken(tmp_path, kind))
    assert not isinstance(info.value, UnsafeCheckpointError)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"No such checkpoint: .*missing\.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_absurd_safetensors_header_length(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes((2**60).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match=r"huge\.safetensors could not be read: truncated or corrupt "
                                              r"\(header length"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------------ tied weights


def test_tied_weights_survive_safetensors(tmp_path):
    state_dict = Tied().state_dict()
    path = save_checkpoint(state_dict, tmp_path / "tied.safetensors")
    with safetensors.safe_open(path, framework="pt") as f:
        assert len(f.keys()) == 1  # stored once
    ckpt = load_checkpoint(path)
    assert set(ckpt.tensors) == {"embed.weight", "head.weight"}
    assert checkpoint._ALIASES_KEY not in ckpt.metadata
    assert torch.equal(ckpt.tensors["head.weight"], state_dict["embed.weight"])
    assert ckpt.tensors.shapes()["head.weight"] == (_DIM, 4)
    loaded = load_checkpoint_as_dict(path)
    assert loaded["head.weight"] is loaded["embed.weight"]


def test_tied_weights_survive_torch(tmp_path):
    path = save_checkpoint(Tied().state_dict(), tmp_path / "tied.pt")
    loaded = load_checkpoint_as_dict(path)
    storage = loaded["embed.weight"].untyped_storage()
    assert loaded["head.weight"].untyped_storage().data_ptr() == storage.data_ptr()


def test_tie_kept_when_resaving_a_loaded_safetensors_checkpoint(tmp_path):
    first = save_checkpoint(Tied().state_dict(), tmp_path / "first.safetensors")
    second = save_checkpoint(load_checkpoint(first).tensors, tmp_path / "second.safetensors")
    with safetensors.safe_open(second, framework="pt") as f:
        assert list(f.keys()) == ["embed.weight"]
        assert json.loads(f.metadata()[checkpoint._ALIASES_KEY]) == {"head.weight": "embed.weight"}


def test_overlapping_views_are_copied_not_aliased(tmp_path):
    base = torch.randn(4, _DIM)
    tensors = {"top": base[:2], "bottom": base[2:], "all": base}
    path = save_checkpoint(tensors, tmp_path / "views.safetensors")
    _assert_same(load_checkpoint_as_dict(path), tensors)


# ------------------------------------------------------------------------------------ safe writing


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_atomic_save_leaves_nothing_behind(tmp_path, monkeypatch, error, suffix):
    out = tmp_path / f"out{suffix}"
    out.write_bytes(b"previous contents")

    def write_half_then_fail(obj, path, *args, **kwargs):
        pathlib.Path(path).write_bytes(b"partial")
        raise error

    monkeypatch.setattr(torch, "save", write_half_then_fail)
    monkeypatch.setattr(safetensors.torch, "save_file", write_half_then_fail)
    with pytest.raises(type(error)):
        save_checkpoint(Mlp().state_dict(), out)
    assert out.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_atomic_save_without_previous_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(Mlp().state_dict(), tmp_path / "out.pt")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_protected_source(tmp_path):
    source = save_checkpoint(Mlp().state_dict(), tmp_path / "model.safetensors")
    before = _sha256(source)
    ckpt = load_checkpoint(source)
    for target in (source, tmp_path / "." / "model.safetensors"):
        with pytest.raises(CheckpointError, match=r"Refusing to overwrite the source checkpoint .*model\."
                                                  r"safetensors.*choose another output path"):
            save_checkpoint(ckpt.tensors, target, protected=ckpt.files)
    link = tmp_path / "hardlink.safetensors"
    os.link(source, link)
    with pytest.raises(CheckpointError, match="Refusing to overwrite"):
        save_checkpoint(ckpt.tensors, link, protected=[source])
    assert _sha256(source) == before


def test_source_unchanged_after_load_and_save_elsewhere(tmp_path):
    source = tmp_path / "src.pt"
    torch.save({"state_dict": Mlp().state_dict(), "epoch": 1}, source)
    before = _sha256(source)
    ckpt = load_checkpoint(source)
    save_checkpoint(ckpt.tensors, tmp_path / "dst.pt", envelope=ckpt.envelope, state_key=ckpt.state_key,
                    protected=ckpt.files)
    save_checkpoint(ckpt.tensors, tmp_path / "dst.safetensors", protected=ckpt.files)
    assert _sha256(source) == before


def test_missing_output_folder(tmp_path):
    with pytest.raises(CheckpointError, match=r"folder .*nope does not exist; create it first"):
        save_checkpoint({"w": torch.ones(1)}, tmp_path / "nope" / "out.pt")


def test_envelope_dropped_from_safetensors_with_warning(tmp_path):
    with pytest.warns(UserWarning, match=r"'epoch'.*not stored; save to a \.pt"):
        path = save_checkpoint({"w": torch.ones(1)}, tmp_path / "o.safetensors", envelope={"epoch": 1},
                               state_key="state_dict")
    assert list(load_checkpoint(path).tensors) == ["w"]


def test_non_tensor_value_rejected_on_save(tmp_path):
    with pytest.raises(CheckpointError, match=r"out\.pt: 'lr' is a float, not a tensor; pass .*envelope="):
        save_checkpoint({"w": torch.ones(1), "lr": 0.1}, tmp_path / "out.pt")


def test_envelope_needs_state_key(tmp_path):
    with pytest.raises(CheckpointError, match=r"out\.pt.*without state_key"):
        save_checkpoint({"w": torch.ones(1)}, tmp_path / "out.pt", envelope={"epoch": 1})


# --------------------------------------------------------------------------------- wrapper prefix


@pytest.mark.parametrize("names, prefix", [
    (["module.fc.weight", "module.fc.bias"], "module."),
    (["_orig_mod.fc.weight", "_orig_mod.fc.bias"], "_orig_mod."),
    (["module._orig_mod.fc.weight", "module._orig_mod.fc.bias"], "module._orig_mod."),
    (["_orig_mod.module.fc.weight"], "_orig_mod.module."),
    (["model._orig_mod.fc.weight"], "model._orig_mod."),
    (["model.layers.0.weight", "model.norm.weight"], "model."),
    (["module.fc.weight", "fc.bias"], ""),
    (["module.", "module.fc.weight"], ""),  # stripping would leave an empty name
    (["fc.weight"], ""),
    ([], ""),
])
def test_detect_wrapper_prefix(names, prefix):
    assert detect_wrapper_prefix(iter(names)) == prefix


def test_no_warning_for_clean_round_trip(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(save_checkpoint(Mlp().state_dict(), tmp_path / "m.safetensors"))
        load_checkpoint(save_checkpoint(Mlp().state_dict(), tmp_path / "m.pt"))



def test_output_file_gets_normal_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    path = save_checkpoint({"w": torch.ones(1)}, tmp_path / "m.safetensors")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_write_text_atomic(tmp_path):
    path = checkpoint.write_text_atomic(tmp_path / "plan.json", "{}")
    assert path.read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]
    with pytest.raises(CheckpointError, match="Refusing to overwrite"):
        checkpoint.write_text_atomic(path, "[]", protected=[path])


def test_corrupt_index(tmp_path):
    _write_shards(tmp_path, _many_tensors())
    (tmp_path / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json is not a valid index"):
        load_checkpoint(tmp_path)


def test_unknown_safetensors_dtype(tmp_path):
    header = json.dumps({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "complex.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(CheckpointError, match=r"complex\.safetensors: tensor 'w' has dtype C64"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------------ properties

_names = st.from_regex(r"[a-z][a-z0-9_]{0,6}(\.[a-z0-9_]{1,6}){0,3}", fullmatch=True)


_specs = st.tuples(st.sampled_from(_DTYPES), st.lists(st.integers(0, 4), max_size=3))


@settings(max_examples=25, deadline=None)
@given(specs=st.dictionaries(_names, _specs, min_size=1, max_size=8),
       n_tied=st.integers(0, 2), suffix=st.sampled_from([".safetensors", ".pt"]))
def test_round_trip_property(specs, n_tied, suffix):
    tensors = {name: (torch.randn(shape) * 10).to(dtype) for name, (dtype, shape) in specs.items()}
    names = list(tensors)
    for i in range(min(n_tied, len(names) - 1)):  # tie a few names to the first one
        tensors[names[i + 1]] = tensors[names[0]]
    with tempfile.TemporaryDirectory() as folder:
        loaded = load_checkpoint_as_dict(save_checkpoint(tensors, pathlib.Path(folder) / f"m{suffix}"))
        assert sorted(os.listdir(folder)) == [f"m{suffix}"]
    _assert_same(loaded, tensors)
    for i in range(min(n_tied, len(names) - 1)):
        if tensors[names[0]].numel():
            assert loaded[names[i + 1]].data_ptr() == loaded[names[0]].data_ptr()


@given(prefix=st.sampled_from(["module.", "_orig_mod.", "module._orig_mod."]),
       names=st.lists(_names.filter(lambda n: not n.startswith(("module", "model", "_orig_mod"))), min_size=1))
def test_detect_wrapper_prefix_recovers_added_prefix(prefix, names):
    assert detect_wrapper_prefix(prefix + n for n in names) == prefix
    assert detect_wrapper_prefix(names) == ""


# ---------------------------------------------------------------------------- sources describe themselves


@pytest.mark.parametrize(("suffix", "ordered"), [(".pt", True), (".safetensors", False)])
def test_a_source_answers_its_ties_and_whether_its_order_means_anything(tmp_path, suffix, ordered):
    embedding = torch.randn(5, 4)
    path = save_checkpoint({"head.weight": embedding, "embed.weight": embedding, "head.bias": torch.zeros(5)},
                           tmp_path / f"tied{suffix}")
    source = load_checkpoint(path).tensors
    assert source.ordered is ordered
    assert [set(group) for group in source.tie_groups()] == [{"head.weight", "embed.weight"}]
    meta = source.meta()  # the tie survives without data: one meta tensor for the group
    assert meta["head.weight"] is meta["embed.weight"] and meta["head.bias"] is not meta["head.weight"]


def test_the_table_of_a_checkpoint_follows_its_source(tmp_path):
    from weight_mapper.table import TensorTable

    w = torch.randn(3, 3)
    state = {"layers.2.weight": w, "layers.10.weight": torch.randn(3), "embed.weight": w}
    for suffix, names in ((".pt", ("layers.2.weight", "layers.10.weight", "embed.weight")),  # as defined
                          (".safetensors", ("embed.weight", "layers.2.weight", "layers.10.weight"))):  # natural
        table = TensorTable.from_checkpoint(load_checkpoint(save_checkpoint(state, tmp_path / f"m{suffix}")))
        assert table.names == names and table.ordered is (suffix == ".pt")
        tied = sorted(table.name2row[n] for n in ("layers.2.weight", "embed.weight"))
        assert table.alias_of[tied[1]] == tied[0] and table.n_parameters == 12


def test_refuse_overwrite_names_what_would_be_lost(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    with pytest.raises(CheckpointError, match=r"Refusing to overwrite the plan .*plan\.json with"):
        checkpoint.refuse_overwrite(tmp_path / "." / "plan.json", [(plan, "the plan")])
    with pytest.raises(CheckpointError, match="Refusing to overwrite the source checkpoint"):
        checkpoint.refuse_overwrite(plan, [plan])
    checkpoint.refuse_overwrite(tmp_path / "other.json", [plan, (plan, "the plan")])  # another path: fine


def test_a_new_format_is_one_source_subclass(tmp_path):
    """Everything downstream asks the source, never its format string: an .npz reader needs nothing else."""
    import numpy as np

    from weight_mapper.checkpoint import Checkpoint, TensorSource
    from weight_mapper.summary import summarize_checkpoint
    from weight_mapper.table import TensorTable

    class NpzSource(TensorSource):
        ordered = False  # say its order means nothing: the table then puts rows in natural order

        def __init__(self, path):
            self._arrays = np.load(path)
            names = list(self._arrays.files)
            super().__init__({n: (tuple(self._arrays[n].shape), torch.float32) for n in names},
                             dict.fromkeys(names, 0), [path], aliases={"head.weight": "embed.weight"})

        def _read(self, name):
            return torch.from_numpy(self._arrays[name])

    path = tmp_path / "m.npz"
    np.savez(path, **{"layers.10.w": np.ones(2, "f4"), "layers.2.w": np.ones(2, "f4"),
                      "embed.weight": np.ones((3, 2), "f4"), "head.weight": np.ones((3, 2), "f4")})
    ckpt = Checkpoint(NpzSource(path), path, "npz")
    table = TensorTable.from_checkpoint(ckpt)
    assert table.names == ("embed.weight", "head.weight", "layers.2.w", "layers.10.w") and not table.ordered
    summary = summarize_checkpoint(ckpt)
    assert (summary.format, summary.n_tied, summary.n_parameters) == ("npz", 1, 10)
