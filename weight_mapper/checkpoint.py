"""Read and write checkpoints safely: the first stage of the pipeline.

A checkpoint on disk is a torch pickle (``.pt``/``.pth``/``.bin``/``.ckpt``), a safetensors
file, or a folder/index of shards of either. :func:`load_checkpoint` turns any of them into a
:class:`Checkpoint`, whose ``tensors`` are a read-only mapping that knows every name, shape and
dtype before any tensor data is read. :func:`save_checkpoint` writes atomically and never over
the source.

Torch files are read with ``weights_only=True``; files that need arbitrary code to unpickle
raise :class:`~weight_mapper.errors.UnsafeCheckpointError` unless the caller opts in with
``trust_pickle=True``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import secrets
import shutil
import socket
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import safetensors.torch
import torch
from safetensors import safe_open

from weight_mapper import validate
from weight_mapper.errors import CheckpointError, UnsafeCheckpointError

__all__ = [
    "Checkpoint",
    "TensorSource",
    "load_checkpoint",
    "load_checkpoint_as_dict",
    "unwrap_state_dict",
    "detect_wrapper_prefix",
    "save_checkpoint",
    "write_text_atomic",
    "refuse_overwrite",
    "temporary_path_for",
    "clean_stale_temporaries",
]

# Keys under which training frameworks keep the weights, in the order they are listed to users.
_STATE_DICT_KEYS = (
    "state_dict",  # Lightning, timm
    "model_state_dict",
    "model",
    "module",  # DeepSpeed
    "net",
    "network",
    "ema",
    "state_dict_ema",  # timm
    "model_ema",
)
# Prefixes that wrappers (DDP, torch.compile, a Lightning attribute) put in front of every name.
# "model." is ambiguous: Hugging Face models legitimately start with it.
_WRAPPER_PREFIXES = (
    "module._orig_mod.",
    "_orig_mod.module.",
    "model._orig_mod.",
    "module.",
    "_orig_mod.",
    "model.",
)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Unsigned 16/32/64-bit dtypes only exist from torch 2.3 on.
_SAFETENSORS_DTYPES.update({k: getattr(torch, n) for k, n in
                            {"U16": "uint16", "U32": "uint32", "U64": "uint64"}.items() if hasattr(torch, n)})
_WRITABLE_DTYPES = frozenset(_SAFETENSORS_DTYPES.values())
_ITEMSIZES = {name: dtype.itemsize for name, dtype in _SAFETENSORS_DTYPES.items()}
_MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
_ALIASES_KEY = "weight_mapper.aliases"  # safetensors metadata: {"dropped name": "kept name"}
_SAFETENSORS_SUFFIX = ".safetensors"


def output_format(path: str | Path) -> str:
    """What a converted checkpoint written at ``path`` is, by its name: the one rule saving follows.

    No suffix: a sharded safetensors folder; ``.safetensors``: one safetensors file; any other
    suffix (``.pt``, ``.bin``, ``.ckpt``): a torch file.

    >>> output_format("out"), output_format("out.safetensors"), output_format("out.pt")
    ('sharded-safetensors', 'safetensors', 'torch')
    """
    suffix = Path(path).suffix
    return "sharded-safetensors" if suffix == "" else "safetensors" if suffix == _SAFETENSORS_SUFFIX else "torch"
_TORCH_SHARD_SUFFIXES = (".bin", ".pt", ".pth")
# Files Hugging Face / Lightning training folders hold next to the weights; never shards.
_NOT_WEIGHT_FILES = re.compile(r"^(training_args\.bin|(optimizer|scheduler|scaler)\.pt|rng_state.*\.pth)$")
# torch's weights-only unpickler words a refusal to run code like this (anything else is corruption).
_REFUSAL_PATTERNS = (
    re.compile(r"GLOBAL (\S+)"),
    re.compile(r"Unsupported class (\S+)"),  # older torch wording
    re.compile(r"reduce for unrecognized function (.+?)(?: which belongs|$)", re.M),
    re.compile(r"new object for nn\.Parameter .* but got (.+)$", re.M),
    re.compile(r"Can only build Tensor.* but got (.+)$", re.M),
    re.compile(r"(\S+) must be imported to load"),
)
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")

_Spec = tuple[tuple[int, ...], torch.dtype]


class TensorSource(Mapping[str, torch.Tensor]):
    """A read-only ``name -> tensor`` mapping that knows shapes and dtypes before reading data.

    Subclasses only say how to read one tensor; everything else is answered from a table of
    ``name -> (shape, dtype)`` and ``name -> shard`` built when the checkpoint was opened.

    A source also answers the questions callers would otherwise ask of its format: which names
    are tied (:meth:`tie_groups`, :meth:`aliases`) and whether its order means anything
    (:attr:`ordered`). A new format is one subclass here.

    Example:
        >>> src = load_checkpoint("model.safetensors").tensors  # doctest: +SKIP
        >>> src.shapes()["fc.weight"]  # doctest: +SKIP
        (10, 4)
    """

    #: Whether the names come in the order the model defined its tensors (a pickled state dict
    #: or model). False for a source that sorts them (a safetensors header is sorted by name):
    #: order then says nothing, and the table puts rows in natural order instead.
    ordered: bool = True

    def __init__(self, name2spec: dict[str, _Spec], name2shard: dict[str, int],
                 shard_paths: list[Path | None], *, aliases: Mapping[str, str] | None = None):
        self._name2spec = name2spec
        self._name2shard = name2shard
        self._shard_paths = shard_paths
        self._aliases = dict(aliases or {})

    def _read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._name2spec:
            raise KeyError(name)
        return self._read(self._aliases.get(name, name))

    def __contains__(self, name: object) -> bool:
        # Mapping's default would read the tensor just to answer membership.
        return name in self._name2spec

    def __iter__(self) -> Iterator[str]:
        return iter(self._name2spec)

    def __len__(self) -> int:
        return len(self._name2spec)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} tensors in {len(self._shard_paths)} shard(s))"

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every tensor, without reading tensor data."""
        return {name: shape for name, (shape, _) in self._name2spec.items()}

    def dtypes(self) -> dict[str, torch.dtype]:
        """Dtype of every tensor, without reading tensor data."""
        return {name: dtype for name, (_, dtype) in self._name2spec.items()}

    def meta(self) -> dict[str, torch.Tensor]:
        """Meta-device tensors of the right shape and dtype, for matching without data.

        Tied names (see :meth:`aliases`) share one meta tensor, so the tie survives.
        """
        out = {n: torch.empty(s, dtype=d, device="meta") for n, (s, d) in self._name2spec.items()
               if n not in self._aliases}
        for alias, kept in self._aliases.items():
            out[alias] = out[kept]
        return {n: out[n] for n in self._name2spec}

    def aliases(self) -> dict[str, str]:
        """Tied names: ``{alias: kept name}`` for every name that shares the kept name's tensor."""
        return dict(self._aliases)

    def tie_groups(self) -> list[tuple[str, ...]]:
        """Names sharing one tensor (tied weights), each group its kept name first; untied names are left out.

        Example:
            >>> w = torch.ones(2, 2)
            >>> Checkpoint.from_state_dict({"embed.weight": w, "head.weight": w, "b": torch.ones(1)}).tensors.tie_groups()
            [('embed.weight', 'head.weight')]
        """
        kept2names: dict[str, list[str]] = {}
        for alias, kept in self._aliases.items():
            kept2names.setdefault(kept, [kept]).append(alias)
        return [tuple(names) for names in kept2names.values()]

    def shards(self) -> list[tuple[Path | None, list[str]]]:
        """The names held by each shard, in shard order (one pseudo-shard for a single file)."""
        shard2names: list[list[str]] = [[] for _ in self._shard_paths]
        for name in self._name2spec:
            shard2names[self._name2shard[name]].append(name)  # aliases sit in their kept name's shard
        return list(zip(self._shard_paths, shard2names))

    def release(self, shard: int) -> None:
        """Let go of what reading shard ``shard`` holds open (a memory map, a loaded file).

        Tensors already read keep their data alive until they are dropped too; a later read
        opens the shard again. Converting shard by shard calls this once a shard's outputs are
        written, so that memory stays bounded by a shard, not the checkpoint.
        """

    def prefetch(self, shard: int) -> None:
        """Ask the OS to start reading shard ``shard``'s file into its cache (a hint: nothing is mapped)."""
        path = self._shard_paths[shard]
        if path is None or not hasattr(os, "posix_fadvise"):
            return
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)


