"""Ground truth by tracer values: run a maintainers' converter on numbered tensors, read what it did.

Every source tensor is filled with values no other element of the checkpoint has
(:func:`tracer_state_dict`): element ``i`` of the ``n``-th tensor holds ``base + offset_n + i``
(plus a fraction for floating tensors), in float64. Up to 2**21 elements in all, ``base`` is
2**20 and the fraction 0.25, so every value stays exact even where a converter keeps a tensor in
float32 (DeepSeek-V3's router in transformers); beyond that, ``base`` is 1e9 and the fraction
0.5 (exact in float64 only). No initialiser produces numbers like these, so after the converter has run, every output element either names
the source tensor and element it was copied from, or was not copied from the source (a target-only
head's random init, or arithmetic). :func:`read_truth` turns that into one :class:`Origin` per
target tensor: which source tensors fill it, in which order, and how (a copy, a reshape, a
transpose, another permutation, a concatenation, a slice of one tensor, or computed).

Nothing here knows a converter or the matcher: the benchmark compares the matcher's converted
tensors with the converter's by ``torch.equal`` on these values, so "equal" means "every element
came from the same place".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["BASE", "SOURCE_KINDS", "Origin", "read_truth", "tracer_state_dict"]

#: Tracer values start here: far above any weight an initialiser draws, well below 2**53.
BASE = 1_000_000_000
#: For checkpoints of up to SMALL elements, values start at SMALL_BASE: exact in float32 too.
SMALL, SMALL_BASE = 2**21, 2**20


def _layout(total: int) -> tuple[int, float]:
    """``(base, fraction)`` of the tracer values of a checkpoint with ``total`` elements."""
    return (SMALL_BASE, 0.25) if total <= SMALL else (BASE, 0.5)

#: How a target tensor is made from the source, as :func:`read_truth` reads it.
SOURCE_KINDS = (
    "copy", "reshape", "transpose", "permute", "concat", "merge", "slice", "gather", "computed", "target_only",
)


def aliases(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``{key: first key}`` for every key whose tensor is the same memory as an earlier key's (tied weights).

    >>> w = torch.zeros(2, 3)
    >>> aliases({"embed": w, "head": w, "other": torch.zeros(2, 3)})
    {'head': 'embed'}
    """
    seen: dict[tuple, str] = {}
    out: dict[str, str] = {}
    for key, value in state_dict.items():
        if value.numel() == 0:
            continue
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride())
        if ident in seen:
            out[key] = seen[ident]
        else:
            seen[ident] = key
    return out


def tracer_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same keys and shapes, every element globally unique: float64 (or int64 for integer tensors).

    Tied tensors (:func:`aliases`) stay tied: a later key gets the very tensor of the first, so a
    converter that reads either reads the same values, as it would from the real checkpoint.

    >>> sd = tracer_state_dict({"a": torch.zeros(2), "b": torch.zeros(1, 2, dtype=torch.long)})
    >>> sd["a"].tolist(), sd["b"].tolist(), sd["b"].dtype
    ([1048576.25, 1048577.25], [[1048578, 1048579]], torch.int64)
    """
    out: dict[str, torch.Tensor] = {}
    base, frac = _layout(sum(v.numel() for v in state_dict.values()))
    offset = base
    for key, value in state_dict.items():
        n = value.numel()
        if value.is_floating_point() or value.is_complex():
            t = torch.arange(offset, offset + n, dtype=torch.float64) + frac
        else:
            t = torch.arange(offset, offset + n, dtype=torch.int64)
        out[key] = t.reshape(value.shape)
        offset += n
    for key, first in aliases(state_dict).items():
        out[key] = out[first]
    if offset + 1 >= 2**52:
        raise ValueError(f"{offset - base} source elements: too many for exact float64 tracer values")
    return out


@dataclass(frozen=True)
class Origin:
    """Where one target tensor's elements come from.

    Attributes:
        sources: Source keys in the order their elements first appear in the flattened target.
        kind: One of :data:`SOURCE_KINDS`.
        copied: Share of the target's elements copied from the source (1.0 unless computed or
            target-only).
    """

    sources: tuple[str, ...]
    kind: str
    copied: float = 1.0

    def to_list(self) -> list:
        return [list(self.sources), self.kind, round(self.copied, 4)]


def _decode(values: torch.Tensor, base: int, frac: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(global element index or -1, valid mask)`` of flattened tracer values."""
    flat = values.detach().reshape(-1)
    if flat.is_floating_point():
        f = flat.double() - frac - base
        idx = f.round()
        valid = (idx == f) & (idx >= 0)
        return torch.where(valid, idx, torch.full_like(idx, -1)).long(), valid
    if flat.is_complex() or flat.dtype == torch.bool:
        return torch.full(flat.shape, -1, dtype=torch.long), torch.zeros(flat.shape, dtype=torch.bool)
    idx = flat.long() - base
    valid = idx >= 0
    return torch.where(valid, idx, torch.full_like(idx, -1)), valid


