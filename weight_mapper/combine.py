"""Stage 4b: combined matches, where one target tensor is built from several source tensors.

After the 1:1 assignment, a target tensor left without a partner may be the concatenation of
sibling source tensors (separate ``q_proj, k_proj, v_proj`` -> one fused ``qkv`` or
``in_proj_weight``; ``gate_proj + up_proj`` -> ``gate_up_proj``; unequal parts as in
grouped-query attention) or the stack of a ModuleList's tensors (N experts -> one 3-D
tensor), or both: a stack of per-item concatenations (N experts' ``w1`` and ``w3`` -> one
``gate_up_proj`` ``[N, 2I, H]``, transform ``stack_concat``). Candidate source sets are found
from shapes and the module tree alone; each is
scored like any match (its first tensor stands for its name and place) and the best one-to-one
choice is made with ``linear_sum_assignment``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from weight_mapper.assign import Assignment, _module_map, pair_margins, solve_optimal
from weight_mapper.names import name_indices, name_tokens, split_name
from weight_mapper.score import (
    BASE_COMPONENTS,
    CONTEXT,
    LINEAR_TYPES,
    TRANSPOSED_TYPES,
    Items,
    context_score,
    forbidden,
    score_edges,
    weighted_base,
    with_context,
)
from weight_mapper.table import TensorTable
from weight_mapper.tree import ModuleTree

__all__ = ["Combination", "combine", "split", "PART_ROLES", "part_role", "spelled_roles"]


@dataclass(frozen=True)
class Combination:
    """A target tensor built from several source rows.

    Attributes:
        src: Source tensor rows, in the order they are combined.
        tgt: Target tensor row.
        transform: ``"concat"``, ``"stack"`` (along dim 0) or ``"stack_concat"`` (``parts``
            stacks along dim 0, concatenated along dim 1; ``src`` part-major).
        score, margin: As for 1:1 matches.
        components: The :data:`~weight_mapper.score.REPORTED_COMPONENTS` of the representative
            (``shape`` is 1: the set fits the target exactly).
        parts: Number of parts of a ``stack_concat`` (1 otherwise).
        transposed: The single side is stored ``[in, out]`` (``Conv1D``) and the set are
            ``nn.Linear`` weights: the concat is transposed (a split slices the transpose).
    """

    src: tuple[int, ...]
    tgt: int
    transform: str
    score: float
    margin: float
    components: Mapping[str, float]
    parts: int = 1
    transposed: bool = False


def _concat_runs(table: TensorTable, rows: np.ndarray) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Runs of sibling tensors (same parent module, leaf and module type) that can be concatenated on dim 0.

    Siblings whose trailing dims differ are skipped, not run-breaking: a SwiGLU's ``w1, w2,
    w3`` gives the run ``(w1, w3)`` (gate and up, fused into ``gate_up_proj``).
    """
    groups: dict[tuple[str, str, str, tuple[int, ...]], list[int]] = {}
    shapes, modules, leaves, types = table.shapes, table.modules, table.leaves, table.module_types
    for r in np.asarray(rows).tolist():
        shape = shapes[r]
        if shape:  # like layers only: q/k/v are all Linear, a conv's bias never fuses with a norm's
            key = (split_name(modules[r])[0], leaves[r], types[r], shape[1:])
            groups.setdefault(key, []).append(r)
    out = []
    for (*_, trailing), members in groups.items():
        if len(members) < 2:  # a lone sibling makes no run
            continue
        members = _in_part_order(table, sorted(members))
        for i in range(len(members)):
            total = table.shapes[members[i]][0]
            for j in range(i + 1, len(members)):
                total += table.shapes[members[j]][0]
                out.append((tuple(members[i:j + 1]), (total, *trailing)))
    return out


# Module types storing 2-D weights [in, out] against nn.Linear's [out, in].
IN_OUT_TYPES = frozenset(a for a, b in TRANSPOSED_TYPES if b in LINEAR_TYPES and a not in LINEAR_TYPES)

