"""Structure-aware fuzz cases: seed files, and mutations that know the formats they damage.

A case is a folder of input files plus one entry point to run on them. :func:`build_seeds`
writes the well-formed inputs once (a small model as safetensors, torch zip, legacy torch,
a Lightning-style envelope, sharded safetensors and torch folders with their indexes, and
plans using every transform); :func:`make_case` draws one mutation of one of them from a
``random.Random`` (the long profile seeds it per case, the test suite lets hypothesis drive
it). Mutation families:

- ``bytes``: truncation, byte flips, inserted or deleted bytes, zeroed ranges of any file;
- ``header``: edits of a safetensors header (shapes, offsets, dtypes, metadata, nesting,
  header length);
- ``pickle``: edits of the pickle inside a torch file (its ``data.pkl`` or the legacy stream);
- ``payload``: pickles that run code when loaded (``os.system``, ``exec``, ``eval``,
  ``subprocess``, ``open``), in six placements; running writes a marker file;
- ``structure``: well-formed torch files holding what a state dict should not: keys ``1`` and
  ``"1"``, nested and sparse tensors, dicts nested 1,000 deep, no tensors;
- ``names``: hostile tensor names (5,000 characters, 50,000 dotted levels, lone surrogates,
  rich markup, control characters, empty);
- ``index``: shard indexes pointing outside their folder, at ``/dev/zero``, at FIFOs, nested
  deep, or being a FIFO themselves;
- ``plan``: plan JSON edits (any field replaced by junk, transform arguments out of range,
  duplicated entries, deep nesting, version and threshold of the wrong type).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Case", "ENTRY_POINTS", "MUTATIONS", "build_seeds", "make_case", "write_case"]

#: Entry points a case can run, in the order the table lists them.
ENTRY_POINTS = ("loader", "from_checkpoint", "renamer", "from_json", "cli_inspect", "cli_map", "cli_apply")
MUTATIONS = ("bytes", "header", "pickle", "payload", "structure", "names", "index", "plan")

# What each entry point reads, and so which mutations apply to it.
_CHECKPOINT_MUTATIONS = ("bytes", "header", "pickle", "payload", "structure", "names", "index")
_ENTRY2MUTATIONS = {
    "loader": _CHECKPOINT_MUTATIONS,
    "from_checkpoint": _CHECKPOINT_MUTATIONS,
    "renamer": _CHECKPOINT_MUTATIONS,
    "from_json": ("plan",),
    "cli_inspect": _CHECKPOINT_MUTATIONS,
    "cli_map": _CHECKPOINT_MUTATIONS,
    "cli_apply": (*_CHECKPOINT_MUTATIONS, "plan"),
}

_SOURCE_SHAPES = {
    "embed.weight": (10, 8),
    "layers.0.attn.q.weight": (8, 8),
    "layers.0.attn.k.weight": (8, 8),
    "layers.0.mlp.fc1.weight": (16, 8),
    "layers.0.mlp.fc1.bias": (16,),
    "layers.0.norm.weight": (8,),
    "layers.1.attn.q.weight": (8, 8),
    "layers.1.attn.k.weight": (8, 8),
    "layers.1.mlp.fc1.weight": (16, 8),
    "layers.1.mlp.fc1.bias": (16,),
    "layers.1.norm.weight": (8,),
    "head.weight": (4, 8),
}


def _target_name(name: str) -> str:
    return ("model." + name.replace("layers.", "blocks.").replace("attn.q", "attention.query")
            .replace("attn.k", "attention.key").replace("mlp.fc1", "ffn.up"))


@dataclass
class Case:
    """One fuzz case: files to write (relative path -> bytes, or a special file) and what to run.

    A special file is ``{"fifo": True}`` or ``{"symlink": target}`` (relative targets are inside
    the case folder).
    """

    entry: str
    mutation: str
    detail: str
    files: dict[str, Any] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ seeds


def build_seeds(folder: Path) -> dict[str, bytes]:
    """Write the well-formed inputs every case starts from; return ``name -> bytes``."""
    import torch
    from safetensors.torch import save as st_save

    from weight_mapper import MappingPlan, PlanEntry, WeightMapper
    from weight_mapper.checkpoint import save_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    src = {n: torch.randn(s, generator=gen) for n, s in _SOURCE_SHAPES.items()}
    src["head.weight"] = src["embed.weight"][:4].clone()
    tgt = {_target_name(n): t.clone() for n, t in src.items()}
    seeds: dict[str, bytes] = {}

    def torch_bytes(obj: Any, *, legacy: bool = False) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
        return buf.getvalue()

    seeds["source.safetensors"] = st_save(src, metadata={"format": "pt"})
    seeds["target.safetensors"] = st_save(tgt, metadata={"format": "pt"})
    seeds["source.pt"] = torch_bytes(src)
    seeds["legacy.pt"] = torch_bytes(src, legacy=True)
    seeds["lightning.ckpt"] = torch_bytes({"state_dict": src, "epoch": 3, "global_step": 30,
                                           "hyper_parameters": {"lr": 0.1, "layers": [8, 16]}})
    # tied weights: save_checkpoint records the alias in the metadata
    tied = dict(src)
    tied["lm_head.weight"] = tied["embed.weight"]
    save_checkpoint(tied, folder / "tied.safetensors")
    seeds["tied.safetensors"] = (folder / "tied.safetensors").read_bytes()
    names = list(src)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    for kind, suffix, prefix in (("st", ".safetensors", "model"), ("pt", ".bin", "pytorch_model")):
        weight_map = {}
        for i, half in enumerate(halves, start=1):
            shard = f"{prefix}-{i:05d}-of-00002{suffix}"
            part = {n: src[n].clone() for n in half}
            seeds[f"sharded_{kind}/{shard}"] = st_save(part) if kind == "st" else torch_bytes(part)
            weight_map.update(dict.fromkeys(half, shard))
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        seeds[f"sharded_{kind}/{prefix}{suffix}.index.json"] = json.dumps(index, indent=2).encode()
    # the plan `map` writes for source -> target
    mapper = WeightMapper({n: tuple(t.shape) for n, t in src.items()}, {n: tuple(t.shape) for n, t in tgt.items()})
    mapper.suggest_mapping()
    seeds["plan.json"] = mapper.get_plan().to_json().encode()
    # a plan using every transform, and its inverse (slice, index, slice_index)
    combo = {"q": torch.randn(4, 4, generator=gen), "k": torch.randn(4, 4, generator=gen),
             "v": torch.randn(4, 4, generator=gen), "w": torch.randn(3, 5, generator=gen),
             "r": torch.randn(2, 1, 4, generator=gen),
             **{f"e{i}.w1": torch.randn(6, 4, generator=gen) for i in range(2)},
             **{f"e{i}.w3": torch.randn(6, 4, generator=gen) for i in range(2)}}
    seeds["combo.safetensors"] = st_save(combo)
    entries = (
        PlanEntry(("q", "k", "v"), "qkv", "concat", 1.0, 1.0, "combined", (4, 4), (12, 4),
                  args={"dim": 0, "sizes": [4, 4, 4], "source_shapes": [[4, 4]] * 3}),
        PlanEntry(("q", "k"), "qk_stacked", "stack", 1.0, 1.0, "combined", (4, 4), (2, 4, 4), args={"dim": 0}),
        PlanEntry(("w",), "w_t", "transpose", 1.0, 1.0, "tensor", (3, 5), (5, 3)),
        PlanEntry(("r",), "r_flat", "reshape", 1.0, 1.0, "tensor", (2, 1, 4), (2, 4), args={"shape": [2, 4]}),
        PlanEntry(("e0.w1", "e1.w1", "e0.w3", "e1.w3"), "experts.gate_up", "stack_concat", 1.0, 1.0, "combined",
                  (6, 4), (2, 12, 4), args={"dim": 0, "parts": 2, "concat_dim": 1, "sizes": [6, 6],
                                            "source_shapes": [[6, 4]] * 4}),
    )
    plan = MappingPlan(entries, unmatched_source=(), source_label="combo.safetensors", target_label="fused")
    seeds["combo_plan.json"] = plan.to_json().encode()
    # the inverse plan reads the fused tensors: its seed checkpoint is the converted one
    from weight_mapper import apply_plan

    seeds["fused.safetensors"] = st_save(apply_plan(plan, combo))
    seeds["fused_plan.json"] = plan.inverse().to_json().encode()
    for name, data in seeds.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return seeds


# ------------------------------------------------------------------------------------ helpers


def _junk(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value of a random type, sometimes nested."""
    kind = rng.randrange(12 if depth < 3 else 9)
    return [
        lambda: None, lambda: True, lambda: rng.choice([-1, 0, 1, 2, 7, 10**12, -(10**30), 2**64]),
        lambda: rng.choice([0.5, -0.0, 1e308, float("inf"), float("nan"), 3.7]),
        lambda: rng.choice(["", "two", "high", "0", "[/]", "\udcff", "x" * 5000, "a." * 3000]),
        lambda: [], lambda: {}, lambda: "concat", lambda: rng.choice([[1, 2], [-3], [1.5, 2], ["a"]]),
        lambda: [_junk(rng, depth + 1) for _ in range(rng.randrange(4))],
        lambda: {rng.choice(["a", "dim", "sizes", "shape"]): _junk(rng, depth + 1) for _ in range(rng.randrange(3))},
        lambda: _nested(rng.choice([10, 100, 3000])),
    ][kind]()