class _DictSource(TensorSource):
    """Tensors already in memory (an in-memory state dict or one mmap-loaded torch file)."""

    def __init__(self, tensors: dict[str, torch.Tensor], path: Path | None = None):
        super().__init__({n: (tuple(t.shape), t.dtype) for n, t in tensors.items()},
                         dict.fromkeys(tensors, 0), [path], aliases=_tied_names(tensors))
        self._tensors = tensors

    def _read(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]  # an alias is its own (shared) tensor already


class _SafetensorsSource(TensorSource):
    """One or more safetensors files; headers parsed up front, data read per tensor."""

    ordered = False  # the header is sorted by name; ties are recorded in its metadata

    def __init__(self, paths: list[Path], *, device: str = "cpu"):
        name2spec: dict[str, _Spec] = {}
        name2shard: dict[str, int] = {}
        aliases: dict[str, str] = {}
        self.metadata: dict[str, str] = {}
        for shard, path in enumerate(paths):
            specs, metadata = _read_safetensors_header(path)
            shard_aliases = _parse_aliases(metadata.pop(_ALIASES_KEY, None), specs, path)
            for name in [*specs, *shard_aliases]:
                if name in name2shard:
                    raise _duplicate_error(name, paths[name2shard[name]], path)
                name2shard[name] = shard
            name2spec.update(specs)
            aliases.update(shard_aliases)
            for k, v in metadata.items():
                self.metadata.setdefault(k, v)
        # Aliases come last so a full read materialises each kept tensor before its aliases.
        name2spec.update({alias: name2spec[kept] for alias, kept in aliases.items()})
        super().__init__(name2spec, name2shard, list(paths), aliases=aliases)
        self._device = device
        self._handles: dict[int, Any] = {}

    def _read(self, name: str) -> torch.Tensor:
        shard = self._name2shard[name]
        if shard not in self._handles:
            self._handles[shard] = safe_open(self._shard_paths[shard], framework="pt", device=self._device)
        try:
            return self._handles[shard].get_tensor(name)
        except Exception as e:  # the file changed on disk since its header was read
            raise CheckpointError(f"Could not read tensor {name!r} from {self._shard_paths[shard]}: "
                                  f"truncated or corrupt ({e}); re-download or re-save the file") from None

    def release(self, shard: int) -> None:
        # The handle owns the file's memory map; it is unmapped once the tensors read from it are gone too.
        self._handles.pop(shard, None)