def _is_copy(value, tracer, keys, starts, sizes, base, frac) -> bool:
    """Fast path: ``value`` holds one whole source tensor in its own element order."""
    flat = value.detach().reshape(-1)
    if flat.numel() == 0:
        return False
    idx, valid = _decode(flat[:1], base, frac)
    if not bool(valid[0]):
        return False
    tid = int(torch.searchsorted(starts + sizes, idx, right=True)[0])
    if tid >= len(keys) or int(idx[0]) != int(starts[tid]) or flat.numel() != int(sizes[tid]):
        return False
    src = tracer[keys[tid]].reshape(-1)
    return flat.dtype == src.dtype and torch.equal(flat, src)


def read_truth(
    tracer: Mapping[str, torch.Tensor], converted: Mapping[str, torch.Tensor], target_keys: list[str]
) -> dict[str, Origin]:
    """Read, for every target key, which source tensors the converter filled it from and how.

    Args:
        tracer: The tracer state dict the converter ran on (:func:`tracer_state_dict`).
        converted: What the converter returned (a state dict in the target's layout).
        target_keys: Every key of the target model; those ``converted`` lacks, or fills without
            a single source element (a new head's own init), are ``target_only``.

    >>> src = tracer_state_dict({"w": torch.zeros(2, 3), "b": torch.zeros(3)})
    >>> out = {"W": src["w"].t(), "B": src["b"].clone(), "C": torch.cat([src["w"].reshape(-1), src["b"]])}
    >>> t = read_truth(src, out, ["W", "B", "C", "D"])
    >>> [(k, o.sources, o.kind) for k, o in t.items()]  # doctest: +NORMALIZE_WHITESPACE
    [('W', ('w',), 'transpose'), ('B', ('b',), 'copy'), ('C', ('w', 'b'), 'concat'), ('D', (), 'target_only')]
    """
    keys = list(tracer)
    sizes = torch.tensor([tracer[k].numel() for k in keys], dtype=torch.long)
    starts = torch.cumsum(sizes, 0) - sizes
    ends = starts + sizes
    total = int(sizes.sum())
    base, frac = _layout(total)
    out: dict[str, Origin] = {}
    for tkey in target_keys:
        value = converted.get(tkey)
        if value is None:
            out[tkey] = Origin((), "target_only", 0.0)
            continue
        if value.is_floating_point() and not bool((value.detach().abs() >= base - 1).any()):
            out[tkey] = Origin((), "target_only", 0.0)  # no value of the tracer's magnitude: the target's own init
            continue
        if _is_copy(value, tracer, keys, starts, sizes, base, frac):
            src_key = keys[int(torch.searchsorted(starts + sizes, _decode(value.reshape(-1)[:1], base, frac)[0],
                                                  right=True))]
            kind = "copy" if tuple(value.shape) == tuple(tracer[src_key].shape) else "reshape"
            out[tkey] = Origin((src_key,), kind)
            continue
        idx, valid = _decode(value, base, frac)
        valid &= idx < total
        n = idx.numel()
        if n == 0 or not bool(valid.any()):
            # nothing of the source in it: the target's own init; unless it holds values of the
            # tracer's magnitude that no longer decode (rounded to a lower precision, or arithmetic)
            lossy = n > 0 and value.is_floating_point() and bool((value.detach().abs() >= base - 1).any())
            out[tkey] = Origin((), "computed" if lossy else "target_only", 0.0)
            continue
        gidx = idx[valid]
        tensor_ids = torch.searchsorted(ends, gidx, right=True)
        order: list[int] = []
        seen: set[int] = set()
        for tid in torch.unique_consecutive(tensor_ids).tolist():
            if tid not in seen:
                seen.add(tid)
                order.append(tid)
        sources = tuple(keys[i] for i in order)
        copied = float(valid.sum()) / n
        if copied < 1.0:
            out[tkey] = Origin(sources, "computed", copied)
            continue
        whole = sum(int(sizes[i]) for i in order) == n and int(torch.unique(gidx).numel()) == n
        if len(order) == 1:
            src = tracer[keys[order[0]]]
            local = gidx - starts[order[0]]
            if not whole:
                contiguous = bool((local[1:] - local[:-1] == 1).all()) if n > 1 else True
                out[tkey] = Origin(sources, "slice" if contiguous else "gather")
            elif bool((local == torch.arange(n)).all()):
                out[tkey] = Origin(sources, "copy" if tuple(value.shape) == tuple(src.shape) else "reshape")
            elif src.dim() == 2 and tuple(value.shape) == (src.shape[1], src.shape[0]) and torch.equal(
                value.reshape(-1).double(), src.t().reshape(-1).double()
            ):
                out[tkey] = Origin(sources, "transpose")
            else:
                out[tkey] = Origin(sources, "permute")
            continue
        if whole:
            # a concatenation along the flattened order: each source's elements contiguous, in order
            pieces = torch.cat([torch.arange(int(starts[i]), int(ends[i])) for i in order])
            out[tkey] = Origin(sources, "concat" if torch.equal(gidx, pieces) else "merge")
        else:
            out[tkey] = Origin(sources, "gather")
    return out