def _nested(depth: int) -> Any:
    value: Any = 0
    for i in range(depth):
        value = [value] if i % 2 else {"x": value}
    return value


def _dumps(obj: Any) -> bytes:
    import sys

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20000))  # json.dumps recurses into deep junk
    try:
        return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
    finally:
        sys.setrecursionlimit(limit)


def _brief(value: Any) -> str:
    """A short description of a junk value (repr would recurse into a deep one)."""
    if isinstance(value, (dict, list)):
        return f"<{type(value).__name__} of {len(value)}>"
    return repr(value)[:20]


def _deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def _st_parts(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _st_join(header_bytes: bytes, body: bytes, *, delta: int = 0) -> bytes:
    return struct.pack("<Q", max(len(header_bytes) + delta, 0)) + header_bytes + body


def _byte_mutation(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    if not data:
        return b"\0", "empty->nul"
    op = rng.choice(["truncate", "flip", "insert", "delete", "zero"])
    pos = rng.randrange(len(data))
    if op == "truncate":
        return data[:pos], f"truncate at {pos}/{len(data)}"
    if op == "flip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        return bytes(out), "flip bits"
    if op == "insert":
        return data[:pos] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))) + data[pos:], f"insert at {pos}"
    if op == "delete":
        return data[:pos] + data[pos + rng.randint(1, 16):], f"delete at {pos}"
    n = rng.randint(1, 64)
    return data[:pos] + bytes(min(n, len(data) - pos)) + data[pos + n:], f"zero {n} at {pos}"