class _TorchShardSource(TensorSource):
    """Several torch files; each is scanned once for names, then at most one is kept loaded."""

    def __init__(self, paths: list[Path], *, key: str | None, trust_pickle: bool, map_location: Any):
        self._load_options = dict(key=key, trust_pickle=trust_pickle, map_location=map_location)
        name2spec: dict[str, _Spec] = {}
        name2shard: dict[str, int] = {}
        skipped: list[str] = []
        aliases: dict[str, str] = {}
        for shard, path in enumerate(paths):
            tensors, shard_skipped = self._load_shard(path)
            skipped += shard_skipped
            for name, t in tensors.items():
                if name in name2shard:
                    raise _duplicate_error(name, paths[name2shard[name]], path)
                name2spec[name], name2shard[name] = (tuple(t.shape), t.dtype), shard
            aliases.update(_tied_names(tensors))
            del tensors  # bound memory: one shard at a time
        super().__init__(name2spec, name2shard, list(paths), aliases=aliases)
        self.skipped = tuple(skipped)
        self._loaded: tuple[int, dict[str, torch.Tensor]] | None = None

    def _load_shard(self, path: Path) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
        opts = self._load_options
        obj = _torch_load(path, trust_pickle=opts["trust_pickle"], map_location=opts["map_location"])
        tensors, _, _, skipped = _unwrap(obj, key=opts["key"], source=str(path))
        return tensors, skipped

    def _read(self, name: str) -> torch.Tensor:
        shard = self._name2shard[name]
        if self._loaded is None or self._loaded[0] != shard:
            self._loaded = None  # drop the previous shard before loading the next
            self._loaded = (shard, self._load_shard(self._shard_paths[shard])[0])
        return self._loaded[1][name]

    def release(self, shard: int) -> None:
        if self._loaded is not None and self._loaded[0] == shard:
            self._loaded = None


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """A checkpoint as read from disk or memory: its tensors plus what is needed to save it back.

    Attributes:
        tensors: name -> tensor mapping; shapes and dtypes are known without reading data.
        path: the file, folder or index that was read; None for an in-memory state dict.
        format: "torch", "safetensors", "sharded-safetensors", "sharded-torch" or "state_dict".
        state_key: envelope key the tensors came from ("state_dict", "model", ...), or None.
        envelope: the rest of the loaded object (epoch, hyper_parameters, ...), for saving back.
        metadata: safetensors ``__metadata__`` (without weight_mapper's own entries).
        skipped: non-tensor entries of the state dict that were left out.

    Example:
        >>> ckpt = Checkpoint.from_state_dict({"state_dict": {"w": torch.ones(2)}, "epoch": 3})
        >>> ckpt.state_key, ckpt.envelope, list(ckpt.tensors)
        ('state_dict', {'epoch': 3}, ['w'])
    """

    tensors: TensorSource
    path: Path | None
    format: str
    state_key: str | None = None
    envelope: dict = field(default_factory=dict, repr=False)
    metadata: dict[str, str] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()

    @classmethod
    def from_state_dict(cls, obj: Any, *, key: str | None = None) -> Checkpoint:
        """Wrap an in-memory state dict or checkpoint dict; see :func:`unwrap_state_dict`.

        Raises:
            CheckpointError: ``obj`` holds no tensors, or several state dicts and no ``key``.

        Example:
            >>> Checkpoint.from_state_dict({"w": torch.ones(2)}).format
            'state_dict'
        """
        tensors, state_key, envelope, skipped = _unwrap(obj, key=key, source="<state dict>")
        _warn_skipped(skipped, "<state dict>", stacklevel=3)
        return cls(_DictSource(tensors), None, "state_dict", state_key, envelope, {}, skipped)

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file this checkpoint was read from (index and shards): pass as ``protected=``."""
        paths = [p for p, _ in self.tensors.shards() if p is not None]
        if self.path is not None and self.path.is_file() and self.path not in paths:
            paths.insert(0, self.path)
        return tuple(paths)


def load_checkpoint(path: str | os.PathLike, *, key: str | None = None, trust_pickle: bool = False,
                    map_location: Any = "cpu") -> Checkpoint:
    """Open a checkpoint file, shard index or folder of shards without running untrusted code.

    Safetensors files are opened header-only; torch files are loaded with
    ``weights_only=True`` and ``mmap=True``; torch shards are loaded one at a time on demand.

    Args:
        path: a ``.pt``/``.pth``/``.bin``/``.ckpt``/``.safetensors`` file, a ``*.index.json``
            with a ``weight_map``, or a folder holding either.
        key: envelope key holding the weights, when a checkpoint holds several state dicts.
        trust_pickle: allow arbitrary code while unpickling; only for files from a trusted source.
        map_location: passed to ``torch.load``; for safetensors, the device string to read to.

    Returns:
        The :class:`Checkpoint`.

    Raises:
        CheckpointError: the path is missing, empty, truncated, corrupt, holds no tensors, or
            holds several state dicts and ``key`` does not choose one.
        UnsafeCheckpointError: the file needs arbitrary code to unpickle and ``trust_pickle``
            is False.

    Example:
        >>> ckpt = load_checkpoint("lightning.ckpt")  # doctest: +SKIP
        >>> ckpt.state_key, sorted(ckpt.envelope)  # doctest: +SKIP
        ('state_dict', ['epoch', 'hyper_parameters', 'pytorch-lightning_version'])
    """
    path = Path(path)
    opts = dict(key=key, trust_pickle=trust_pickle, map_location=map_location)
    if not path.exists():
        raise CheckpointError(f"No such checkpoint: {path}; check the path (a file, a *.index.json "
                              f"or a folder of shards)")
    try:
        if path.is_dir():
            return _load_folder(path, **opts)
        _require_regular(path, "Checkpoint")
        if path.name.endswith(".index.json"):
            return _load_index(path, **opts)
        return _load_file(path, **opts)
    except OSError as e:  # unreadable file or folder: permissions, I/O error
        raise CheckpointError(f"Checkpoint {path} could not be read: {e}; check that it is readable") from None


def load_checkpoint_as_dict(path: str | os.PathLike, *, key: str | None = None,
                            trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load every tensor of a checkpoint into a plain dict (tied names share one tensor).

    Raises:
        CheckpointError: see :func:`load_checkpoint`.
        UnsafeCheckpointError: see :func:`load_checkpoint`.

    Example:
        >>> state_dict = load_checkpoint_as_dict("model.safetensors")  # doctest: +SKIP
    """
    return _materialise(load_checkpoint(path, key=key, trust_pickle=trust_pickle).tensors)


