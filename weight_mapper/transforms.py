"""The transform registry: what a plan entry does to its source tensor(s) on the way.

Each transform is data in :data:`TRANSFORMS`: how to build the target tensor from the
entry's source tensors and arguments, and the name of its inverse, so that any plan can be
reversed (:func:`invert_entries`). Applying a transform never scores anything.

| transform | sources | args | inverse |
|---|---|---|---|
| ``None`` / identity | 1 | | identity |
| ``transpose`` | 1 (2-D) | | transpose |
| ``reshape`` | 1 | ``shape`` | reshape |
| ``concat`` | n | ``dim``, ``sizes`` (``transposed``: transpose the result) | one ``slice`` per source |
| ``slice`` | 1 | ``dim``, ``start``, ``length`` (``transposed``: of the source's transpose) | ``concat`` of the slices |
| ``stack`` | n | ``dim`` | one ``index`` per source |
| ``index`` | 1 | ``dim``, ``index`` | ``stack`` of the indices |
| ``stack_concat`` | parts x n | ``dim``, ``parts``, ``concat_dim``, ``sizes`` | one ``slice_index`` per source |
| ``slice_index`` | 1 | ``dim``, ``index``, ``concat_dim``, ``start``, ``length`` | ``stack_concat`` |
| ``rotary_half`` | 1 | ``n_heads`` | ``rotary_interleave`` |
| ``rotary_interleave`` | 1 | ``n_heads`` | ``rotary_half`` |

``slice``, ``index`` and ``slice_index`` are not only inverses: the matcher proposes them as
*splits* (one fused source filling several targets, :func:`weight_mapper.combine.split`).

``stack_concat`` is what a fused, stacked expert weight needs (transformers 5's
``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` from per-expert ``w1`` and ``w3``): its sources are
part-major (every expert's ``w1``, then every expert's ``w3``); each part's ``n`` tensors are
stacked along ``dim`` and the ``parts`` stacks concatenated along ``concat_dim``.

``rotary_half`` / ``rotary_interleave`` reorder the rows of a rotary query / key projection
(weight or bias) within each of ``n_heads`` heads: from the interleaved pairs of Meta's
reference Llama and torchtune (``x0 y0 x1 y1 ...``) to the half-split halves Hugging Face's
``rotate_half`` expects (``x0 x1 ... y0 y1 ...``), and back. See :mod:`weight_mapper.conventions`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from weight_mapper.errors import PlanError

if TYPE_CHECKING:
    from weight_mapper.plan import PlanEntry

__all__ = ["Transform", "TRANSFORMS", "get_transform", "invert_entries"]


@dataclass(frozen=True)
class Transform:
    """One registered tensor transform.

    Attributes:
        name: Registry key, stored in plans.
        apply: ``(source tensors, args) -> target tensor``.
        inverse: Name of the transform that undoes this one.
        many_sources: Whether the entry combines several source tensors.
        same_args: Whether the inverse takes this transform's arguments unchanged.
    """

    name: str
    apply: Callable[[Sequence[torch.Tensor], Mapping[str, Any]], torch.Tensor]
    inverse: str
    many_sources: bool = False
    same_args: bool = False


# Results are contiguous copies: safetensors refuses non-contiguous views, and a copy never
# aliases (and so never lets a later write corrupt) the source checkpoint's memory.
TRANSFORMS: dict[str, Transform] = {
    t.name: t
    for t in (
        Transform("identity", lambda ts, a: ts[0], "identity"),
        Transform("transpose", lambda ts, a: ts[0].t().contiguous(), "transpose"),
        Transform("reshape", lambda ts, a: ts[0].reshape(tuple(a["shape"])).contiguous(), "reshape"),
        Transform("concat", lambda ts, a: _maybe_t(torch.cat(list(ts), dim=a.get("dim", 0)), a), "slice", True),
        Transform(
            "slice", lambda ts, a: _maybe_t(ts[0], a).narrow(a.get("dim", 0), a["start"], a["length"]).contiguous(),
            "concat",
        ),
        Transform("stack", lambda ts, a: torch.stack(list(ts), dim=a.get("dim", 0)), "index", True),
        Transform("index", lambda ts, a: ts[0].select(a.get("dim", 0), a["index"]).contiguous(), "stack"),
        Transform("stack_concat", lambda ts, a: _stack_concat(ts, a), "slice_index", True),
        Transform(
            "slice_index",
            lambda ts, a: ts[0].narrow(a["concat_dim"], a["start"], a["length"]).select(a.get("dim", 0), a["index"])
            .contiguous(),
            "stack_concat",
        ),
        Transform("rotary_half", lambda ts, a: _rotary(ts[0], a, to_half=True), "rotary_interleave", same_args=True),
        Transform("rotary_interleave", lambda ts, a: _rotary(ts[0], a, to_half=False), "rotary_half", same_args=True),
    )
}


def _rotary(tensor: torch.Tensor, args: Mapping[str, Any], *, to_half: bool) -> torch.Tensor:
    """Reorder the rows of each head: interleaved pairs <-> half-split halves."""
    n_heads = int(args["n_heads"])
    rows = tensor.shape[0]
    if n_heads < 1 or rows % n_heads or (rows // n_heads) % 2:
        raise PlanError(f"cannot reorder {rows} rows into {n_heads} rotary heads of an even size")
    half = rows // n_heads // 2
    rest = tuple(tensor.shape[1:])
    split = (n_heads, half, 2, *rest) if to_half else (n_heads, 2, half, *rest)
    return tensor.reshape(split).transpose(1, 2).reshape(tensor.shape).contiguous()


def _maybe_t(t: torch.Tensor, args: Mapping[str, Any]) -> torch.Tensor:
    """``t`` transposed when ``args["transposed"]``: a fused ``[in, out]`` (Conv1D) weight is the
    transpose of its ``nn.Linear`` parts' concat, and a part the slice of its transpose."""
    return t.t().contiguous() if args.get("transposed") else t


