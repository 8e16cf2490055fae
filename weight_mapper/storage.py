"""Stage 5a: how a checkpoint stores its 2-D weights, read off its unambiguous tensors.

A square 2-D weight looks the same stored ``[out, in]`` (``nn.Linear``) or ``[in, out]``
(Hugging Face's ``Conv1D``); its shape cannot say whether it must be transposed. Its
non-square neighbours can: in a GPT-2 state dict every ``c_attn``, ``c_fc`` and ``mlp.c_proj``
weight arrives transposed against an ``nn.Linear`` target, so the square ``attn.c_proj`` does
too. When the module types do not settle it (a state dict has none), each square 2-D match
follows the majority of the non-square ones of its kind: first those of the same source
module kind (its type, else its digit-free module name) into the same target module kind, then
those of the whole checkpoint between the same module types (``""`` when unknown). A decision from split evidence is flagged
``transpose_split``, one without any evidence ``transpose_unknown``.

The same evidence is read before matching, from shapes alone (:func:`infer_storage`): a
state dict whose non-square weights fit the other side's ``nn.Linear`` shapes only transposed
has its modules marked :data:`~weight_mapper.score.INFERRED_IN_OUT`, so that its ``[in, out]``
weights are compared (and converted) transposed, as a ``Conv1D``'s are.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from weight_mapper.score import INFERRED_IN_OUT, LINEAR_TYPES
from weight_mapper.table import TensorTable

__all__ = ["TransposeVote", "infer_storage", "needs_vote", "square_decision", "transpose_votes"]


def _kind(table: TensorTable, row: int) -> str:
    """What a tensor's storage convention is shared with: its module type, else its digit-free module name."""
    mtype = table.module_types[row]
    return mtype if mtype and mtype != INFERRED_IN_OUT else table.module_skeletons[row]


def infer_storage(table: TensorTable, other: TensorTable) -> TensorTable:
    """Mark the untyped modules of ``table`` whose 2-D weights are stored ``[in, out]`` against ``other``.

    Evidence is a non-square 2-D weight of an untyped module whose shape appears among
    ``other``'s ``nn.Linear`` weights only transposed (votes ``[in, out]``) or only as it is
    (votes ``[out, in]``). A module kind (digit-free module name) follows its own votes, a kind
    without any (square weights, or both orientations present) the majority of the whole
    table. Nothing changes unless some kind is found ``[in, out]``.

    Returns:
        ``table`` with :data:`~weight_mapper.score.INFERRED_IN_OUT` as the module type of every
        row of the marked modules (or ``table`` itself when none is marked).

    >>> sd = TensorTable.from_state_dict({"h.attn.c_attn.weight": (4, 12), "h.attn.c_proj.weight": (4, 4)})
    >>> from torch import nn
    >>> model = TensorTable.from_module(nn.ModuleDict({"qkv": nn.Linear(4, 12), "proj": nn.Linear(4, 4)}))
    >>> infer_storage(sd, model).module_types
    ('[in, out]', '[in, out]')
    """
    linear = {other.shapes[r] for r in range(len(other)) if other.module_types[r] in LINEAR_TYPES
              and len(other.shapes[r]) == 2}
    if not linear:
        return table
    votes: dict[str, Counter] = {}
    kinds: dict[int, str] = {}
    for r in range(len(table)):
        shape = table.shapes[r]
        if table.module_types[r] or len(shape) != 2 or table.leaves[r] != "weight":
            continue
        kind = kinds[r] = _kind(table, r)
        counter = votes.get(kind)
        if counter is None:
            counter = votes[kind] = Counter()
        as_is, flipped = shape in linear, shape[::-1] in linear
        if shape[0] != shape[1] and as_is != flipped:
            counter["transposed" if flipped else "copied"] += 1
    overall = sum(votes.values(), Counter())
    if not overall["transposed"]:
        return table
    by_table = overall["transposed"] > overall["copied"]
    marked = {kind for kind, c in votes.items() if (c["transposed"] > c["copied"] if c else by_table)}
    modules = {table.modules[r] for r, kind in kinds.items() if kind in marked}
    if not modules:
        return table
    types = tuple(INFERRED_IN_OUT if m in modules else t for m, t in zip(table.modules, table.module_types))
    return replace(table, module_types=types)


# A vote is split when its minority holds more than this share: one [in, out] projection among
# dozens of [out, in] layers (CLIP's visual.proj) does not make the convention doubtful.
SPLIT_SHARE = 0.25