def unwrap_state_dict(obj: Any, *, key: str | None = None, source: str = "<state dict>"
                      ) -> tuple[dict[str, torch.Tensor], str | None, dict, tuple[str, ...]]:
    """Find the state dict inside whatever ``torch.load`` returned.

    A dict whose values are mostly tensors is the state dict itself. Otherwise the weights are
    taken from ``key``, or from the one known key (``state_dict``, ``model_state_dict``,
    ``model``, ``module``, ``net``, ``network``, ``ema``, ``state_dict_ema``, ``model_ema``)
    that holds tensors. A pickled ``nn.Module`` contributes its ``state_dict()``. Non-tensor
    entries of the state dict are skipped with a warning.

    Args:
        obj: the loaded object.
        key: top-level key holding the weights; required when several known keys hold tensors.
        source: how to name ``obj`` in messages (usually its file name).

    Returns:
        ``(tensors, state_key, envelope, skipped)``: ``envelope`` is a shallow copy of ``obj``
        without ``state_key``, empty when ``obj`` was a bare state dict.

    Raises:
        CheckpointError: ``obj`` holds no tensors, ``key`` is missing or holds no tensors, or
            several known keys hold tensors and ``key`` is None.

    Example:
        >>> sd, state_key, envelope, _ = unwrap_state_dict({"model": {"w": torch.ones(1)}, "step": 5})
        >>> list(sd), state_key, envelope
        (['w'], 'model', {'step': 5})
    """
    result = _unwrap(obj, key=key, source=source)
    _warn_skipped(result[3], source, stacklevel=3)
    return result


def detect_wrapper_prefix(names: Iterable[str]) -> str:
    """Return the longest known wrapper prefix shared by all names, or "".

    Known prefixes come from DDP (``module.``), ``torch.compile`` (``_orig_mod.``), both, and a
    Lightning module attribute (``model.``). ``model.`` is ambiguous because Hugging Face models
    legitimately start with it: it is returned anyway and the caller decides. Nothing is stripped.

    Example:
        >>> detect_wrapper_prefix(["module._orig_mod.fc.weight", "module._orig_mod.fc.bias"])
        'module._orig_mod.'
        >>> detect_wrapper_prefix(["module.fc.weight", "fc.bias"])
        ''
    """
    names = list(names)
    if not names:
        return ""
    for prefix in sorted(_WRAPPER_PREFIXES, key=len, reverse=True):
        if all(n.startswith(prefix) and len(n) > len(prefix) for n in names):
            return prefix
    return ""


def save_checkpoint(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, *,
                    envelope: Mapping[str, Any] | None = None, state_key: str | None = None,
                    metadata: Mapping[str, str] | None = None,
                    protected: Iterable[str | os.PathLike] = ()) -> Path:
    """Write tensors atomically as safetensors (by extension) or a torch file, dtypes unchanged.

    Torch files hold the bare state dict, or ``envelope`` with the tensors put back under
    ``state_key``. Safetensors files cannot hold shared storage: of tied names one is written and
    the others are recorded in the metadata, and :func:`load_checkpoint` restores them.

    Args:
        tensors: name -> tensor.
        path: output file; ``.safetensors`` writes safetensors, anything else ``torch.save``.
        envelope: non-tensor entries to save around the tensors (torch files only).
        state_key: key of the tensors inside ``envelope``.
        metadata: string metadata (safetensors only).
        protected: paths that must not be overwritten, usually the source checkpoint's files.

    Returns:
        The output path.

    Raises:
        CheckpointError: the output is protected, its folder is missing, a value is not a tensor
            or a metadata value is not a string.

    Example:
        >>> save_checkpoint({"w": torch.ones(2)}, "out.safetensors")  # doctest: +SKIP
        PosixPath('out.safetensors')
    """
    path = Path(path)
    _check_output_path(path, protected)
    tensors = _check_tensors(tensors, path)
    envelope = dict(envelope or {})
    if path.suffix == _SAFETENSORS_SUFFIX:
        if envelope:
            warnings.warn(f"{path}: safetensors files hold tensors only, so the envelope entries "
                          f"{_preview(envelope)} are not stored; save to a .pt/.ckpt path to keep them",
                          stacklevel=2)
        metadata = _check_metadata(metadata, path)
        unstorable = [(n, t.dtype) for n, t in tensors.items() if t.dtype not in _WRITABLE_DTYPES]
        if unstorable:
            name, dtype = unstorable[0]
            raise CheckpointError(f"Cannot save {path}: tensor {validate.short(name)} is {dtype}, which safetensors "
                                  f"files (as weight_mapper reads them) cannot hold; save to a .pt path, or convert "
                                  f"it (e.g. .dequantize() or .float()) first")
        unencodable = [n for n in [*tensors, *metadata.keys(), *metadata.values()] if not _utf8(n)]
        if unencodable:
            raise CheckpointError(f"Cannot save {path}: safetensors stores names as UTF-8, and "
                                  f"{validate.short(unencodable[0])} is not valid Unicode (a lone surrogate); "
                                  f"rename it, or save to a .pt path")
        _atomic_write(path, lambda tmp: _write_safetensors(tensors, tmp, metadata))
        return path
    if metadata:
        warnings.warn(f"{path}: metadata {_preview(metadata)} is only stored in safetensors files; "
                      f"save to a .safetensors path to keep it", stacklevel=2)
    if envelope and state_key is None:
        raise CheckpointError(f"Cannot save {path}: an envelope ({_preview(envelope)}) was given without "
                              f"state_key; pass state_key= (e.g. 'state_dict') to say where the tensors go")
    obj = tensors if state_key is None else {**envelope, state_key: tensors}
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))
    return path


def write_text_atomic(path: str | os.PathLike, text: str, *,
                      protected: Iterable[str | os.PathLike] = ()) -> Path:
    """Write a text file (a plan, a report) with the same atomic, non-clobbering rules.

    Raises:
        CheckpointError: the output is protected or its folder is missing.

    Example:
        >>> write_text_atomic("plan.json", "{}")  # doctest: +SKIP
        PosixPath('plan.json')
    """
    path = Path(path)
    _check_output_path(path, protected)
    # Names that cannot be encoded (a lone surrogate read from a file name) are escaped, never a crash.
    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8", errors="backslashreplace")

    _atomic_write(path, write)
    return path


