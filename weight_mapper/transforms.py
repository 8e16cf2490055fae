"""The transform registry: what a plan entry does to its source tensor(s) on the way.

Each transform is data in :data:`TRANSFORMS`, one entry that owns every rule about it:

- how to build the target tensor from the entry's source tensors and arguments (``apply``);
- which arguments a plan entry must carry and how they must agree with its shapes
  (``required_args``, ``check_args``; :func:`weight_mapper.validate.check_plan_entry` asks);
- for a 1:1 transform, how a source shape relates to a target shape and the shape score that
  relation earns (``rules``): the matcher's :func:`weight_mapper.score.shape_score` and the
  planner's :func:`weight_mapper.planner.transform_for` both ask :func:`relate`, which tries
  every transform's rules, best score first;
- its inverse: the name of the transform that undoes it and how to build the inverse entries
  (``inverse_args``, ``invert``, ``invert_pieces``), so that any plan can be reversed
  (:func:`invert_entries`).

A new 1:1 transform is one entry here. Applying a transform never scores anything, and this
module imports torch and the standard library only.

| transform | sources | args | inverse | shape relation (score) |
|---|---|---|---|---|
| ``None`` / identity | 1 | | identity | equal shapes (1.0) |
| ``transpose`` | 1 (2-D) | | transpose | reversed 2-D shape (0.7) |
| ``reshape`` | 1 | ``shape`` | reshape | equal but for size-1 dims (0.6); flattened trailing dims (0.55) |
| ``concat`` | n | ``dim``, ``sizes`` (``transposed``: transpose the result) | one ``slice`` per source | |
| ``slice`` | 1 | ``dim``, ``start``, ``length`` (``transposed``: of the source's transpose) | ``concat`` of the slices | |
| ``stack`` | n | ``dim`` | one ``index`` per source | |
| ``index`` | 1 | ``dim``, ``index`` | ``stack`` of the indices | |
| ``stack_concat`` | parts x n | ``dim``, ``parts``, ``concat_dim``, ``sizes`` | one ``slice_index`` per source | |
| ``slice_index`` | 1 | ``dim``, ``index``, ``concat_dim``, ``start``, ``length`` | ``stack_concat`` | |
| ``rotary_half`` | 1 | ``n_heads`` | ``rotary_interleave`` | |
| ``rotary_interleave`` | 1 | ``n_heads`` | ``rotary_half`` | |

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

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from weight_mapper.errors import PlanError
from weight_mapper.validate import MAX_NDIM, Invalid, axis_index, is_int, short

if TYPE_CHECKING:
    from weight_mapper.plan import PlanEntry

__all__ = [
    "FLATTEN_SCORE",
    "INFERRED_IN_OUT",
    "LINEAR_TYPES",
    "RESHAPE_SCORE",
    "TRANSFORMS",
    "TRANSPOSED_SCORE",
    "TRANSPOSED_TYPES",
    "Relation",
    "ShapeRule",
    "Transform",
    "compared_shape",
    "get_transform",
    "invert_entries",
    "relate",
    "stored_transposed",
]

Shape = tuple[int, ...]

# ---------------------------------------------------------------------------- storage conventions
# Module types that store a 2-D weight as [in, out] where the other stores [out, in]: for such
# a pair the source shape is compared transposed, and the plan transposes the weight even when
# it is square (the shapes alone cannot tell).
# INFERRED_IN_OUT is not a class: it marks the modules of a state dict (no types) whose 2-D
# weights its non-square ones show stored [in, out] against the other side's nn.Linear layers
# (:func:`weight_mapper.storage.infer_storage`).
INFERRED_IN_OUT = "[in, out]"
LINEAR_TYPES = ("Linear", "NonDynamicallyQuantizableLinear")
TRANSPOSED_TYPES: frozenset[tuple[str, str]] = frozenset(
    {("Conv1D", "Linear"), ("Linear", "Conv1D")}
    | {pair for t in LINEAR_TYPES for pair in ((INFERRED_IN_OUT, t), (t, INFERRED_IN_OUT))}
)

# Shape scores of the 1:1 relations (equal shapes score 1.0).
TRANSPOSED_SCORE = 0.7  # a 2-D tensor whose target has the reversed shape
RESHAPE_SCORE = 0.6  # equal shapes up to size-1 dims ([C, 1, 1] vs [C])
# A flattened weight: the same first dim and size, other trailing dims. A Linear over a
# flattened [C, H, W] feature map is a conv with an H x W kernel (torchvision's VGG classifier
# [4096, 25088] vs timm's ConvMlp [4096, 512, 7, 7]).
FLATTEN_SCORE = 0.55
# A 4-D conv kernel in TensorFlow / JAX layout [H, W, in, out] against PyTorch's [out, in, H, W]
# (or back): between a transpose and a reshape.
PERMUTE_SCORE = 0.65
_SPATIAL_MAX = 11  # kernel sizes: the dims a conv layout keeps its spatial extent in


@dataclass(frozen=True)
class ShapeRule:
    """One way a 1:1 transform relates a source shape to a target shape.

    Attributes:
        score: The shape score of a pair this rule relates (see :func:`relate`).
        relation: ``(source_shape, target_shape) -> args`` of the transform, or None when the
            rule does not relate the two shapes.
    """

    score: float
    relation: Callable[[Shape, Shape], dict[str, Any] | None]


def _no_args(entry: PlanEntry) -> dict[str, Any]:
    return {}


def _same_args(entry: PlanEntry) -> dict[str, Any]:
    return dict(entry.args)


@dataclass(frozen=True)
class Transform:
    """One registered tensor transform and every rule about it.

    Attributes:
        name: Registry key, stored in plans.
        apply: ``(source tensors, args) -> target tensor``.
        inverse: Name of the transform that undoes this one.
        many_sources: Whether the entry combines several source tensors.
        rules: The 1:1 shape relations the matcher may propose this transform for, each with
            its shape score (none for the transforms only combinations and inverses use).
        through_transpose: For a source whose module type stores 2-D weights transposed
            from the target's (:data:`TRANSPOSED_TYPES`), the transform that does this one's
            work (identity's is ``transpose``, transpose's ``identity``); None: no single
            transform does, the entry copies the tensor as it is.
        inverse_args: ``entry -> args`` of the inverse of a 1:1 entry.
        invert: ``entry -> inverse entries`` for a many-source entry (one per source).
        invert_pieces: ``(source key, entries) -> inverse entry`` for the pieces (slices,
            indices) of one source, rebuilt together.
        required_args: Arguments a plan entry must carry.
        check_args: ``(args, n_sources, source_shape, target_shape)`` raising
            :class:`~weight_mapper.validate.Invalid` when the arguments disagree with the
            shapes (either shape may be None: not recorded).
        transposable: Whether ``args["transposed"]`` applies (a fused ``[in, out]`` weight).
    """

    name: str
    apply: Callable[[Sequence[torch.Tensor], Mapping[str, Any]], torch.Tensor]
    inverse: str
    many_sources: bool = False
    rules: tuple[ShapeRule, ...] = ()
    through_transpose: str | None = None
    inverse_args: Callable[[PlanEntry], dict[str, Any]] = _no_args
    invert: Callable[[PlanEntry], list[PlanEntry]] | None = None
    invert_pieces: Callable[[str, list[PlanEntry]], PlanEntry] | None = None
    required_args: tuple[str, ...] = ()
    check_args: Callable[[Mapping[str, Any], int, list | None, list | None], None] | None = None
    transposable: bool = False


# ---------------------------------------------------------------------------- shape relations
def _equal(s: Shape, t: Shape) -> dict | None:
    return {} if s == t else None


def _reversed_2d(s: Shape, t: Shape) -> dict | None:
    return {} if len(s) == 2 and s[::-1] == t and s != t else None


def _squeezed(s: Shape, t: Shape) -> dict | None:
    """Equal but for size-1 dims: ``[C, 1, 1]`` vs ``[C]``, ``[O, I, 1, 1]`` vs ``[O, I]``."""
    return {"shape": list(t)} if s != t and [d for d in s if d != 1] == [d for d in t if d != 1] else None


def _flattened(s: Shape, t: Shape) -> dict | None:
    """The same first dim and size, other trailing dims (of another rank)."""
    if len(s) != len(t) and min(len(s), len(t)) >= 2 and s[0] == t[0] and math.prod(s) == math.prod(t):
        return {"shape": list(t)}
    return None


# ---------------------------------------------------------------------------- argument checks
def _conv_layout(s: Shape, t: Shape) -> dict | None:
    """A conv kernel in the other framework's layout: ``[H, W, I, O]`` -> ``[O, I, H, W]`` (dims
    ``(3, 2, 0, 1)``) or back (``(2, 3, 1, 0)``). The side whose spatial dims lead is read as HWIO."""
    if len(s) != 4 or len(t) != 4 or s == t:
        return None
    spatial = [d for d in (s[0], s[1], t[2], t[3])]
    if all(d <= _SPATIAL_MAX for d in spatial) and (s[3], s[2], s[0], s[1]) == t:
        return {"dims": [3, 2, 0, 1]}
    if all(d <= _SPATIAL_MAX for d in (s[2], s[3], t[0], t[1])) and (s[2], s[3], s[1], s[0]) == t:
        return {"dims": [2, 3, 1, 0]}
    return None


def _check_permute(args: Mapping[str, Any], n_src: int, src_shape: list | None, tgt_shape: list | None) -> None:
    dims = args["dims"]
    if not (isinstance(dims, list) and all(is_int(d) for d in dims) and sorted(dims) == list(range(len(dims)))):
        raise Invalid(f"args.dims is {short(dims)}: expected a permutation of 0..n-1")
    if src_shape is not None and len(src_shape) != len(dims):
        raise Invalid(f"args.dims {dims} does not permute the {len(src_shape)} dims of source_shape {src_shape}")
    if src_shape is not None and tgt_shape is not None and [src_shape[d] for d in dims] != list(tgt_shape):
        raise Invalid(f"args.dims {dims} turns source_shape {src_shape} into "
                      f"{[src_shape[d] for d in dims]}, not target_shape {tgt_shape}")


def _permute_back(e: PlanEntry) -> dict[str, Any]:
    dims = list(e.args["dims"])
    return {"dims": [dims.index(i) for i in range(len(dims))]}


def _check_reshape(args: Mapping[str, Any], n_src: int, src_shape: list | None, tgt_shape: list | None) -> None:
    shape = args["shape"]
    if not (isinstance(shape, list) and len(shape) <= MAX_NDIM and all(is_int(d) and d >= -1 for d in shape)
            and sum(d == -1 for d in shape) <= 1):
        raise Invalid(f"args.shape is {short(shape)}: expected a list of integers >= 0 (at most one -1)")
    if src_shape is not None and -1 not in shape and math.prod(shape) != math.prod(src_shape):
        raise Invalid(f"args.shape {shape} does not hold the {math.prod(src_shape)} values of source_shape "
                      f"{src_shape}")


def _check_transpose(args: Mapping[str, Any], n_src: int, src_shape: list | None, tgt_shape: list | None) -> None:
    if src_shape is not None and len(src_shape) > 2:
        raise Invalid(f"transform 'transpose' needs a tensor of at most 2 dimensions, source_shape is {src_shape}")


def _check_concat(args: Mapping[str, Any], n_src: int, src_shape: list | None, tgt_shape: list | None) -> None:
    dim = args.get("dim", 0)
    if len(args["sizes"]) != n_src:
        raise Invalid(f"args.sizes has {len(args['sizes'])} sizes for {n_src} sources")
    if tgt_shape:
        d = axis_index(dim, len(tgt_shape), "dim")
        if sum(args["sizes"]) != tgt_shape[d]:
            raise Invalid(f"args.sizes add up to {sum(args['sizes'])}, but target_shape {tgt_shape} has "
                          f"{tgt_shape[d]} along dim {dim}")


def _check_stack(args: Mapping[str, Any], n_src: int, src_shape: list | None, tgt_shape: list | None) -> None:
    dim = args.get("dim", 0)
    if tgt_shape:
        d = axis_index(dim, len(tgt_shape), "dim")
        if tgt_shape[d] != n_src:
            raise Invalid(f"stacking {n_src} sources along dim {dim} cannot give target_shape {tgt_shape}")


def _check_stack_concat(args: Mapping[str, Any], n_src: int, src_shape: list | None,
                        tgt_shape: list | None) -> None:
    parts = args["parts"]
    if parts < 1 or n_src % parts:
        raise Invalid(f"args.parts = {parts} does not divide the {n_src} sources")
    if len(args["sizes"]) != parts:
        raise Invalid(f"args.sizes has {len(args['sizes'])} sizes for {parts} parts")
    if tgt_shape:
        axis_index(args.get("dim", 0), len(tgt_shape), "dim")
        d = axis_index(args["concat_dim"], len(tgt_shape), "concat_dim")
        if sum(args["sizes"]) != tgt_shape[d]:
            raise Invalid(f"args.sizes add up to {sum(args['sizes'])}, but target_shape {tgt_shape} has "
                          f"{tgt_shape[d]} along concat_dim {args['concat_dim']}")


def _check_within(along: str, args: Mapping[str, Any], src_shape: list) -> None:
    """``start + length`` stays inside the source along ``args[along]``."""
    axis = args.get(along, 0)
    d = axis_index(axis, len(src_shape), along)
    if args["start"] + args["length"] > src_shape[d]:
        raise Invalid(f"args.start + args.length = {args['start'] + args['length']} is beyond the "
                      f"{src_shape[d]} rows of source_shape {src_shape} along {along} {axis}")


def _check_index_in(args: Mapping[str, Any], src_shape: list) -> None:
    dim = args.get("dim", 0)
    d = axis_index(dim, len(src_shape), "dim")
    if args["index"] >= src_shape[d]:
        raise Invalid(f"args.index = {args['index']} is beyond the {src_shape[d]} rows of source_shape "
                      f"{src_shape} along dim {dim}")


def _check_slice(args: Mapping[str, Any], n_src: int, src_shape: list | None, tgt_shape: list | None) -> None:
    if src_shape is not None:
        _check_within("dim", args, src_shape)


def _check_index(args: Mapping[str, Any], n_src: int, src_shape: list | None, tgt_shape: list | None) -> None:
    if src_shape is not None:
        _check_index_in(args, src_shape)


def _check_slice_index(args: Mapping[str, Any], n_src: int, src_shape: list | None,
                       tgt_shape: list | None) -> None:
    if src_shape is not None:
        _check_within("concat_dim", args, src_shape)
        _check_index_in(args, src_shape)


def _check_rotary(args: Mapping[str, Any], n_src: int, src_shape: list | None, tgt_shape: list | None) -> None:
    n_heads = args["n_heads"]
    if not is_int(n_heads) or n_heads < 1:
        raise Invalid(f"args.n_heads is {short(n_heads)}: expected an integer >= 1")
    if src_shape and (src_shape[0] % n_heads or (src_shape[0] // n_heads) % 2):
        raise Invalid(f"source_shape {src_shape} has no even number of rows per head for args.n_heads = {n_heads}")


# ---------------------------------------------------------------------------- inverses
def _reshape_back(e: PlanEntry) -> dict[str, Any]:
    return {"shape": list(e.source_shape)}


def _source_shapes(e: PlanEntry) -> list:
    return e.args.get("source_shapes") or [e.source_shape] * len(e.source)


def _pieces_of(e: PlanEntry, transform: str, pieces: list[dict[str, Any]]) -> list[PlanEntry]:
    """One ``transform`` entry per source of the many-source entry ``e``, with ``pieces`` args."""
    return [replace(e, source=(e.target,), target=src, transform=transform, args=args,
                    source_shape=e.target_shape, target_shape=tuple(shape))
            for src, args, shape in zip(e.source, pieces, _source_shapes(e))]


def _slices_of_concat(e: PlanEntry) -> list[PlanEntry]:
    """The inverse of a ``concat`` entry: one ``slice`` per source."""
    dim, sizes = e.args.get("dim", 0), list(e.args["sizes"])
    flag = {"transposed": True} if e.args.get("transposed") else {}
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return _pieces_of(e, "slice", [{"dim": dim, "start": s, "length": n, **flag} for s, n in zip(starts, sizes)])


def _indices_of_stack(e: PlanEntry) -> list[PlanEntry]:
    """The inverse of a ``stack`` entry: one ``index`` per source."""
    dim = e.args.get("dim", 0)
    return _pieces_of(e, "index", [{"dim": dim, "index": i} for i in range(len(e.source))])


def _unstack_concat(e: PlanEntry) -> list[PlanEntry]:
    """The inverse of a ``stack_concat`` entry: one ``slice_index`` per source."""
    parts, sizes = int(e.args["parts"]), list(e.args["sizes"])
    n = len(e.source) // parts
    pieces = []
    for k in range(len(e.source)):
        p, i = divmod(k, n)
        pieces.append({"dim": e.args.get("dim", 0), "index": i, "concat_dim": e.args["concat_dim"],
                       "start": sum(sizes[:p]), "length": sizes[p]})
    return _pieces_of(e, "slice_index", pieces)


def _joined(src: str, group: list[PlanEntry], transform: str, args: dict[str, Any]) -> PlanEntry:
    """The entry that rebuilds ``src`` from its pieces ``group`` (sorted) with ``transform``."""
    args["source_shapes"] = [list(g.target_shape) for g in group]
    return replace(group[0], source=tuple(g.target for g in group), target=src, transform=transform, args=args,
                   source_shape=group[0].target_shape, target_shape=group[0].source_shape)


def _concat_of_slices(src: str, group: list[PlanEntry]) -> PlanEntry:
    """The inverse of the ``slice`` entries of one source: a ``concat``.

    Raises:
        PlanError: If the slices do not cover the source exactly.
    """
    group = sorted(group, key=lambda e: e.args["start"])
    dim = group[0].args.get("dim", 0)
    transposed = bool(group[0].args.get("transposed"))
    whole = tuple(group[0].source_shape)[::-1] if transposed else tuple(group[0].source_shape)
    ends = [g.args["start"] + g.args["length"] for g in group]
    if ([g.args["start"] for g in group] != [0, *ends[:-1]] or ends[-1] != whole[dim]
            or any(bool(g.args.get("transposed")) != transposed for g in group)):
        raise PlanError(f"the slices of {src!r} do not cover it exactly; the plan has no inverse")
    args: dict[str, Any] = {"dim": dim, "sizes": [g.args["length"] for g in group]}
    if transposed:
        args["transposed"] = True
    return _joined(src, group, "concat", args)


def _stack_of_indices(src: str, group: list[PlanEntry]) -> PlanEntry:
    """The inverse of the ``index`` entries of one source: a ``stack``.

    Raises:
        PlanError: If the indices do not cover the source exactly.
    """
    group = sorted(group, key=lambda e: e.args["index"])
    dim = group[0].args.get("dim", 0)
    if [g.args["index"] for g in group] != list(range(group[0].source_shape[dim])):
        raise PlanError(f"the indices of {src!r} do not cover it exactly; the plan has no inverse")
    return _joined(src, group, "stack", {"dim": dim})


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
    return _joined(src, group, "stack_concat", {"dim": dim, "parts": len(parts), "concat_dim": concat_dim,
                                                "sizes": sizes})


# ---------------------------------------------------------------------------- the registry
# Results are contiguous copies: safetensors refuses non-contiguous views, and a copy never
# aliases (and so never lets a later write corrupt) the source checkpoint's memory.
TRANSFORMS: dict[str, Transform] = {
    t.name: t
    for t in (
        Transform("identity", lambda ts, a: ts[0], "identity", rules=(ShapeRule(1.0, _equal),),
                  through_transpose="transpose"),
        Transform("transpose", lambda ts, a: ts[0].t().contiguous(), "transpose",
                  rules=(ShapeRule(TRANSPOSED_SCORE, _reversed_2d),), through_transpose="identity",
                  check_args=_check_transpose),
        Transform("reshape", lambda ts, a: ts[0].reshape(tuple(a["shape"])).contiguous(), "reshape",
                  rules=(ShapeRule(RESHAPE_SCORE, _squeezed), ShapeRule(FLATTEN_SCORE, _flattened)),
                  inverse_args=_reshape_back, required_args=("shape",), check_args=_check_reshape),
        Transform("permute", lambda ts, a: ts[0].permute(*a["dims"]).contiguous(), "permute",
                  rules=(ShapeRule(PERMUTE_SCORE, _conv_layout),), inverse_args=_permute_back,
                  required_args=("dims",), check_args=_check_permute),
        Transform("concat", lambda ts, a: _maybe_t(torch.cat(list(ts), dim=a.get("dim", 0)), a), "slice", True,
                  invert=_slices_of_concat, required_args=("sizes",), check_args=_check_concat, transposable=True),
        Transform(
            "slice", lambda ts, a: _maybe_t(ts[0], a).narrow(a.get("dim", 0), a["start"], a["length"]).contiguous(),
            "concat", invert_pieces=_concat_of_slices, required_args=("start", "length"), check_args=_check_slice,
            transposable=True,
        ),
        Transform("stack", lambda ts, a: torch.stack(list(ts), dim=a.get("dim", 0)), "index", True,
                  invert=_indices_of_stack, check_args=_check_stack),
        Transform("index", lambda ts, a: ts[0].select(a.get("dim", 0), a["index"]).contiguous(), "stack",
                  invert_pieces=_stack_of_indices, required_args=("index",), check_args=_check_index),
        Transform("stack_concat", lambda ts, a: _stack_concat(ts, a), "slice_index", True, invert=_unstack_concat,
                  required_args=("parts", "concat_dim", "sizes"), check_args=_check_stack_concat),
        Transform(
            "slice_index",
            lambda ts, a: ts[0].narrow(a["concat_dim"], a["start"], a["length"]).select(a.get("dim", 0), a["index"])
            .contiguous(),
            "stack_concat", invert_pieces=_restack_concat, required_args=("index", "concat_dim", "start", "length"),
            check_args=_check_slice_index,
        ),
        Transform("rotary_half", lambda ts, a: _rotary(ts[0], a, to_half=True), "rotary_interleave",
                  inverse_args=_same_args, required_args=("n_heads",), check_args=_check_rotary),
        Transform("rotary_interleave", lambda ts, a: _rotary(ts[0], a, to_half=False), "rotary_half",
                  inverse_args=_same_args, required_args=("n_heads",), check_args=_check_rotary),
    )
}


def _ordered_rules(transforms: Mapping[str, Transform]) -> tuple[tuple[float, str, Callable], ...]:
    """Every transform's shape rules, best score first: the first that relates a pair decides it."""
    return tuple(sorted(((r.score, t.name, r.relation) for t in transforms.values() for r in t.rules),
                        key=lambda x: -x[0]))