@dataclass(frozen=True)
class TransposeVote:
    """How a square 2-D match is stored, as its kind's non-square matches vote.

    Attributes:
        transpose: Whether to transpose (the majority; ties copy).
        n_transposed, n_copied: Non-square matches of the deciding kind that needed a
            transpose / a plain copy.
        scope: ``"module"`` (same source module kind), ``"checkpoint"`` (any source module of the
            same target kind) or ``""`` (no evidence).
    """

    transpose: bool
    n_transposed: int
    n_copied: int
    scope: str

    @property
    def flag(self) -> str | None:
        """``transpose_unknown`` without evidence, ``transpose_split`` when the minority holds more
        than :data:`SPLIT_SHARE` of the votes."""
        if not self.scope:
            return "transpose_unknown"
        if min(self.n_transposed, self.n_copied) > SPLIT_SHARE * (self.n_transposed + self.n_copied):
            return "transpose_split"
        return None

    def args(self) -> dict:
        """The evidence as JSON-ready transform arguments, recorded in the plan entry."""
        return {"evidence": {"transposed": self.n_transposed, "copied": self.n_copied, "scope": self.scope or "none"}}


def _keys(src_table: TensorTable, tgt_table: TensorTable, s: int, t: int) -> tuple[tuple, tuple]:
    """(module-level key, checkpoint-level key) of a 2-D match."""
    return (_kind(src_table, s), _kind(tgt_table, t)), (src_table.module_types[s], tgt_table.module_types[t])


def needs_vote(src_table: TensorTable, tgt_table: TensorTable, s: int, t: int) -> bool:
    """A square 2-D match whose module types leave the storage convention open (or only inferred it)."""
    s_shape, t_shape = src_table.shapes[s], tgt_table.shapes[t]
    if len(s_shape) != 2 or s_shape != t_shape or s_shape[0] != s_shape[1]:
        return False
    s_type, t_type = src_table.module_types[s], tgt_table.module_types[t]
    return not (s_type and t_type) or INFERRED_IN_OUT in (s_type, t_type)


def transpose_votes(src_table: TensorTable, tgt_table: TensorTable,
                    pairs: Iterable[tuple[int, int]]) -> Mapping[tuple[int, int], TransposeVote]:
    """Decide every square 2-D match of ``pairs`` whose module types leave it open.

    Args:
        src_table, tgt_table: The two sides.
        pairs: Matched ``(source row, target row)`` pairs (the 1:1 matches and their aliases).

    Returns:
        ``(source row, target row) -> TransposeVote`` for the matches that needed a vote.

    >>> src = TensorTable.from_state_dict({"a.w": (3, 2), "b.w": (2, 2)})
    >>> tgt = TensorTable.from_state_dict({"a.w": (2, 3), "b.w": (2, 2)})
    >>> transpose_votes(src, tgt, [(0, 0), (1, 1)])[(1, 1)].transpose
    True
    """
    pairs = list(pairs)
    module_votes: dict[tuple, Counter] = {}
    checkpoint_votes: dict[tuple, Counter] = {}
    square = []
    for s, t in pairs:
        s_shape, t_shape = src_table.shapes[s], tgt_table.shapes[t]
        if len(s_shape) != 2 or len(t_shape) != 2:
            continue
        if needs_vote(src_table, tgt_table, s, t):
            square.append((s, t))
            continue
        if s_shape[0] == s_shape[1]:
            continue
        vote = "transposed" if s_shape[::-1] == t_shape else "copied" if s_shape == t_shape else None
        if vote is None:
            continue
        module_key, checkpoint_key = _keys(src_table, tgt_table, s, t)
        module_votes.setdefault(module_key, Counter())[vote] += 1
        checkpoint_votes.setdefault(checkpoint_key, Counter())[vote] += 1
    out = {}
    for s, t in square:
        module_key, checkpoint_key = _keys(src_table, tgt_table, s, t)
        out[(s, t)] = square_decision(module_votes.get(module_key), checkpoint_votes.get(checkpoint_key))
    return out


def square_decision(module: Counter | None, checkpoint: Counter | None) -> TransposeVote:
    """The vote of the narrowest scope that has evidence."""
    for scope, votes in (("module", module), ("checkpoint", checkpoint)):
        if votes:
            n_t, n_c = votes["transposed"], votes["copied"]
            return TransposeVote(n_t > n_c, n_t, n_c, scope)
    return TransposeVote(False, 0, 0, "")