# ---------------------------------------------------------------------------------------- reading


def _load_file(path: Path, *, key, trust_pickle, map_location) -> Checkpoint:
    if path.stat().st_size == 0:
        raise CheckpointError(f"Checkpoint {path} is empty (0 bytes); re-download or re-save it")
    if path.suffix == _SAFETENSORS_SUFFIX or _looks_like_safetensors(path):
        return _safetensors_checkpoint([path], path, "safetensors", key=key, map_location=map_location)
    obj = _torch_load(path, trust_pickle=trust_pickle, map_location=map_location)
    tensors, state_key, envelope, skipped = _unwrap(obj, key=key, source=str(path))
    _warn_skipped(skipped, str(path), stacklevel=4)
    return Checkpoint(_DictSource(tensors, path), path, "torch", state_key, envelope, {}, skipped)


def _load_index(index: Path, *, key, trust_pickle, map_location) -> Checkpoint:
    _require_regular(index, "Shard index", max_bytes=validate.MAX_INDEX_BYTES)
    try:
        data = validate.loads_json(index.read_bytes())
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise validate.Invalid("its 'weight_map' is not an object of tensor name -> file name")
        validate.check_names(weight_map)
        for shard_file in set(weight_map.values()):
            validate.check_shard_name(shard_file)
    except validate.Invalid as e:
        raise CheckpointError(f"Shard index {index} is not a valid index ({e}); "
                              f"expected JSON with a 'weight_map' of tensor name -> shard file") from None
    paths = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise CheckpointError(f"Shard index {index} lists shard(s) {_preview(missing)} that do not exist "
                              f"in {index.parent}; download every shard")
    for p in paths:
        _require_regular(p, f"Shard index {index} lists a shard that")
    ckpt = _load_shards(paths, index, key=key, trust_pickle=trust_pickle, map_location=map_location)
    name2shard, shard2path = ckpt.tensors._name2shard, ckpt.tensors._shard_paths
    for name, shard_file in weight_map.items():
        if name not in name2shard or shard2path[name2shard[name]].name != shard_file:
            raise CheckpointError(f"Shard index {index} says {name!r} is in {shard_file}, but it is not; "
                                  f"the index and the shards do not match (re-download them together)")
    return ckpt


def _load_folder(folder: Path, *, key, trust_pickle, map_location) -> Checkpoint:
    opts = dict(key=key, trust_pickle=trust_pickle, map_location=map_location)
    indexes = sorted(p for p in folder.glob("*.index.json") if not p.is_dir())
    # Hugging Face folders often hold the same weights twice: prefer safetensors.
    indexes = [p for p in indexes if p.name.endswith(".safetensors.index.json")] or indexes
    if len(indexes) > 1:
        raise CheckpointError(f"Folder {folder} holds several shard indexes "
                              f"{_preview(p.name for p in indexes)}; pass the path of the one to read")
    if indexes:
        return _load_index(indexes[0], **opts)
    files = sorted(p for p in folder.glob(f"*{_SAFETENSORS_SUFFIX}") if p.is_file())
    if not files:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _TORCH_SHARD_SUFFIXES
                       and not _NOT_WEIGHT_FILES.match(p.name))
    if not files:
        raise CheckpointError(f"Folder {folder} contains no checkpoint; looked for *.index.json, "
                              f"*{_SAFETENSORS_SUFFIX} and {', '.join('*' + s for s in _TORCH_SHARD_SUFFIXES)} "
                              f"files; pass the checkpoint file itself")
    if len(files) == 1:
        return _load_file(files[0], **opts)
    return _load_shards(files, folder, **opts)


def _load_shards(paths: list[Path], path: Path, *, key, trust_pickle, map_location) -> Checkpoint:
    empty = [p.name for p in paths if p.stat().st_size == 0]
    if empty:
        raise CheckpointError(f"Shard(s) {_preview(empty)} of {path} are empty (0 bytes); re-download them")
    if all(p.suffix == _SAFETENSORS_SUFFIX for p in paths):
        return _safetensors_checkpoint(paths, path, "sharded-safetensors", key=key, map_location=map_location)
    if any(p.suffix == _SAFETENSORS_SUFFIX for p in paths):
        raise CheckpointError(f"{path} mixes safetensors and torch shards; pass one kind")
    source = _TorchShardSource(paths, key=key, trust_pickle=trust_pickle, map_location=map_location)
    _warn_skipped(source.skipped, str(path), stacklevel=5)
    return Checkpoint(source, path, "sharded-torch", key, {}, {}, source.skipped)


def _safetensors_checkpoint(paths: list[Path], path: Path, fmt: str, *, key, map_location) -> Checkpoint:
    if key is not None:
        raise CheckpointError(f"{path} is safetensors, which holds one flat state dict; drop key={key!r}")
    if not isinstance(map_location, (str, torch.device)):
        raise CheckpointError(f"Cannot read {path} with map_location={map_location!r}: safetensors needs "
                              f"a device such as 'cpu' or 'cuda:0'")
    source = _SafetensorsSource(paths, device=str(map_location))
    return Checkpoint(source, path, fmt, None, {}, source.metadata, ())


def _require_regular(path: Path, what: str, *, max_bytes: int | None = None) -> int:
    """Refuse a FIFO, a device or a folder before it is opened (reading one could block forever)."""
    try:
        return validate.require_regular_file(path, max_bytes=max_bytes)
    except validate.Invalid as e:
        raise CheckpointError(f"{what} {path} cannot be read: {e}; pass the checkpoint file itself") from None


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file under another name: 8-byte length then a JSON object."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and not head.startswith(b"PK")