_RULES = _ordered_rules(TRANSFORMS)


class Relation(NamedTuple):
    """How a source tensor becomes a target tensor of another shape: the transform (None for
    a plain copy), its arguments and the shape score of the relation."""

    transform: str | None
    args: dict[str, Any]
    score: float


def stored_transposed(source_type: str, target_type: str) -> bool:
    """Whether the two module types store 2-D weights transposed from each other.

    >>> stored_transposed("Conv1D", "Linear"), stored_transposed("Linear", "Linear")
    (True, False)
    """
    return (source_type, target_type) in TRANSPOSED_TYPES


def compared_shape(source_shape: Sequence[int], transposed_types: bool) -> Shape:
    """The source shape as the target's module stores it: a 2-D weight of a module type that
    stores it transposed (:func:`stored_transposed`) is compared as its transpose."""
    shape = tuple(source_shape)
    return shape[::-1] if transposed_types and len(shape) == 2 else shape


def relate(source_shape: Sequence[int], target_shape: Sequence[int], source_type: str = "",
           target_type: str = "", *, transposed_types: bool | None = None) -> Relation | None:
    """The 1:1 transform that turns a source tensor into a target tensor, and its shape score.

    Every transform's :class:`ShapeRule` s are tried, best score first. For module types that
    store 2-D weights transposed from each other (``transposed_types``, by default read off
    the two types) the rules compare the source's transpose, and the transform found is
    replaced by its ``through_transpose``.

    Returns:
        The relation, or None when no registered transform relates the two shapes.

    >>> relate((3, 2), (2, 3))
    Relation(transform='transpose', args={}, score=0.7)
    >>> relate((8, 1, 1), (8,)).transform, relate((16, 72), (16, 8, 3, 3)).score
    ('reshape', 0.55)
    >>> relate((4, 4), (4, 4), "Conv1D", "Linear")
    Relation(transform='transpose', args={}, score=1.0)
    """
    if transposed_types is None:
        transposed_types = stored_transposed(source_type, target_type)
    flipped = transposed_types and len(source_shape) == 2
    s, t = compared_shape(source_shape, flipped), tuple(target_shape)
    for score, name, relation in _RULES:
        args = relation(s, t)
        if args is None:
            continue
        found: str | None = name
        if flipped:
            found, args = TRANSFORMS[name].through_transpose, {}
        return Relation(None if found in (None, "identity") else found, args, score)
    return None


# ---------------------------------------------------------------------------- applying
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


# ---------------------------------------------------------------------------- inverting
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
    # slice / index entries grouped by their source, with the function that rebuilds it
    pieces: dict[str, tuple[Callable[[str, list[PlanEntry]], PlanEntry], list[PlanEntry]]] = {}
    for e in entries:
        transform = get_transform(e.transform)
        if transform.invert_pieces is not None:
            pieces.setdefault(e.source[0], (transform.invert_pieces, []))[1].append(e)
        elif transform.invert is not None:
            out.extend(transform.invert(e))
        elif e.source[0] not in seen:  # a source copied to several targets comes back once
            seen.add(e.source[0])
            out.append(replace(e, source=(e.target,), target=e.source[0],
                               transform=None if transform.inverse == "identity" else transform.inverse,
                               args=transform.inverse_args(e), source_shape=e.target_shape,
                               target_shape=e.source_shape))
    for src, (invert_pieces, group) in pieces.items():
        out.append(invert_pieces(src, group))
    return out
