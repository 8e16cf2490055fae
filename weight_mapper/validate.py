"""Checks at the edge: every file weight_mapper reads is validated once, when it is read.

Plans, safetensors headers and shard indexes are untrusted input. This module holds their
schemas and the bounds that keep hostile input cheap: names are length- and depth-bounded,
JSON nesting is bounded *before* it is parsed, and files are opened only when they are regular
files. Inner checks raise :class:`Invalid` with a short reason; the reader that called them
re-raises it once as its own error (:class:`~weight_mapper.errors.PlanError`,
:class:`~weight_mapper.errors.CheckpointError`, ...) with the file's name.

>>> check_name("layers.0.weight")
>>> check_name("x" * 5000)
Traceback (most recent call last):
...
weight_mapper.validate.Invalid: name 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...' (5000 characters) is longer than 4096 characters
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "Invalid",
    "MAX_NAME_CHARS",
    "MAX_NAME_PARTS",
    "MAX_JSON_DEPTH",
    "MAX_INDEX_BYTES",
    "MAX_ENVELOPE_DEPTH",
    "check_name",
    "check_names",
    "loads_json",
    "require_regular_file",
    "check_safetensors_header",
    "check_plan_dict",
    "check_envelope_depth",
    "short",
]

#: A tensor or module name longer than this is refused (real names are < 200 characters).
MAX_NAME_CHARS = 4096
#: A name with more dotted components than this is refused (real models nest < 30 deep).
MAX_NAME_PARTS = 1000
#: Deepest JSON nesting accepted in plans, headers and indexes (a plan nests 5 deep).
MAX_JSON_DEPTH = 64
#: Largest shard index read (the index of a 1,000-shard, 1M-tensor model is ~80 MB).
MAX_INDEX_BYTES = 256 * 2**20
#: Deepest nesting of dicts / lists accepted in a torch checkpoint's envelope.
MAX_ENVELOPE_DEPTH = 100
#: Most dimensions a tensor shape may claim (torch itself allows 64).
MAX_NDIM = 64

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


class Invalid(ValueError):
    """What is wrong with an input, in a few words; the caller adds which file it was."""


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: a hostile name never floods a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


# ------------------------------------------------------------------------------------ names


def check_name(name: Any, what: str = "name") -> None:
    """Refuse a tensor or module name that is not a str, or is longer or deeper than the bounds.

    Raises:
        Invalid: naming the offending name (shortened) and the bound.
    """
    if not isinstance(name, str):
        raise Invalid(f"{what} {short(name)} is a {type(name).__name__}, not a str")
    if len(name) > MAX_NAME_CHARS:
        raise Invalid(f"{what} {short(name)} ({len(name)} characters) is longer than {MAX_NAME_CHARS} characters")
    n_parts = name.count(".") + 1
    if n_parts > MAX_NAME_PARTS:
        raise Invalid(f"{what} {short(name)} has {n_parts} dotted components, more than {MAX_NAME_PARTS}")


def check_names(names: Any, what: str = "tensor name") -> None:
    """:func:`check_name` on each of ``names``."""
    for name in names:
        check_name(name, what)


# ------------------------------------------------------------------------------------ JSON


def json_depth(text: str) -> int:
    """The deepest nesting of ``[`` / ``{`` in JSON ``text``, brackets inside strings ignored."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    depth = deepest = 0
    for char in brackets:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise Invalid(f"key {short(twice)} appears twice in one object (the later would silently win)")
    return out


def loads_json(data: str | bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that refuses nesting deeper than ``max_depth`` before parsing it, and
    duplicate keys (``json.loads`` keeps the last one: a tensor or an entry field would be dropped).

    Raises:
        Invalid: the text is not UTF-8, not JSON, nested too deep, or repeats a key.
    """
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Invalid(f"not UTF-8 text ({e})") from None
    depth = json_depth(data)
    if depth > max_depth:
        raise Invalid(f"JSON nested {depth} levels deep (more than {max_depth})")
    try:
        return json.loads(data, object_pairs_hook=_unique_keys)
    except RecursionError:  # only if the scan above missed something
        raise Invalid(f"JSON nested more than {max_depth} levels deep") from None
    except ValueError as e:
        raise Invalid(f"not valid JSON ({e})") from None


# ------------------------------------------------------------------------------------ files


def require_regular_file(path: Path, *, max_bytes: int | None = None) -> int:
    """Refuse, *before* opening it, a path that is not a regular file (a FIFO, a device...).

    Symlinks are followed (Hugging Face caches link to blobs), but what they point at must
    be a regular file too. Returns the file's size.

    Raises:
        Invalid: naming the kind of file found, or its size when over ``max_bytes``.
        OSError: the path cannot be examined.
    """
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else
                "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
                "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise Invalid(f"it is {kind}, not a regular file")
    size = os.stat(path).st_size
    if max_bytes is not None and size > max_bytes:
        raise Invalid(f"it is {size:,} bytes, more than the {max_bytes:,} accepted for this kind of file")
    return size


def check_shard_name(name: str) -> None:
    """A shard file named by an index must be a plain file name inside the index's folder."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or os.path.isabs(name):
        raise Invalid(f"shard {short(name)} is not a file name inside the index's folder")


# ------------------------------------------------------------------------------------ safetensors


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_safetensors_header(header: Any, n_data: int, itemsizes: Mapping[str, int]
                             ) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """Validate a parsed safetensors header against the size of the file's data section.

    The same rules the safetensors library applies when it reads data, checked up front so
    that ``inspect`` and ``map`` refuse a damaged file instead of ``apply`` failing later:
    every entry has a known ``dtype``, a ``shape`` of non-negative ints and ``data_offsets``
    ``[begin, end]`` of exactly the bytes that shape needs; the tensors tile the data section
    with no gap or overlap; ``__metadata__`` is a flat ``str -> str`` map.

    Args:
        header: the parsed JSON header.
        n_data: bytes after the header.
        itemsizes: dtype name -> bytes per element, for the dtypes the reader can read.

    Returns:
        ``({name: (dtype name, shape)}, metadata)``.

    Raises:
        Invalid: naming the entry and what is wrong with it.
    """
    if not isinstance(header, dict):
        raise Invalid(f"the header is a JSON {type(header).__name__}, not an object")
    metadata = header.get("__metadata__", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise Invalid(f"__metadata__ is a {type(metadata).__name__}, not an object of strings")
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise Invalid(f"__metadata__ must map strings to strings, but {', '.join(map(short, bad[:3]))} "
                      f"{'is not a string' if len(bad) == 1 else 'are not strings'}")
    name2spec: dict[str, tuple[str, tuple[int, ...]]] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        check_name(name, "tensor name")
        if not isinstance(info, dict):
            raise Invalid(f"entry {short(name)} is a {type(info).__name__}, not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str):
            raise Invalid(f"entry {short(name)} has no dtype string")
        if dtype not in itemsizes:
            raise Invalid(f"entry {short(name)} has dtype {short(dtype)}, which weight_mapper cannot read; "
                          "convert it to a torch dtype")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(d) and d >= 0 for d in shape):
            raise Invalid(f"entry {short(name)} has shape {short(shape)}: expected a list of at most {MAX_NDIM} "
                          "non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise Invalid(f"entry {short(name)} has data_offsets {short(offsets)}: expected [begin, end] "
                          "with 0 <= begin <= end")
        begin, end = offsets
        if end > n_data:
            raise Invalid(f"tensor {short(name)} ends at byte {end} but the data section has {n_data} bytes")
        n_bytes = math.prod(shape) * itemsizes[dtype]
        if end - begin != n_bytes:
            raise Invalid(f"tensor {short(name)} has {end - begin} bytes for shape {shape} {dtype} "
                          f"({n_bytes} expected)")
        name2spec[name] = (dtype, tuple(shape))
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise Invalid(f"tensor {short(name)} starts at byte {begin}, but the previous tensor ends at "
                          f"byte {position} ({'overlap' if begin < position else 'gap'})")
        position = end
    if position != n_data:
        raise Invalid(f"the tensors end at byte {position} of a {n_data}-byte data section "
                      f"({n_data - position} trailing bytes belong to no tensor)")
    return name2spec, dict(metadata)


# ------------------------------------------------------------------------------------ plans


def _field(entry: Mapping[str, Any], name: str, ok, expected: str, *, required: bool = False) -> Any:
    if name not in entry:
        if required:
            raise Invalid(f"field {name!r} is missing")
        return None
    value = entry[name]
    if not ok(value):
        raise Invalid(f"field {name!r} is {short(value)}: expected {expected}")
    return value


def _shape(x: Any) -> bool:
    return isinstance(x, list) and len(x) <= MAX_NDIM and all(_is_int(d) and d >= 0 for d in x)


def _str_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(s, str) for s in x)


def is_int(x: Any) -> bool:
    """An integer that is not a bool (JSON's ``true`` is not a dimension)."""
    return _is_int(x)


def axis_index(dim: int, ndim: int, what: str, *, extra: int = 0) -> int:
    """``dim`` normalised against ``ndim`` (+ ``extra`` for stack's new axis), else Invalid."""
    n = ndim + extra
    if not -n <= dim < n:
        raise Invalid(f"args.{what} = {dim} is out of range for {ndim}-D tensors")
    return dim % n


def _check_transform(op: str, transform: Any, args: Mapping[str, Any], n_src: int, src_shape: list | None,
                     tgt_shape: list | None) -> None:
    """Transform arguments: types and ranges here; the transform's own ``required_args`` and
    ``check_args`` (:mod:`weight_mapper.transforms`) say what it needs and how its arguments
    must agree with the shapes the entry claims."""
    for name in transform.required_args:
        if name not in args:
            raise Invalid(f"transform {op!r} needs args.{name}")
    for name in ("dim", "start", "length", "index", "concat_dim", "parts"):
        if name in args and not _is_int(args[name]):
            raise Invalid(f"args.{name} is {short(args[name])}: expected an integer")
    for name in ("start", "length", "index"):
        if name in args and args[name] < 0:
            raise Invalid(f"args.{name} is {args[name]}: expected an integer >= 0")
    if "sizes" in args and not _shape(args["sizes"]):
        raise Invalid(f"args.sizes is {short(args['sizes'])}: expected a list of integers >= 0")
    if "source_shapes" in args and not (isinstance(args["source_shapes"], list)
                                        and len(args["source_shapes"]) == n_src
                                        and all(_shape(s) for s in args["source_shapes"])):
        raise Invalid(f"args.source_shapes must be one shape per source ({n_src})")
    if not transform.many_sources and n_src != 1:
        raise Invalid(f"transform {op!r} takes one source, the entry has {n_src}")
    dim = args.get("dim", 0)
    if not _is_int(dim):
        raise Invalid(f"args.dim is {short(dim)}: expected an integer")
    if "transposed" in args:  # concat / slice of a fused [in, out] weight: the sizes run along its transpose
        if not isinstance(args["transposed"], bool):
            raise Invalid(f"args.transposed is {short(args['transposed'])}: expected true or false")
        if args["transposed"]:
            if not transform.transposable:
                raise Invalid(f"args.transposed applies to concat and slice, not {op!r}")
            if transform.many_sources and tgt_shape is not None:
                if len(tgt_shape) != 2:
                    raise Invalid(f"a transposed {op} needs a 2-D target_shape, got {tgt_shape}")
                tgt_shape = tgt_shape[::-1]
            if not transform.many_sources and src_shape is not None:
                if len(src_shape) != 2:
                    raise Invalid(f"a transposed {op} needs a 2-D source_shape, got {src_shape}")
                src_shape = src_shape[::-1]
    if transform.check_args is not None:
        transform.check_args(args, n_src, src_shape, tgt_shape)


def check_plan_entry(entry: Any, known_transforms: Any) -> None:
    """One plan entry: field types, ranges, and transform arguments consistent with its shapes.

    Raises:
        Invalid: naming the field.
    """
    if not isinstance(entry, dict):
        raise Invalid(f"it is a {type(entry).__name__}, not an object")
    source = _field(entry, "source", lambda x: isinstance(x, str) or (_str_list(x) and len(x) > 0),
                    "a source name or a non-empty list of names", required=True)
    sources = [source] if isinstance(source, str) else source
    for name in sources:
        check_name(name, "source name")
    check_name(_field(entry, "target", lambda x: isinstance(x, str), "a target name", required=True), "target name")
    op = _field(entry, "transform", lambda x: x is None or isinstance(x, str), "null or a transform name")
    if op is not None and op not in known_transforms:
        raise Invalid(f"field 'transform' is {short(op)}, not a known transform ({', '.join(sorted(known_transforms))})")
    for name in ("score", "margin"):
        _field(entry, name, lambda x: _is_number(x) and not math.isnan(x), "a number")
    for name in ("level", "provenance"):
        _field(entry, name, lambda x: isinstance(x, str), "a string")
    src_shape = _field(entry, "source_shape", _shape, "a list of integers >= 0")
    tgt_shape = _field(entry, "target_shape", _shape, "a list of integers >= 0")
    _field(entry, "components", lambda x: isinstance(x, dict) and all(v is None or _is_number(v) for v in x.values()),
           "an object of numbers")
    _field(entry, "flags", _str_list, "a list of strings")
    args = _field(entry, "args", lambda x: isinstance(x, dict), "an object") or {}
    op = op or "identity"
    _check_transform(op, known_transforms[op], args, len(sources), src_shape, tgt_shape)


def check_plan_dict(data: Any, *, version: int, known_transforms: Any) -> None:
    """A whole plan, as parsed from JSON: the top-level fields, then every entry.

    Raises:
        Invalid: naming the field, or the entry (index and target) and its field. Two entries
            for one target are an error naming both.
    """
    if not isinstance(data, dict) or data.get("format") != "weight_mapper.plan" or "entries" not in data:
        raise Invalid("not a weight_mapper plan: expected a JSON object with format 'weight_mapper.plan'")
    v = _field(data, "version", _is_int, "an integer")
    if v is not None and v > version:
        raise Invalid(f"plan format version {v} is newer than this weight_mapper understands ({version}); "
                      "upgrade weight-mapper")
    for name in ("entries", "ambiguous"):
        _field(data, name, lambda x: isinstance(x, list), "a list of entries")
    for name in ("unmatched_source", "unmatched_target"):
        for n in _field(data, name, _str_list, "a list of names") or ():
            check_name(n, f"{name} name")
    for name in ("strategy", "source_label", "target_label", "source_prefix"):
        _field(data, name, lambda x: isinstance(x, str), "a string")
    _field(data, "threshold", lambda x: _is_number(x) and 0 <= x <= 1, "a number in [0, 1]")
    _field(data, "weights", lambda x: isinstance(x, dict) and all(_is_number(w) for w in x.values()),
           "an object of numbers")
    _field(data, "rounds", lambda x: isinstance(x, list) and len(x) == 2 and all(_is_int(r) and r >= 0 for r in x),
           "two integers >= 0")
    _field(data, "converged", lambda x: isinstance(x, bool), "true or false")
    for name in ("entries", "ambiguous"):
        target2index: dict[str, int] = {}
        for i, entry in enumerate(data.get(name, ())):
            target = entry.get("target") if isinstance(entry, dict) else None
            where = f"{'' if name == 'entries' else 'withheld '}entry {i}" + \
                (f" (target {short(target)})" if isinstance(target, str) else "")
            try:
                check_plan_entry(entry, known_transforms)
            except Invalid as e:
                raise Invalid(f"malformed plan {where}: {e}") from None
            if name == "entries":
                if target in target2index:
                    raise Invalid(f"entries {target2index[target]} and {i} both fill target {short(target)}; "
                                  "a target can be filled once: remove one of them")
                target2index[target] = i


# ------------------------------------------------------------------------------------ envelopes


def check_envelope_depth(obj: Any, *, max_depth: int = MAX_ENVELOPE_DEPTH) -> None:
    """Refuse containers nested deeper than ``max_depth`` (saving them would recurse that deep).

    Walks iteratively, so a hostile envelope cannot exhaust the stack here.

    Raises:
        Invalid: naming the key path to the deepest point reached.
    """
    stack: list[tuple[Any, int, str]] = [(obj, 0, "")]
    seen: set[int] = set()
    while stack:
        value, depth, where = stack.pop()
        if isinstance(value, (dict, list, tuple, set)):
            if id(value) in seen:
                continue
            seen.add(id(value))
            if depth >= max_depth:
                raise Invalid(f"the envelope nests more than {max_depth} levels deep (at {short(where, 80)})")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in items:
                if isinstance(v, (dict, list, tuple, set)):
                    stack.append((v, depth + 1, f"{where}[{short(k, 20)}]"))