def _read_safetensors_header(path: Path) -> tuple[dict[str, _Spec], dict[str, str]]:
    """Parse a safetensors header (u64 little-endian length + JSON) and check it fits the file.

    The checks are those the safetensors library makes when it reads data
    (:func:`~weight_mapper.validate.check_safetensors_header`), so a damaged file is refused
    by ``inspect`` and ``map`` already, not only when its tensors are read.
    """
    size = _require_regular(path, "Checkpoint")

    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"Checkpoint {path} could not be read: truncated or corrupt ({why}); "
                               f"re-download or re-save it")

    with open(path, "rb") as f:
        n_header = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 0 < n_header <= min(size - 8, _MAX_HEADER_BYTES):
            raise corrupt(f"header length {n_header} does not fit a file of {size} bytes")
        raw = f.read(n_header)
    try:
        header = validate.loads_json(raw)
    except validate.Invalid as e:
        raise corrupt(f"header is {e}") from None
    for name, info in header.items() if isinstance(header, dict) else ():
        try:
            validate.check_name(name, "tensor name")
        except validate.Invalid as e:
            raise CheckpointError(f"Checkpoint {path} holds a {e}; names beyond these bounds are refused") from None
        dtype_name = info.get("dtype") if isinstance(info, dict) and name != "__metadata__" else None
        if isinstance(dtype_name, str) and dtype_name not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"Checkpoint {path}: tensor {validate.short(name)} has dtype {dtype_name[:40]}, "
                                  f"which weight_mapper cannot read; convert it to a torch dtype before mapping")
    try:
        name2info, metadata = validate.check_safetensors_header(header, size - 8 - n_header, _ITEMSIZES)
    except validate.Invalid as e:
        raise corrupt(str(e)) from None
    return {name: (shape, _SAFETENSORS_DTYPES[dtype]) for name, (dtype, shape) in name2info.items()}, metadata


def _parse_aliases(text: str | None, name2spec: Mapping[str, _Spec], path: Path) -> dict[str, str]:
    if text is None:
        return {}
    try:
        aliases = validate.loads_json(text)
        bad = [a for a, kept in aliases.items() if not isinstance(kept, str) or kept not in name2spec
               or a in name2spec or validate.check_name(a)]
    except (ValueError, AttributeError) as e:
        bad = [f"{type(e).__name__}: {e}"]
    if bad:
        raise CheckpointError(f"Checkpoint {path} has a corrupt {_ALIASES_KEY!r} metadata entry "
                              f"(bad: {_preview(bad)}); re-save the file with save_checkpoint")
    return aliases


def _torch_load(path: Path, *, trust_pickle: bool, map_location: Any) -> Any:
    """``torch.load`` with mmap where possible, turning torch's errors into ours."""
    load = dict(weights_only=not trust_pickle, map_location=map_location)
    try:
        try:
            return torch.load(path, mmap=True, **load)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):  # legacy (non-zip) files cannot be mmapped
                raise
        return torch.load(path, mmap=False, **load)
    except pickle.UnpicklingError as e:
        offender = _weights_only_refusal(str(e)) if not trust_pickle else None
        if offender is not None:
            culprit = f" (unsupported global: {offender})" if offender else ""
            raise UnsafeCheckpointError(
                f"Checkpoint {path} contains objects that need arbitrary code to unpickle{culprit}; that code "
                f"was NOT run. If the file comes from a trusted source, opt in with trust_pickle=True",
                option="trust_pickle") from None
        raise _corrupt_error(path, e) from None
    except (ImportError, AttributeError) as e:  # trust_pickle only: the pickled classes are not importable
        if not trust_pickle:
            raise _corrupt_error(path, e) from None
        raise CheckpointError(f"Checkpoint {path} could not be unpickled: it refers to code that is not "
                              f"importable here ({e}); import or install the module that defines it") from None
    except RecursionError:
        raise CheckpointError(f"Checkpoint {path} could not be read: its objects are nested too deep to "
                              f"unpickle; re-save it from a plain state dict") from None
    except MemoryError:
        raise CheckpointError(f"Checkpoint {path} could not be read: it claims more memory than is "
                              f"available (truncated or corrupt); re-download or re-save it") from None
    except Exception as e:  # noqa: BLE001 - struct.error, AssertionError, zipfile errors...: a damaged file
        raise _corrupt_error(path, e) from None


def _weights_only_refusal(message: str) -> str | None:
    """The global torch refused to load, "" if unnamed, or None if the message means corruption."""
    if "Weights only load failed" not in message:
        return None
    for pattern in _REFUSAL_PATTERNS:
        match = pattern.search(message)
        if match:
            offender = match.group(1).strip().rstrip(".")
            # A damaged stream can run a global's name into junk bytes: that is corruption.
            return offender if offender.isprintable() else None
    return None


def _corrupt_error(path: Path, e: BaseException) -> CheckpointError:
    # torch wraps the unpickler's one-line reason in paragraphs of advice; keep only the reason.
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(_TORCH_BOILERPLATE)]
    reason = (reasons or lines or [type(e).__name__])[0].split(". ")[0].rstrip(".")
    return CheckpointError(f"Checkpoint {path} could not be read: truncated or corrupt ({reason}); "
                           f"re-download or re-save it")


def _unwrap(obj: Any, *, key: str | None, source: str
            ) -> tuple[dict[str, torch.Tensor], str | None, dict, tuple[str, ...]]:
    """Core of :func:`unwrap_state_dict`, without the warning (shards are re-read silently)."""
    try:
        return _find_state_dict(obj, key=key, source=source)
    except validate.Invalid as e:
        raise CheckpointError(f"{source}: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{source}: its objects are nested too deep to read; "
                              f"re-save it from a plain state dict") from None