# ------------------------------------------------------------------------------------ checkpoints


_CKPT_SEEDS = ("source.safetensors", "source.pt", "legacy.pt", "lightning.ckpt", "tied.safetensors",
               "sharded_st", "sharded_pt")
_ST_SEEDS = ("source.safetensors", "tied.safetensors", "sharded_st/model-00001-of-00002.safetensors")


def _checkpoint_files(seeds: dict[str, bytes], which: str) -> tuple[dict[str, Any], str]:
    """The files of one seed checkpoint and the path to pass (a file, an index or a folder)."""
    if which.startswith("sharded"):
        files = {k: v for k, v in seeds.items() if k.startswith(which + "/")}
        index = next(k for k in files if k.endswith(".index.json"))
        return files, index if which == "sharded_st" else which
    return {which: seeds[which]}, which


def _header_edit(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    header, body = _st_parts(data)
    names = [n for n in header if n != "__metadata__"]
    name = rng.choice(names)
    info = header[name]
    op = rng.choice(["shape", "offsets", "dtype", "metadata", "nest", "length", "drop", "entry", "pad", "swap",
                     "twice"])
    if op == "shape":
        info["shape"] = rng.choice([[-1, 8], [8.5], ["8"], [[8]], None, "8", [2**40, 2**40], [0], [], [8] * 80])
    elif op == "offsets":
        begin, end = info["data_offsets"]
        info["data_offsets"] = rng.choice([[end, begin], [begin, end + 4], [begin + 4, end + 4], [-8, end],
                                           [begin, 2**63], [0, end - begin], [begin], "0-8", [begin, end, 3],
                                           [float(begin), float(end)]])
    elif op == "dtype":
        info["dtype"] = rng.choice(["C64", "F4", "", None, 7, "f32", "BOOL", "U64"])
    elif op == "metadata":
        header["__metadata__"] = rng.choice([True, 7, [], {"a": {"b": "c"}}, {"a": 1}, {"format": None},
                                             {"weight_mapper.aliases": "{"},
                                             {"weight_mapper.aliases": json.dumps({"x": "nope"})},
                                             {"weight_mapper.aliases": json.dumps({names[0]: names[1]})},
                                             {"weight_mapper.aliases": json.dumps([1, 2])}])
    elif op == "nest":
        depth = rng.choice([100, 1000, 5000])
        text = json.dumps(header)[:-1] + f', "deep": {_deep_json(depth)}}}'
        return _st_join(text.encode(), body), f"header nested {depth}"
    elif op == "twice":  # one name given twice: json.loads would keep the later silently
        text = _dumps(header)[:-1] + b", " + json.dumps(name).encode() + b": " + _dumps(info) + b"}"
        return _st_join(text, body), f"header names {name} twice"
    elif op == "length":
        delta = rng.choice([-3, -1, 1, 3, 8, 10**6])
        return _st_join(_dumps(header), body, delta=delta), f"header length {delta:+d}"
    elif op == "drop":
        del header[name]
    elif op == "entry":
        header[name] = rng.choice([None, [], "x", 1, {"dtype": "F32"}])
    elif op == "pad":
        text = _dumps(header) + b" " * rng.randint(1, 7)
        return _st_join(text, body), "header padded"
    else:  # two tensors swap offsets (sizes may then disagree)
        other = rng.choice(names)
        info["data_offsets"], header[other]["data_offsets"] = header[other]["data_offsets"], info["data_offsets"]
    return _st_join(_dumps(header), body), f"header {op} of {name}"


def _pickle_edit(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """Damage the pickle of a torch file: ``data.pkl`` inside the zip, or the legacy stream."""
    if not data.startswith(b"PK"):
        return _byte_mutation(rng, data)
    src = zipfile.ZipFile(io.BytesIO(data))
    names = src.namelist()
    pkl = next(n for n in names if n.endswith("data.pkl"))
    raw = src.read(pkl)
    op = rng.choice(["bytes", "string", "int", "drop_record", "storage_key"])
    if op == "bytes":
        raw, what = _byte_mutation(rng, raw)
    elif op == "string":  # rename a key: a BINUNICODE string in place
        start = raw.find(b"X", rng.randrange(len(raw)))
        raw, what = (raw[:start + 5] + b"\xff" + raw[start + 6:], "string byte") if start > 0 else (raw, "none")
    elif op == "int":  # a BININT1/BININT2 (shape, stride, offset) changed
        i = raw.find(b"K", rng.randrange(len(raw)))
        raw, what = (raw[:i + 1] + bytes([rng.randrange(256)]) + raw[i + 2:], "int") if i > 0 else (raw, "none")
    else:
        what = op
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for n in names:
            if op == "drop_record" and "/data/" in n and rng.random() < 0.5:
                continue
            if op == "storage_key" and "/data/" in n:
                dst.writestr(n.replace("/data/", "/data/9"), src.read(n))
                continue
            dst.writestr(n, raw if n == pkl else src.read(n))
    return out.getvalue(), f"pickle {what}"


class _Payload:
    """Pickles to a call of ``func(*args)``: what a malicious checkpoint does on load."""

    def __init__(self, func: Any, args: tuple):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payload(rng: random.Random, marker: str) -> tuple[Any, str]:
    import builtins
    import subprocess

    kind = rng.choice(["os.system", "posix.system", "exec", "eval", "subprocess", "open"])
    cmd = f"touch {marker}"
    payload = {
        "os.system": lambda: _Payload(os.system, (cmd,)),
        "posix.system": lambda: _Payload(__import__("posix").system, (cmd,)),
        "exec": lambda: _Payload(builtins.exec, (f"open({marker!r}, 'w').close()",)),
        "eval": lambda: _Payload(builtins.eval, (f"open({marker!r}, 'w').close()",)),
        "subprocess": lambda: _Payload(subprocess.call, (["touch", marker],)),
        "open": lambda: _Payload(builtins.open, (marker, "w")),
    }[kind]()
    return payload, kind


def _payload_files(rng: random.Random, seeds: dict[str, bytes], marker: str) -> tuple[dict[str, Any], str, str]:
    import torch

    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    sd = {n: torch.randn(s, generator=gen) for n, s in _SOURCE_SHAPES.items()}
    payload, kind = _payload(rng, marker)
    placement = rng.choice(["top", "value", "envelope", "legacy", "indexed_shard", "folder_shard"])

    def save(obj: Any, *, legacy: bool = False) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
        return buf.getvalue()

    detail = f"{kind} in {placement}"
    if placement == "top":
        return {"evil.pt": save(payload)}, "evil.pt", detail
    if placement == "value":
        return {"evil.pt": save({**sd, "evil": payload})}, "evil.pt", detail
    if placement == "envelope":
        return {"evil.ckpt": save({"state_dict": sd, "callbacks": payload})}, "evil.ckpt", detail
    if placement == "legacy":
        return {"evil.pt": save({**sd, "evil": payload}, legacy=True)}, "evil.pt", detail
    files = {k: v for k, v in seeds.items() if k.startswith("sharded_pt/")}
    shard = "sharded_pt/pytorch_model-00002-of-00002.bin"
    files[shard] = save({**{n: sd[n] for n in list(sd)[len(sd) // 2:]}, "evil": payload})
    if placement == "indexed_shard":
        return files, "sharded_pt/pytorch_model.bin.index.json", detail
    del files["sharded_pt/pytorch_model.bin.index.json"]
    return files, "sharded_pt", detail


def _structure_files(rng: random.Random) -> tuple[dict[str, Any], str, str]:
    import sys

    import torch

    t = torch.ones(2, 2)
    kind = rng.choice(["int_and_str_keys", "nested_tensor", "sparse", "deep_dict", "deep_envelope", "list",
                       "tensor", "no_tensors", "tuple_keys", "many_state_dicts", "bool_keys", "empty_dict",
                       "deep_list_value", "huge_shape_meta", "quantized", "complex32", "meta", "zero_dim",
                       "many_dims"])
    obj: Any
    if kind == "int_and_str_keys":
        obj = {1: t, "1": t.clone(), "fc.weight": t.clone()}
    elif kind == "nested_tensor":
        obj = {"w": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]), "b": t}
    elif kind == "sparse":
        obj = {"w": t.to_sparse(), "b": t.clone()}
    elif kind == "deep_dict":
        obj = {"w": t}
        for _ in range(1000):
            obj = {"state_dict": obj}
    elif kind == "deep_envelope":
        deep: Any = 1
        for _ in range(rng.choice([150, 1000, 3000])):
            deep = {"x": deep}
        obj = {"state_dict": {"w": t}, "hyper_parameters": deep}
    elif kind == "list":
        obj = [t, t]
    elif kind == "tensor":
        obj = t
    elif kind == "no_tensors":
        obj = {"epoch": 3, "lr": 0.1}
    elif kind == "tuple_keys":
        obj = {("a", 1): t, "b": t.clone()}
    elif kind == "many_state_dicts":
        obj = {"state_dict": {"w": t}, "model": {"w": t.clone()}}
    elif kind == "bool_keys":
        obj = {True: t, "True": t.clone()}
    elif kind == "empty_dict":
        obj = {}
    elif kind == "deep_list_value":
        deep = 0
        for _ in range(2000):
            deep = [deep]
        obj = {"w": t, "extra": deep}
    elif kind == "quantized":
        obj = {"w": torch.quantize_per_tensor(torch.ones(2, 2), 0.1, 0, torch.qint8), "b": t}
    elif kind == "complex32":
        obj = {"w": torch.ones(2, dtype=torch.complex32), "b": t}
    elif kind == "meta":
        obj = {"w": torch.empty(2, 2, device="meta"), "b": t}
    elif kind == "zero_dim":
        obj = {"w": torch.tensor(3.0), "b": t}
    elif kind == "many_dims":
        obj = {"w": torch.ones([1] * 40), "b": t}
    else:
        obj = {"w": torch.empty(0, 2**20), "b": t}
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)
    try:
        buf = io.BytesIO()
        torch.save(obj, buf)
    finally:
        sys.setrecursionlimit(limit)
    return {"odd.pt": buf.getvalue()}, "odd.pt", kind


_HOSTILE_NAMES = {
    "5000 chars": lambda: "w" * 5000,
    "50000 levels": lambda: "a." * 50000 + "weight",
    "1200 levels": lambda: "a." * 1200 + "weight",
    "999 levels": lambda: "a." * 998 + "weight",
    "lone surrogate": lambda: "layers.\udcff.weight",
    "markup": lambda: "[/]layers.[bold red]0[/bold red].weight",
    "control": lambda: "layers.0\x1b[2J\x07.weight",
    "empty": lambda: "",
    "dots": lambda: "..",
    "nul": lambda: "a\0b.weight",
    "leading dot": lambda: ".weight",
    "unicode": lambda: "слой.0.вес",
}


def _names_files(rng: random.Random) -> tuple[dict[str, Any], str, str]:
    import torch
    from safetensors.torch import save as st_save

    kind = rng.choice(sorted(_HOSTILE_NAMES))
    bad = _HOSTILE_NAMES[kind]()
    sd = {n: torch.randn(s) for n, s in _SOURCE_SHAPES.items()}
    sd[bad] = torch.ones(3)
    if rng.random() < 0.3:  # many deep names at once
        for i in range(rng.choice([5, 20])):
            sd[f"m{i}." + "b." * 999 + "w"] = torch.ones(1)
    fmt = rng.choice(["safetensors", "torch"])
    if fmt == "safetensors":
        try:
            return {"names.safetensors": st_save(sd)}, "names.safetensors", f"{kind} (safetensors)"
        except Exception:  # noqa: BLE001 - safetensors cannot encode a lone surrogate: write torch
            pass
    buf = io.BytesIO()
    torch.save(sd, buf)
    return {"names.pt": buf.getvalue()}, "names.pt", f"{kind} (torch)"


def _index_files(rng: random.Random, seeds: dict[str, bytes]) -> tuple[dict[str, Any], str, str]:
    which = rng.choice(["sharded_st", "sharded_pt"])
    files, _ = _checkpoint_files(seeds, which)
    index_name = next(k for k in files if k.endswith(".index.json"))
    index = json.loads(files[index_name])
    weight_map = index["weight_map"]
    name = rng.choice(list(weight_map))
    shard = weight_map[name]
    op = rng.choice(["outside", "absolute", "dev_zero", "fifo_shard", "fifo_index", "index_dev_zero",
                     "shard_symlink_dev_zero", "not_dict", "value_int", "extra_name", "missing_shard",
                     "nested", "not_utf8", "no_weight_map", "subfolder", "moved_name", "empty_name",
                     "shard_is_folder"])
    path = index_name
    if op == "outside":
        weight_map[name] = "../" + shard
        files[shard] = seeds[f"{which}/{shard}"]  # a copy next to the folder
    elif op == "absolute":
        weight_map[name] = rng.choice(["/etc/passwd", "/dev/zero", "/proc/self/mem"])
    elif op == "dev_zero":
        weight_map[name] = "zero.safetensors"
        files[f"{which}/zero.safetensors"] = {"symlink": "/dev/zero"}
    elif op == "fifo_shard":
        files[f"{which}/{shard}"] = {"fifo": True}
    elif op == "fifo_index":
        files[index_name] = {"fifo": True}
        return files, rng.choice([index_name, which]), f"index {op}"
    elif op == "index_dev_zero":
        files[index_name] = {"symlink": "/dev/zero"}
        return files, rng.choice([index_name, which]), f"index {op}"
    elif op == "shard_symlink_dev_zero":
        files[f"{which}/{shard}"] = {"symlink": "/dev/zero"}
    elif op == "not_dict":
        index["weight_map"] = rng.choice([[name, shard], "x", None, 3])
    elif op == "value_int":
        weight_map[name] = 1
    elif op == "extra_name":
        weight_map["ghost.weight"] = shard
    elif op == "missing_shard":
        del files[f"{which}/{shard}"]
    elif op == "nested":
        text = json.dumps(index)[:-1] + f', "deep": {_deep_json(rng.choice([1000, 5000]))}}}'
        files[index_name] = text.encode()
        return files, path, f"index {op}"
    elif op == "not_utf8":
        files[index_name] = b"\xff\xfe" + files[index_name]
        return files, path, f"index {op}"
    elif op == "no_weight_map":
        index = {"metadata": {}}
    elif op == "subfolder":
        weight_map[name] = "sub/" + shard
    elif op == "moved_name":
        weight_map[name] = [s for s in set(weight_map.values()) if s != shard][0]
    elif op == "empty_name":
        weight_map[name] = ""
    else:
        files[f"{which}/{shard}/x"] = b"folder"
        del files[f"{which}/{shard}"]
    files[index_name] = json.dumps(index).encode()
    return files, path, f"index {op}"


def _checkpoint_case(rng: random.Random, seeds: dict[str, bytes], mutation: str, marker: str
                     ) -> tuple[dict[str, Any], str, str]:
    """Files and the path to read for one checkpoint mutation."""
    if mutation == "bytes":
        which = rng.choice(_CKPT_SEEDS)
        files, path = _checkpoint_files(seeds, which)
        victim = rng.choice(sorted(files))
        files[victim], what = _byte_mutation(rng, files[victim])
        return files, path, f"{victim}: {what}"
    if mutation == "header":
        victim = rng.choice(_ST_SEEDS)
        files, path = _checkpoint_files(seeds, "sharded_st" if "/" in victim else victim)
        files[victim], what = _header_edit(rng, seeds[victim])
        return files, path, f"{victim}: {what}"
    if mutation == "pickle":
        victim = rng.choice(["source.pt", "legacy.pt", "lightning.ckpt", "sharded_pt/pytorch_model-00001-of-00002.bin"])
        files, path = _checkpoint_files(seeds, "sharded_pt" if "/" in victim else victim)
        files[victim], what = _pickle_edit(rng, seeds[victim])
        return files, path, f"{victim}: {what}"
    if mutation == "payload":
        return _payload_files(rng, seeds, marker)
    if mutation == "structure":
        return _structure_files(rng)
    if mutation == "names":
        return _names_files(rng)
    if mutation == "index":
        return _index_files(rng, seeds)
    if mutation == "fifo":
        kind = rng.choice(["fifo", "dev_zero"])
        name = rng.choice(["model.safetensors", "model.pt"])
        return {name: {"fifo": True} if kind == "fifo" else {"symlink": "/dev/zero"}}, name, f"checkpoint is {kind}"
    raise ValueError(mutation)


# ------------------------------------------------------------------------------------ plans


def _plan_edit(rng: random.Random, seeds: dict[str, bytes]) -> tuple[dict[str, Any], str, str, str]:
    """A damaged plan, and the seed checkpoint it belongs to."""
    name, source = rng.choice([("plan.json", "source.safetensors"), ("combo_plan.json", "combo.safetensors"),
                               ("fused_plan.json", "fused.safetensors")])
    plan = json.loads(seeds[name])
    op = rng.choice(["replace", "replace", "replace", "delete", "args", "args", "duplicate", "nest", "top",
                     "bytes", "entry_type"])
    entries = plan["entries"]
    i = rng.randrange(len(entries))
    entry = entries[i]
    if op == "replace":  # any field of an entry replaced by junk
        key = rng.choice(sorted(entry))
        entry[key] = _junk(rng)
        what = f"entry {i} {key}"
    elif op == "delete":
        key = rng.choice(sorted(entry))
        del entry[key]
        what = f"entry {i} without {key}"
    elif op == "args":
        args = entry.setdefault("args", {})
        key = rng.choice(["dim", "parts", "concat_dim", "sizes", "start", "length", "index", "shape", "source_shapes"])
        if rng.random() < 0.3 and key in args:
            del args[key]
            what = f"entry {i} args.{key} removed"
        else:
            args[key] = rng.choice([0, -1, 1, 2, 5, 99, -99, "two", None, [], [1], [0, 0], [2**40], 1.5,
                                    _junk(rng)])
            what = f"entry {i} args.{key}={_brief(args[key])}"
        if rng.random() < 0.3:
            entry["transform"] = rng.choice(["concat", "stack", "slice", "index", "stack_concat", "slice_index",
                                             "reshape", "transpose", None, "rotate"])
            what += f" transform {entry['transform']}"
    elif op == "duplicate":
        entries.append(dict(entry, source=rng.choice([entry["source"], entries[0]["source"]])))
        what = f"entry {i} twice"
    elif op == "nest":
        text = json.dumps(plan)[:-1] + f', "deep": {_deep_json(rng.choice([100, 1000, 5000, 50000]))}}}'
        return {name: text.encode()}, name, source, "plan nested"
    elif op == "top":
        key = rng.choice(["version", "threshold", "entries", "ambiguous", "unmatched_source", "weights", "rounds",
                          "strategy", "converged", "format", "source_prefix"])
        plan[key] = rng.choice([[1], "high", -1, 2, None, {}, [[]], 99, "x", [1, 2, 3], _junk(rng)])
        what = f"{key}={_brief(plan[key])}"
    elif op == "bytes":
        data, what = _byte_mutation(rng, seeds[name])
        return {name: data}, name, source, what
    else:
        entries[i] = rng.choice(["x", 3, [1, 2], None, []])
        what = f"entry {i} is a {type(entries[i]).__name__}"
    return {name: _dumps(plan)}, name, source, f"{name}: {what}"


# ------------------------------------------------------------------------------------ cases


def make_case(rng: random.Random, seeds: dict[str, bytes], *, entry: str | None = None,
              mutation: str | None = None, marker: str = "/tmp/weight_mapper_fuzz_marker") -> Case:
    """Draw one case: an entry point, a mutation that applies to it, and its files."""
    if entry is None:
        wanted = {"fifo": "index"}.get(mutation, mutation)
        entry = rng.choice([e for e in ENTRY_POINTS if mutation is None or wanted in _ENTRY2MUTATIONS[e]])
    if mutation is None:
        mutation = rng.choice(_ENTRY2MUTATIONS[entry])
        if mutation == "index" and rng.random() < 0.2:
            mutation = "fifo"  # the checkpoint itself is not a regular file
    if mutation == "plan":
        files, plan, source, detail = _plan_edit(rng, seeds)
        files[source] = seeds[source]
        return Case(entry, mutation, detail, files, {"plan": plan, "source": source})
    files, path, detail = _checkpoint_case(rng, seeds, mutation, marker)
    args: dict[str, Any] = {"checkpoint": path}
    if entry == "cli_map":
        files["target.safetensors"] = seeds["target.safetensors"]
        args["target"] = "target.safetensors"
        args["extra"] = rng.choice([[], ["--json"], ["--tree"], ["--html", "review.html", "--rules", "rules.json"]])
    elif entry == "cli_apply":
        files["plan.json"] = seeds["plan.json"]
        args["plan"] = "plan.json"
    elif entry == "cli_inspect":
        args["extra"] = rng.choice([[], ["--json"], ["--depth", "9"]])
    return Case(entry, mutation, detail, files, args)


def write_case(case: Case, folder: Path) -> None:
    """Create the case's files (FIFOs and symlinks included) under ``folder``."""
    for rel, data in case.files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, dict):
            if data.get("fifo"):
                os.mkfifo(path)
            else:
                os.symlink(data["symlink"], path)
        else:
            path.write_bytes(data)


def pickle_case(case: Case) -> bytes:
    """A case for another process."""
    return pickle.dumps(case)