# The parts fused tensors are made of, by the words their modules are named with: family and
# rank in the order the field fuses them (q, k, v; gate, up). A fused tensor is concatenated in
# this order whatever order its parts' keys sort in (a safetensors header has key < query < value).
PART_ROLES: dict[str, tuple[str, int]] = {
    **{w: ("attn", 0) for w in ("q", "query", "wq", "queries")},
    **{w: ("attn", 1) for w in ("k", "key", "wk", "keys")},
    **{w: ("attn", 2) for w in ("v", "value", "wv", "values")},
    **{w: ("attn", 3) for w in ("o", "out", "output", "wo")},
    **{w: ("mlp", 0) for w in ("gate", "w1")},
    **{w: ("mlp", 1) for w in ("up", "w3")},
    **{w: ("mlp", 2) for w in ("down", "w2")},
}
_WORD = re.compile(r"[a-z]+\d*")


def part_role(module: str) -> tuple[str, int] | None:
    """The part a module stands for, from the last component of its path.

    >>> part_role("model.layers.0.self_attn.k_proj"), part_role("attention.self.query"), part_role("mlp.fc1")
    (('attn', 1), ('attn', 0), None)
    """
    return _component_role(module.rpartition(".")[2])


@functools.lru_cache(maxsize=65536)
def _component_role(component: str) -> tuple[str, int] | None:
    # Names of big models repeat a few components thousands of times: read each once.
    roles = {PART_ROLES[w] for w in _WORD.findall(component.lower()) if w in PART_ROLES}
    return roles.pop() if len(roles) == 1 else None


def spelled_roles(module: str) -> list[tuple[str, int]]:
    """The parts a fused module's name spells, in its order (``qkv``, ``kv_proj``, ``gate_up_proj``).

    >>> [r for _, r in spelled_roles("attn.kvq")], [r for _, r in spelled_roles("mlp.gate_up_proj")]
    ([1, 2, 0], [0, 1])
    """
    out = []
    for word in _WORD.findall(module.rpartition(".")[2].lower()):
        if word in PART_ROLES:
            out.append(PART_ROLES[word])
        elif len(word) > 1 and set(word) <= {"q", "k", "v", "o"}:
            out.extend(PART_ROLES[c] for c in word)
    return out


def _in_part_order(table: TensorTable, rows: list[int]) -> list[int]:
    """Sibling rows in the order the field fuses them, when every one names its part; else as given."""
    roles = [part_role(table.modules[r]) for r in rows]
    if None in roles or len({f for f, _ in roles}) != 1 or len(set(roles)) != len(roles):
        return rows
    return [r for _, r in sorted(zip(roles, rows))]


# Parts never fused with the others of their family (an output projection, a down projection).
_NEVER_FUSED = frozenset({("attn", 3), ("mlp", 2)})


def _fits_roles(table: TensorTable, rows: Sequence[int], fused_module: str) -> bool:
    """Whether a set of parts can be the fused tensor of ``fused_module`` by their names.

    A fused name that spells its parts (``qkv_proj``, ``gate_up_proj``, ``kv``) takes exactly
    those parts; one that does not (``in_proj``, ``c_attn``) never takes an output or down
    projection, and parts that name a role never fuse with parts that do not (``k, v, proj``).
    Parts none of which names a role are not judged here.

    >>> t = TensorTable.from_state_dict({f"a.{p}.weight": (2, 2) for p in ("q", "k", "v", "o", "proj")})
    >>> _fits_roles(t, [0, 1, 2], "a.qkv"), _fits_roles(t, [1, 2, 3], "a.qkv"), _fits_roles(t, [1, 2, 3], "a.in_proj")
    (True, False, False)
    >>> _fits_roles(t, [1, 2, 4], "a.c_attn")
    False
    """
    roles = [part_role(table.modules[r]) for r in rows]
    if all(r is None for r in roles):
        return True
    if None in roles:  # named parts (q, k) never fuse with unnamed ones (proj)
        return False
    spelled = spelled_roles(fused_module)
    if spelled:
        return set(roles) == set(spelled)
    return not _NEVER_FUSED.intersection(roles)


def _as_spelled(table: TensorTable, rows: tuple[int, ...], fused_module: str) -> tuple[int, ...]:
    """A concat's parts in the order the fused counterpart's name spells them (``kvq``), if it does."""
    spelled = spelled_roles(fused_module)
    roles = [part_role(table.modules[r]) for r in rows]
    if not spelled or None in roles or not set(roles) <= set(spelled) or len(set(roles)) != len(roles):
        return rows
    return tuple(r for _, r in sorted(zip([spelled.index(x) for x in roles], rows)))