def _find_state_dict(obj: Any, *, key: str | None, source: str
                     ) -> tuple[dict[str, torch.Tensor], str | None, dict, tuple[str, ...]]:
    if isinstance(obj, torch.nn.Module):
        return _unwrapped(obj.state_dict(), None, {})
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} contains no tensors (it holds a {type(obj).__name__}); expected a "
                              f"state dict or a checkpoint dict with one of: {', '.join(_STATE_DICT_KEYS)}")
    n_tensors = sum(isinstance(v, torch.Tensor) for v in obj.values())
    if key is not None:
        if key not in obj:
            what = f"a bare state dict of {n_tensors} tensors" if 2 * n_tensors >= len(obj) > 0 else \
                f"keys {_preview(obj)}"
            raise CheckpointError(f"{source} has no key {key!r} (it holds {what}); "
                                  f"{_key_hint(obj) or 'drop key='}", option="key" if _key_hint(obj) else None)
        if not _holds_tensors(obj[key]):
            raise CheckpointError(f"{source}[{key!r}] holds no tensors (a {type(obj[key]).__name__}); "
                                  f"{_key_hint(obj) or 'drop key='}", option="key" if _key_hint(obj) else None)
        return _pick(obj, key)
    if n_tensors and 2 * n_tensors >= len(obj):
        return _unwrapped(obj, None, {})
    candidates = [k for k in _STATE_DICT_KEYS if k in obj and _holds_tensors(obj[k])]
    if len(candidates) > 1:
        listed = ", ".join(f"{k!r} ({_count_tensors(obj[k])} tensors)" for k in candidates)
        raise CheckpointError(f"{source} holds several state dicts: {listed}; pass key={candidates[0]!r} "
                              f"to choose one", option="key", value=str(candidates[0]))
    if candidates:
        return _pick(obj, candidates[0])
    if n_tensors:
        return _unwrapped(obj, None, {})
    hint = _key_hint(obj)
    raise CheckpointError(f"{source} contains no tensors; expected a state dict or a checkpoint dict with "
                          f"one of: {', '.join(_STATE_DICT_KEYS)}" + (f"; {hint}" if hint else ""),
                          option="key" if hint else None)


def _pick(obj: Mapping, key: str) -> tuple[dict[str, torch.Tensor], str | None, dict, tuple[str, ...]]:
    value = obj[key]
    state_dict = value.state_dict() if isinstance(value, torch.nn.Module) else value
    envelope = {k: v for k, v in obj.items() if k != key}
    return _unwrapped(state_dict, key, envelope)