def _stack_concat(tensors: Sequence[torch.Tensor], args: Mapping[str, Any]) -> torch.Tensor:
    parts = args["parts"]
    if not isinstance(parts, int) or parts < 1 or len(tensors) % parts:
        raise PlanError(f"stack_concat needs a multiple of parts={parts} source tensors, got {len(tensors)}")
    n = len(tensors) // parts
    dim = args.get("dim", 0)
    return torch.cat([torch.stack(list(tensors[p * n:(p + 1) * n]), dim=dim) for p in range(parts)],
                     dim=args["concat_dim"])


def get_transform(name: str | None) -> Transform:
    """Look up a transform; ``None`` means identity.

    Raises:
        PlanError: For a name not in :data:`TRANSFORMS`.

    >>> get_transform("transpose").apply([torch.zeros(3, 2)], {}).shape
    torch.Size([2, 3])
    """
    key = "identity" if name is None else name
    try:
        return TRANSFORMS[key]
    except KeyError:
        raise PlanError(f"unknown transform {name!r}; known transforms: {sorted(TRANSFORMS)}") from None


def invert_entries(entries: Sequence[PlanEntry]) -> list[PlanEntry]:
    """The entries of the inverse plan: target back to source, each transform undone.

    Raises:
        PlanError: If an entry has no unique way back (a source copied to several targets
            comes back once; slices or indices of one source must cover it exactly), or its
            transform arguments are missing or out of range.
    """
    try:
        return _invert_entries(entries)
    except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError, AttributeError) as e:
        if isinstance(e, PlanError):
            raise
        raise PlanError(f"the plan has no inverse: an entry's transform arguments are missing or out of "
                        f"range ({type(e).__name__}: {e}); check the plan's args") from None


def _invert_entries(entries: Sequence[PlanEntry]) -> list[PlanEntry]:
    out: list[PlanEntry] = []
    seen: set[str] = set()
    pieces: dict[str, list[PlanEntry]] = {}  # slice / index entries, grouped by their source
    for e in entries:
        op = e.transform or "identity"
        if op in ("slice", "index", "slice_index"):
            pieces.setdefault(e.source[0], []).append(e)
            continue
        if op == "stack_concat":
            out.extend(_unstack_concat(e))
            continue
        if op in ("concat", "stack"):
            dim = e.args.get("dim", 0)
            if op == "concat":
                sizes = list(e.args["sizes"])
                starts = [sum(sizes[:i]) for i in range(len(sizes))]
                flag = {"transposed": True} if e.args.get("transposed") else {}
                parts = [({"dim": dim, "start": s, "length": n, **flag}, "slice") for s, n in zip(starts, sizes)]
            else:
                parts = [({"dim": dim, "index": i}, "index") for i in range(len(e.source))]
            shapes = e.args.get("source_shapes") or [e.source_shape] * len(e.source)
            for src, (args, inv), shape in zip(e.source, parts, shapes):
                out.append(replace(e, source=(e.target,), target=src, transform=inv, args=args,
                                   source_shape=e.target_shape, target_shape=tuple(shape)))
            continue
        if e.source[0] in seen:
            continue  # a source copied to several targets comes back once
        seen.add(e.source[0])
        transform = get_transform(op)
        args = {"shape": list(e.source_shape)} if op == "reshape" else dict(e.args) if transform.same_args else {}
        out.append(replace(e, source=(e.target,), target=e.source[0], transform=None if op == "identity" else
                           transform.inverse, args=args, source_shape=e.target_shape,
                           target_shape=e.source_shape))
    for src, group in pieces.items():
        op = group[0].transform
        if op == "slice_index":
            out.append(_restack_concat(src, group))
            continue
        key = "start" if op == "slice" else "index"
        group = sorted(group, key=lambda e: e.args[key])
        dim = group[0].args.get("dim", 0)
        if op == "slice":
            transposed = bool(group[0].args.get("transposed"))
            whole = tuple(group[0].source_shape)[::-1] if transposed else tuple(group[0].source_shape)
            ends = [g.args["start"] + g.args["length"] for g in group]
            if ([g.args["start"] for g in group] != [0, *ends[:-1]] or ends[-1] != whole[dim]
                    or any(bool(g.args.get("transposed")) != transposed for g in group)):
                raise PlanError(f"the slices of {src!r} do not cover it exactly; the plan has no inverse")
            args = {"dim": dim, "sizes": [g.args["length"] for g in group]}
            if transposed:
                args["transposed"] = True
        else:
            if [g.args["index"] for g in group] != list(range(group[0].source_shape[dim])):
                raise PlanError(f"the indices of {src!r} do not cover it exactly; the plan has no inverse")
            args = {"dim": dim}
        args["source_shapes"] = [list(g.target_shape) for g in group]
        out.append(replace(group[0], source=tuple(g.target for g in group), target=src,
                           transform="concat" if op == "slice" else "stack", args=args,
                           source_shape=group[0].target_shape, target_shape=group[0].source_shape))
    return out


def _unstack_concat(e: PlanEntry) -> list[PlanEntry]:
    """The inverse of a ``stack_concat`` entry: one ``slice_index`` per source."""
    parts, sizes = int(e.args["parts"]), list(e.args["sizes"])
    n = len(e.source) // parts
    shapes = e.args.get("source_shapes") or [e.source_shape] * len(e.source)
    out = []
    for k, (src, shape) in enumerate(zip(e.source, shapes)):
        p, i = divmod(k, n)
        args = {"dim": e.args.get("dim", 0), "index": i, "concat_dim": e.args["concat_dim"],
                "start": sum(sizes[:p]), "length": sizes[p]}
        out.append(replace(e, source=(e.target,), target=src, transform="slice_index", args=args,
                           source_shape=e.target_shape, target_shape=tuple(shape)))
    return out


def _restack_concat(src: str, group: list[PlanEntry]) -> PlanEntry:
    """The inverse of the ``slice_index`` entries of one source: a ``stack_concat``.

    Raises:
        PlanError: If the pieces do not cover the source exactly.
    """
    group = sorted(group, key=lambda g: (g.args["start"], g.args["index"]))
    first = group[0].args
    dim, concat_dim = first.get("dim", 0), first["concat_dim"]
    starts = sorted({g.args["start"] for g in group})
    parts = [[g for g in group if g.args["start"] == s] for s in starts]
    n = group[0].source_shape[dim]
    sizes = [p[0].args["length"] for p in parts]
    covered = [sum(sizes[:i]) for i in range(len(sizes))] == starts and sum(sizes) == group[0].source_shape[concat_dim]
    if not covered or any([g.args["index"] for g in p] != list(range(n)) or {g.args["length"] for g in p} != {p[0].args["length"]}
                          for p in parts):
        raise PlanError(f"the slices of {src!r} do not cover it exactly; the plan has no inverse")
    args = {"dim": dim, "parts": len(parts), "concat_dim": concat_dim, "sizes": sizes,
            "source_shapes": [list(g.target_shape) for g in group]}
    return replace(group[0], source=tuple(g.target for g in group), target=src, transform="stack_concat", args=args,
                   source_shape=group[0].target_shape, target_shape=group[0].source_shape)