def _item_key(name: str) -> tuple[str, int] | None:
    """``(name with its last numeric path component as *, that number)``: a ModuleList item."""
    parts = name.split(".")
    for k in range(len(parts) - 1, -1, -1):
        if parts[k].isdecimal():
            number, parts[k] = int(parts[k]), "*"
            return ".".join(parts), number
    return None


def _stacked_runs(table: TensorTable, runs) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
    """Stacks of the same run over consecutive ModuleList items (names equal but for the last
    numeric path component).

    A run of one tensor gives a plain stack (N experts' ``w2`` -> ``[N, H, I]``); a concat run
    a stack of concatenations. Returns ``(source rows part-major, stacked shape, parts)``: N
    experts' ``(w1, w3)`` give ``(e0.w1, ..., eN.w1, e0.w3, ..., eN.w3)`` for ``[N, 2I, H]``.
    """
    groups: dict[tuple, dict[int, tuple[int, ...]]] = {}
    names, shapes = table.names, table.shapes
    item_keys: dict[int, tuple[str, int] | None] = {}  # a row is in several runs: its key is read once

    def item_key(row: int) -> tuple[str, int] | None:
        if row not in item_keys:
            item_keys[row] = _item_key(names[row])
        return item_keys[row]

    for members, _ in runs:
        if len(members) == 1:  # most runs: one tensor, a plain stack's item
            key = item_key(members[0])
            if key is not None:
                groups.setdefault(((key[0],), (shapes[members[0]],)), {})[key[1]] = members
            continue
        keys = [item_key(r) for r in members]
        if None in keys or len({k[1] for k in keys}) != 1:
            continue
        pattern = (tuple(k[0] for k in keys), tuple(shapes[r] for r in members))
        groups.setdefault(pattern, {})[keys[0][1]] = members
    out = []
    for (_, shapes), items in groups.items():
        indices = sorted(items)
        if len(indices) < 2 or indices != list(range(indices[0], indices[0] + len(indices))):
            continue
        parts = len(shapes)
        rows = tuple(items[i][p] for p in range(parts) for i in indices)
        item_shape = shapes[0] if parts == 1 else (sum(sh[0] for sh in shapes), *shapes[0][1:])
        out.append((rows, (len(indices), *item_shape), parts))
    return out


def fused_name(names: Sequence[str]) -> str:
    """The name a concatenation of sibling tensors would have: the parts' modules run together.

    Fused tensors are usually named after their parts (``qkv``, ``wqkv``, ``gate_up_proj``):
    single letters are run together, longer names joined with ``_``.

    >>> fused_name(["attn.q.weight", "attn.k.weight", "attn.v.weight"])
    'attn.qkv.weight'
    >>> fused_name(["mlp.gate_proj.weight", "mlp.up_proj.weight"])
    'mlp.gate_proj_up_proj.weight'
    """
    leaf = split_name(names[0])[1]
    parents, parts = zip(*(split_name(split_name(n)[0]) for n in names))
    joined = ("" if all(len(p) == 1 for p in parts) else "_").join(parts)
    return ".".join(x for x in (parents[0], joined, leaf) if x)


def _named_as_sets(items: Items, table: TensorTable, candidates) -> Items:
    """Name each concat candidate after its whole set (:func:`fused_name`), not its first tensor.

    Scored by its first tensor alone, the run ``(k, v, o)`` looks as much like ``qkv`` as
    ``(q, k, v)`` does; named as a set, ``kvo`` does not.
    """
    labels, tokens = list(items.labels), list(items.tokens)
    skeletons, indices = list(items.skeletons), list(items.indices)
    for k, (rows, _, transform, _) in enumerate(candidates):
        if transform == "concat":  # the others keep their first tensor's name, already read
            labels[k] = fused_name([table.names[r] for r in rows])
            tokens[k], indices[k] = name_tokens(labels[k]), name_indices(labels[k])
            skeletons[k] = ".".join(tokens[k])
    return replace(items, labels=tuple(labels), tokens=tuple(tokens), skeletons=tuple(skeletons),
                   indices=tuple(indices), path_indices=())


def _joint(total: np.ndarray, candidates, pair_c: np.ndarray, src_table: TensorTable, tgt_table: TensorTable,
           tgt_rows: np.ndarray) -> np.ndarray:
    """Score a candidate together with its module's other tensors: the mean over the pairs that
    combine the same source modules into the same target module.

    A fused ``qkv`` weight and bias must come from the same three modules; scored alone, the
    bias run ``k, v, o`` can edge out ``q, k, v`` on noise.
    """
    modules: dict[int, tuple[str, ...]] = {}  # a candidate is in many pairs: its modules are read once
    for c in pair_c.tolist():
        if c not in modules:
            modules[c] = tuple(src_table.modules[r] for r in candidates[c][0])
    keys = [(modules[c], tgt_table.modules[t]) for c, t in zip(pair_c.tolist(), tgt_rows.tolist())]
    key_ids = {}
    ids = np.array([key_ids.setdefault(k, len(key_ids)) for k in keys], dtype=np.int64)
    sums = np.bincount(ids, weights=total, minlength=len(key_ids))
    counts = np.bincount(ids, minlength=len(key_ids))
    return sums[ids] / counts[ids]


def combine(
    src_table: TensorTable,
    tgt_table: TensorTable,
    assignment: Assignment,
    *,
    weights: Mapping[str, float],
    threshold: float,
    incompatible_pairs: Sequence[tuple[Sequence[str], Sequence[str]]] = (),
    skip_src: np.ndarray | None = None,
) -> list[Combination]:
    """Propose concat / stack matches for targets the 1:1 assignment left unfilled.

    Source sets are drawn from every source tensor, also those the 1:1 assignment used: a
    ``query`` weight may have been given to ``out_proj`` only because the fused
    ``in_proj_weight`` it belongs to had no 1:1 partner. The caller re-runs the 1:1
    assignment without the rows the combinations take.

    Args:
        src_table, tgt_table: The two sides.
        assignment: The 1:1 assignment (its matches give the module map used as context).
        weights, threshold, incompatible_pairs, skip_src: As for :func:`weight_mapper.assign.assign`.

    Returns:
        Non-overlapping combinations scoring at least ``threshold``.
    """
    left_tgt = np.setdiff1d(np.flatnonzero(tgt_table.is_canonical), assignment.tgt)
    left_src = np.setdiff1d(np.flatnonzero(src_table.is_canonical), same_name_matches(src_table, tgt_table, assignment))
    if skip_src is not None and len(skip_src):
        left_src = np.setdiff1d(left_src, skip_src)
    return _propose(src_table, tgt_table, assignment, left_src, left_tgt,
                    weights=weights, threshold=threshold, incompatible_pairs=incompatible_pairs)


def same_name_matches(src_table: TensorTable, tgt_table: TensorTable, assignment: Assignment) -> np.ndarray:
    """Source rows the 1:1 assignment gave the target of the same name (after a wrapper prefix one
    side adds, ``assignment.offset``).

    Identical names are decisive (they were pinned): no combination may take such a row. A
    detector's backbone ``layer2.0.bn1.weight`` stays ``backbone.body.layer2.0.bn1.weight`` although
    it and ``bn2.weight`` add up to the size of a new FPN bias.
    """
    if not len(assignment.src):
        return np.zeros(0, np.int64)
    src_prefix, tgt_prefix = assignment.offset

    def bare(name: str, prefix: str) -> str:
        return name[len(prefix):] if prefix and name.startswith(prefix) else name

    same = [bare(src_table.names[s], src_prefix) == bare(tgt_table.names[t], tgt_prefix)
            for s, t in zip(assignment.src.tolist(), assignment.tgt.tolist())]
    return assignment.src[np.array(same, dtype=bool)].astype(np.int64)


def split(
    src_table: TensorTable,
    tgt_table: TensorTable,
    assignment: Assignment,
    *,
    weights: Mapping[str, float],
    threshold: float,
    incompatible_pairs: Sequence[tuple[Sequence[str], Sequence[str]]] = (),
    taken: Sequence[Combination] = (),
    skip_src: np.ndarray | None = None,
) -> list[Combination]:
    """Propose splits: one fused source tensor the 1:1 assignment left unmatched into several targets.

    The mirror image of :func:`combine`, found by the same code with the sides swapped: runs of
    sibling target tensors (``q_proj, k_proj, v_proj``, GQA sizes included; every expert's
    tensor) whose concatenation or stack has the source's shape. Target sets are drawn from
    every target tensor not ``taken`` by a combination; the caller re-runs the 1:1 assignment
    without the rows the splits take.

    ``skip_src`` rows (a losing tower, see :mod:`weight_mapper.towers`) are never split.

    Returns:
        Non-overlapping splits scoring at least ``threshold``, each as the :class:`Combination`
        that would rebuild the source: ``src`` are **target** rows (in the source's part order),
        ``tgt`` the **source** row.
    """
    taken_src = np.array([r for c in taken for r in c.src], dtype=np.int64)
    taken_tgt = np.array([c.tgt for c in taken], dtype=np.int64)
    left_src = np.setdiff1d(np.flatnonzero(src_table.is_canonical), np.concatenate([assignment.src, taken_src]))
    if skip_src is not None and len(skip_src):
        left_src = np.setdiff1d(left_src, skip_src)
    tgt_rows = np.setdiff1d(np.flatnonzero(tgt_table.is_canonical), taken_tgt)
    mirrored = replace(assignment, src=assignment.tgt, tgt=assignment.src)
    return _propose(tgt_table, src_table, mirrored, tgt_rows, left_src, weights=weights, threshold=threshold,
                    incompatible_pairs=[(b, a) for a, b in incompatible_pairs])


def _held_better(assignment: Assignment, candidates: list, pair_c: np.ndarray, total: np.ndarray,
                 n_rows: int) -> np.ndarray:
    """Per (set, target) pair: True where most of the set's tensors hold 1:1 matches that score at
    least as well as the set would.

    A set may take tensors the 1:1 assignment used, but only to rescue them from worse matches:
    T5's encoder ``q``, ``k`` and ``v``, each matched 1:1 at 0.9 by their own names, are no split
    of the embedding whose row count their sum happens to equal (score 0.73).
    """
    held = np.full(n_rows, -np.inf)
    held[assignment.src] = assignment.score
    # The (n // 2 + 1)-th best 1:1 score of each set: a majority scores at least that.
    kth = np.array([np.sort(held[list(rows)])[::-1][len(rows) // 2] for rows, _, _, _ in candidates])
    return kth[pair_c] >= total


def _propose(
    src_table: TensorTable,
    tgt_table: TensorTable,
    assignment: Assignment,
    left_src: np.ndarray,
    left_tgt: np.ndarray,
    *,
    weights: Mapping[str, float],
    threshold: float,
    incompatible_pairs: Sequence[tuple[Sequence[str], Sequence[str]]],
) -> list[Combination]:
    """Sets of ``left_src`` rows (concat / stack runs) matched one-to-one onto single ``left_tgt`` rows."""
    if len(left_src) < 2 or len(left_tgt) == 0:
        return []
    runs = _concat_runs(src_table, left_src)
    # 0-d tensors (num_batches_tracked) are counters, never parts of a stack.
    singles = [((r,), src_table.shapes[r]) for r in left_src.tolist() if src_table.shapes[r]]
    candidates = [(rows, shape, "concat", 1) for rows, shape in runs]
    candidates += [(rows, shape, "stack" if parts == 1 else "stack_concat", parts)
                   for rows, shape, parts in _stacked_runs(src_table, singles + runs)]
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for k, (_, shape, _, _) in enumerate(candidates):
        by_shape.setdefault(tuple(shape), []).append(k)
    # A fused weight stored [in, out] (Conv1D) is the transpose of its nn.Linear parts' concat.
    in_out = np.array([len(tgt_table.shapes[t]) == 2 and tgt_table.module_types[t] in IN_OUT_TYPES
                       for t in left_tgt], dtype=bool)
    lookup_shape = [tuple(tgt_table.shapes[t])[::-1] if in_out[j] else tuple(tgt_table.shapes[t])
                    for j, t in enumerate(left_tgt)]
    tgt_by_shape: dict[tuple, list[int]] = {}
    for j in range(len(left_tgt)):
        tgt_by_shape.setdefault((lookup_shape[j], bool(in_out[j])), []).append(j)
    # Every candidate against every unfilled target of its shape, one block per shape.
    blocks = []
    for (shape, flipped), js in tgt_by_shape.items():
        ks = by_shape.get(shape, [])
        if flipped:  # only concats of nn.Linear parts
            ks = [k for k in ks if candidates[k][2] == "concat" and src_table.module_types[candidates[k][0][0]]
                  in LINEAR_TYPES]
        if ks:
            blocks.append((np.tile(ks, len(js)), np.repeat(js, len(ks))))
    if not blocks:
        return []
    pair_c = np.concatenate([c for c, _ in blocks]).astype(np.int64)
    pair_t = np.concatenate([t for _, t in blocks]).astype(np.int64)

    # Score each (candidate set, target) like a 1:1 match of the set's first tensor.
    src_tree, tgt_tree = ModuleTree.of(src_table), ModuleTree.of(tgt_table)
    reps = np.array([rows[0] for rows, _, _, _ in candidates], dtype=np.int64)
    # Ranks are taken among the candidates of one shape, as in a 1:1 bucket: a set that fits no
    # target of its shape must not shift the order scores of those that compete. Overlapping
    # runs make more candidates than targets ((q, k, v) and (k, v, o) per layer for one qkv),
    # and then the k-th candidate's rank says nothing about which target it is: no rank.
    shape_id = {shape: i for i, shape in enumerate(by_shape)}
    s_bucket = np.array([shape_id[tuple(shape)] for _, shape, _, _ in candidates], dtype=np.int64)
    t_bucket = np.array([shape_id.get(lookup_shape[j], -1 - j) for j in range(len(left_tgt))], dtype=np.int64)
    unbalanced = np.bincount(s_bucket, minlength=len(shape_id)) != np.bincount(t_bucket[t_bucket >= 0],
                                                                            minlength=len(shape_id))
    s_items = _named_as_sets(Items.of_tensors(src_table, src_tree, reps), src_table, candidates)
    s_items = s_items.with_ranks(s_bucket, unbalanced[s_bucket])
    t_items = Items.of_tensors(tgt_table, tgt_tree, left_tgt).with_ranks(
        t_bucket, (t_bucket >= 0) & unbalanced[np.maximum(t_bucket, 0)])
    scores = score_edges(s_items, t_items, pair_c, pair_t, weights=weights)
    scores["shape"] = np.ones(len(pair_c))  # the set fits the target exactly
    base = weighted_base(weights, scores)
    matched_s = Items.of_tensors(src_table, src_tree, assignment.src)
    matched_t = Items.of_tensors(tgt_table, tgt_tree, assignment.tgt)
    module_map, _ = _module_map(matched_s, matched_t, np.arange(len(assignment.src)), np.arange(len(assignment.tgt)),
                                len(src_tree), margin=assignment.margin)
    ctx = context_score(s_items, t_items, pair_c, pair_t, module_map)
    total = _joint(with_context(base, ctx), candidates, pair_c, src_table, tgt_table, left_tgt[pair_t])
    allowed = ~forbidden(s_items, t_items, pair_c, pair_t, incompatible_pairs)
    allowed &= ~_held_better(assignment, candidates, pair_c, total, len(src_table))
    fits = {(c, t): _fits_roles(src_table, candidates[c][0], tgt_table.modules[left_tgt[t]])
            for c, t in set(zip(pair_c.tolist(), pair_t.tolist())) if candidates[c][2] == "concat"}
    if fits:
        allowed &= np.array([fits.get((c, t), True) for c, t in zip(pair_c.tolist(), pair_t.tolist())], dtype=bool)

    weight = np.zeros((len(candidates), len(left_tgt)))
    weight[pair_c, pair_t] = np.where(allowed & (total >= threshold), total, 0.0)
    rows, cols = solve_optimal(weight)
    margin, _ = pair_margins(weight, rows, cols)
    lookup = {(c, t): e for e, (c, t) in enumerate(zip(pair_c.tolist(), pair_t.tolist()))}
    chosen = sorted(zip(rows.tolist(), cols.tolist(), margin.tolist()), key=lambda x: -weight[x[0], x[1]])
    used: set[int] = set()
    out = []
    for k, j, m in chosen:  # overlapping runs (q,k,v vs k,v,o): the better-scoring one wins
        src_rows, _, transform, parts = candidates[k]
        if used.intersection(src_rows):
            continue
        used.update(src_rows)
        e = lookup[(k, j)]
        if transform == "concat":
            src_rows = _as_spelled(src_table, src_rows, tgt_table.modules[left_tgt[j]])
        out.append(Combination(
            src=tuple(int(r) for r in src_rows), tgt=int(left_tgt[j]), transform=transform,
            score=float(total[e]), margin=float(m),
            components={**{c: float(scores[c][e]) for c in BASE_COMPONENTS}, CONTEXT: float(ctx[e])},
            parts=parts,
            transposed=bool(in_out[j]),
        ))
    return sorted(out, key=lambda c: c.tgt)