def _unwrapped(state_dict: Mapping, state_key: str | None, envelope: dict
               ) -> tuple[dict[str, torch.Tensor], str | None, dict, tuple[str, ...]]:
    """Split a state dict into its tensors and the names of its non-tensor entries.

    Raises:
        validate.Invalid: two keys have the same name as strings (``1`` and ``"1"``), a name is
            beyond the bounds of :mod:`weight_mapper.validate`, a tensor is not a plain dense
            tensor (nested, sparse), or the envelope nests too deep.
    """
    tensors: dict[str, torch.Tensor] = {}
    key2name: dict[str, Any] = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            continue
        name = str(k)
        if name in key2name:
            raise validate.Invalid(f"the state dict has two keys named {validate.short(name)}: "
                                   f"{validate.short(key2name[name])} ({type(key2name[name]).__name__}) and "
                                   f"{validate.short(k)} ({type(k).__name__}); rename one so that no tensor is dropped")
        key2name[name] = k
        validate.check_name(name, "tensor name")
        if v.layout != torch.strided or v.is_nested:
            raise validate.Invalid(f"tensor {validate.short(name)} is a {v.layout} "
                                  f"{'nested ' if v.is_nested else ''}tensor; only dense tensors can be mapped: "
                                  f"convert it with .to_dense() first")
        tensors[name] = v
    skipped = tuple(str(k) for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    validate.check_envelope_depth(envelope)
    return tensors, state_key, envelope, skipped


def _holds_tensors(value: Any) -> bool:
    return isinstance(value, torch.nn.Module) or _count_tensors(value) > 0


def _count_tensors(value: Any) -> int:
    if isinstance(value, torch.nn.Module):
        return len(value.state_dict())
    if isinstance(value, Mapping):
        return sum(isinstance(v, torch.Tensor) for v in value.values())
    return 0


def _key_hint(obj: Mapping) -> str:
    """'pass key=...' listing every top-level key that holds tensors, or ""."""
    holders = [str(k) for k, v in obj.items() if _holds_tensors(v)]
    return f"pass key= one of {_preview(holders)}" if holders else ""


def _warn_skipped(skipped: tuple[str, ...], source: str, *, stacklevel: int) -> None:
    if skipped:
        warnings.warn(f"{source}: skipped {len(skipped)} non-tensor entr{'y' if len(skipped) == 1 else 'ies'} "
                      f"of the state dict: {_preview(skipped)}; they are not weights", stacklevel=stacklevel)


def _duplicate_error(name: str, first: Path, second: Path) -> CheckpointError:
    return CheckpointError(f"Tensor {name!r} appears in both {first} and {second}; remove the stale "
                           f"shard or load one file")


def _preview(names: Iterable[Any], limit: int = 5) -> str:
    names = [str(n) for n in names]
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ---------------------------------------------------------------------------------------- writing


def refuse_overwrite(path: str | os.PathLike,
                     protected: Iterable[str | os.PathLike | tuple[str | os.PathLike, str]]) -> None:
    """Refuse to write ``path`` over one of ``protected``, before anything is read or written.

    Each protected entry is a path (the source checkpoint) or ``(path, what it is)``; a path
    that exists is compared as a file (links too), one that does not by its resolved name.

    Raises:
        CheckpointError: naming what ``path`` would overwrite.

    Example:
        >>> refuse_overwrite("plan.json", [("plan.json", "the plan")])
        Traceback (most recent call last):
        ...
        weight_mapper.errors.CheckpointError: Refusing to overwrite the plan plan.json with plan.json; choose another output path
    """
    path = Path(path)
    for entry in protected:
        source, what = (Path(entry[0]), entry[1]) if isinstance(entry, tuple) else (Path(entry), "the source checkpoint")
        same = os.path.samefile(path, source) if path.exists() and source.exists() else \
            path.resolve() == source.resolve()
        if same:
            raise CheckpointError(f"Refusing to overwrite {what} {source} with {path}; choose another output path")


def _check_output_path(path: Path, protected: Iterable[str | os.PathLike]) -> None:
    refuse_overwrite(path, protected)
    if not path.parent.is_dir():
        raise CheckpointError(f"Cannot save {path}: folder {path.parent} does not exist; create it first")
    if path.is_dir():
        raise CheckpointError(f"Cannot save to {path}: it is a folder; pass a file path such as "
                              f"{path / 'model.safetensors'}")


def _materialise(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A plain dict; names tied in a safetensors file come back as one shared tensor."""
    aliases = tensors._aliases if isinstance(tensors, TensorSource) else {}
    name2tensor: dict[str, torch.Tensor] = {}
    for name in tensors:
        kept = aliases.get(name)
        name2tensor[name] = name2tensor[kept] if kept in name2tensor else tensors[name]
    return name2tensor


def _check_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    tensors = _materialise(tensors)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"Cannot save {path}: {name!r} is a {type(t).__name__}, not a tensor; "
                                  f"pass non-tensor entries as envelope=")
        if t.is_meta:
            raise CheckpointError(f"Cannot save {path}: {name!r} is a meta tensor with no data; "
                                  f"materialise it (e.g. load real weights) before saving")
    return tensors


def _check_metadata(metadata: Mapping[str, str] | None, path: Path) -> dict[str, str]:
    metadata = dict(metadata or {})
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise CheckpointError(f"Cannot save {path}: safetensors metadata values must be str, but "
                              f"{_preview(bad)} are not; convert them with str() or json.dumps()")
    # transformers refuses safetensors files whose metadata lacks a framework "format".
    metadata.setdefault("format", "pt")
    return metadata


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def storage_view(t: torch.Tensor) -> tuple | None:
    """What two names of one tied tensor share: the same view of the same storage.

    None for a tensor that cannot be told apart by its storage (empty, meta, no storage):
    callers then compare the tensor objects themselves.
    """
    if t.numel() == 0 or t.is_meta:
        return None
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    if ptr == 0:
        return None
    return (t.device, ptr, t.storage_offset(), t.dtype, tuple(t.shape), t.stride())


def _tied_names(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``{alias: first name}`` for names holding the same view of the same storage (tied weights)."""
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, t in tensors.items():
        view = storage_view(t)
        if view is None:
            continue
        kept = first.setdefault(view, name)
        if kept != name:
            aliases[name] = kept
    return aliases


def _dedupe_shared(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep one name per identical view of shared storage; copy views that only overlap.

    Returns ``(tensors to write, {dropped name: kept name})``, like safetensors' ``save_model``.
    """
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    view2name: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for name, t in tensors.items():
        if t.numel() == 0:
            kept[name] = t.contiguous()
            continue
        storage = (t.device, t.untyped_storage().data_ptr())
        view = (*storage, t.storage_offset(), t.dtype, tuple(t.shape), t.stride())
        if view in view2name:
            aliases[name] = view2name[view]
            continue
        view2name[view] = name
        # Different views of one storage (e.g. slices) cannot be aliased: write a copy of each.
        kept[name] = t.clone(memory_format=torch.contiguous_format) if storage in storages else t.contiguous()
        storages.add(storage)
    return kept, aliases


def _write_safetensors(tensors: dict[str, torch.Tensor], tmp: Path, metadata: dict[str, str]) -> None:
    kept, aliases = _dedupe_shared(tensors)
    if aliases:
        metadata = {**metadata, _ALIASES_KEY: json.dumps(aliases, sort_keys=True)}
    safetensors.torch.save_file(kept, str(tmp), metadata=metadata)


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write into a temporary folder next to ``path``, fsync, then rename the file over ``path``.

    The temporary folder is named by :func:`temporary_path_for`; stale ones that a killed run
    left in the folder are removed first.
    """
    clean_stale_temporaries(path.parent)
    # A private folder, not a file: writers that use temporaries of their own (safetensors'
    # save_file does) leave them inside it, where the next run recognises them too.
    tmp_dir = temporary_path_for(path)
    tmp = tmp_dir / path.name
    try:
        tmp_dir.mkdir(mode=0o700)
        write(tmp)
        _fsync(tmp)
        # The temporary file is private (0o600); give the output the mode a plain open() would.
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # not every platform can fsync a folder
            _fsync(path.parent)
        shutil.rmtree(tmp_dir, ignore_errors=True)
    except BaseException as e:  # including KeyboardInterrupt: never leave a partial file behind
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if isinstance(e, OSError):
            raise CheckpointError(f"Could not write {path}: {e}; check free space and permissions") from e
        if isinstance(e, RecursionError):
            raise CheckpointError(f"Could not write {path}: the objects to save are nested too deep") from None
        raise


# Temporary outputs are named ".<output name>.weight_mapper-tmp-<host>-<pid>-<random>": a later run
# in the same folder recognises the ones whose process is gone and removes them.
_TMP_MARK = ".weight_mapper-tmp-"
_HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def temporary_path_for(path: str | os.PathLike) -> Path:
    """A fresh name next to ``path`` for building it before it is published (file or folder).

    Example:
        >>> temporary_path_for("out/model.safetensors").name.startswith(".model.safetensors.weight_mapper-tmp-")
        True
    """
    path = Path(path)
    return path.parent / f".{path.name}{_TMP_MARK}{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def clean_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary outputs a killed run of weight_mapper left in ``folder``.

    Only names made by :func:`temporary_path_for` on this host whose process no longer runs
    are removed; anything else is left alone. Returns what was removed.
    """
    removed = []
    with contextlib.suppress(OSError):
        for p in Path(folder).glob(f".*{_TMP_MARK}*"):
            host, _, rest = p.name.rpartition(_TMP_MARK)[2].partition("-")
            pid_text = rest.partition("-")[0]
            if host != _HOST or not pid_text.isdecimal() or _process_alive(int(pid_text)):
                continue
            with contextlib.suppress(OSError):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed.append(p)
    return removed


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we wrote: leave it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask
