"""Stage 4: the one-to-one assignment of source tensors to target tensors.

Module groups are bucketed by signature and each bucket is solved on its own score matrix;
tensors of groups left over fall back to per-tensor buckets keyed by size. Within a bucket
the solver is ``scipy.optimize.linear_sum_assignment`` (strategy ``best_match``, optimal) or
the highest-score-first greedy of the reference design (strategy ``greedy``). The hierarchy
context (do the parents already map onto each other?) is recomputed from the assignment and
the buckets re-solved until the assignment stops changing. The first, context-free round only
seeds the module map and is solved highest-first for both strategies; every later round uses
the strategy's own solver.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
from scipy.optimize import linear_sum_assignment

from weight_mapper import candidates
from weight_mapper.score import (
    BASE_COMPONENTS,
    CONTEXT,
    REPORTED_COMPONENTS,
    SUB_SCORES,
    Items,
    context_score,
    forbidden,
    score_edges,
    with_context,
)
from weight_mapper.plan import AMBIGUITY_MARGIN  # re-exported: the plan owns it, the matcher reads it
from weight_mapper.table import TensorTable
from weight_mapper.tree import GroupTable, ModuleTree

__all__ = [
    "SOLVERS",
    "AMBIGUITY_MARGIN",
    "MAX_ROUNDS",
    "Assignment",
    "solve_optimal",
    "solve_greedy",
    "pair_margins",
    "assign",
]

_UNMATCHED = -1
MAX_ROUNDS = 10  # bound on hierarchy-context rounds
_TIE_EPS = 1e-7  # breaks exact ties by relative order, never outweighs a real difference
_NAME_DISAGREES = 0.05  # an alternative whose name score is this much better flags the match
# An alternative whose name score is within this of the chosen one's (or better) leaves the
# names undecided: spelling noise between position-free names (``oak`` / ``ash``) is no evidence.
_NAME_TIE = 0.02
#: A match that a doubtful match could be exchanged with, losing less than this of their summed
#: score, is itself doubtful (:func:`_swap_partners`).
SWAP_PARTNER_MARGIN = 0.05
_SWAP_BUCKET_MAX = 64  # buckets up to this many pairs: every pair is a possible swap partner
_VOTE_FLOOR = 1e-3  # a match's vote for its modules' mapping weighs this plus its margin
# Solver of the context-free round that only seeds the first module map (see _solve_level).
# An exact assignment of the base scores alone is a poor seed where many candidates nearly tie
# (layers told apart by order only): it resolves the near-ties globally, trading the pairs of
# whole blocks for gains of 1e-3, so the map it votes for is scrambled and the later rounds,
# exact as they are, climb from there to a worse fixed point (benchmarks/scale: the
# ``ambiguous`` family). Highest-first keeps the strongest local pairs together. For the greedy
# strategy this is its own first round, so greedy is unchanged.
_SEED_SOLVER = "greedy"


# ---------------------------------------------------------------------------- solvers
def solve_optimal(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-total-weight one-to-one pairs; entries <= 0 are never paired.

    >>> solve_optimal(np.array([[0.9, 0.8], [0.8, 0.1]]))
    (array([0, 1]), array([1, 0]))
    """
    if weight.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    rows, cols = linear_sum_assignment(weight, maximize=True)
    keep = weight[rows, cols] > 0
    return rows[keep].astype(np.int64), cols[keep].astype(np.int64)


def solve_greedy(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Highest weight first, as the reference design did; entries <= 0 are never paired.

    Vectorised as rounds of mutually-best pairs, which picks exactly what sequential greedy
    picks with ties broken by (row, column).

    >>> solve_greedy(np.array([[0.9, 0.8], [0.8, 0.1]]))
    (array([0, 1]), array([0, 1]))
    """
    w = np.where(weight > 0, weight, 0.0).astype(float)
    rows_out, cols_out = [], []
    if w.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    all_rows = np.arange(w.shape[0])
    while w.max() > 0:
        row_best = w.argmax(1)
        col_best = w.argmax(0)
        mutual = (w[all_rows, row_best] > 0) & (col_best[row_best] == all_rows)
        r, c = all_rows[mutual], row_best[mutual]
        rows_out.append(r)
        cols_out.append(c)
        w[r, :] = 0
        w[:, c] = 0
    rows = np.concatenate(rows_out) if rows_out else np.zeros(0, dtype=np.int64)
    cols = np.concatenate(cols_out) if cols_out else np.zeros(0, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    return rows[order].astype(np.int64), cols[order].astype(np.int64)


SOLVERS = {"optimal": solve_optimal, "greedy": solve_greedy}


def pair_margins(weight: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Margin of each chosen pair over its best alternative in its row or column.

    Returns:
        ``(margin, runner_up)``: the chosen weight minus the best other weight in the same row
        or column (the whole weight when there is none), and that alternative's weight.
    """
    if len(rows) == 0:
        return np.zeros(0), np.zeros(0)
    w = np.where(weight > 0, weight, 0.0)
    chosen = w[rows, cols]
    masked = w.copy()
    masked[rows, cols] = -np.inf
    row_alt = masked[rows].max(1) if w.shape[1] > 1 else np.zeros(len(rows))
    col_alt = masked[:, cols].max(0) if w.shape[0] > 1 else np.zeros(len(rows))
    runner_up = np.maximum(np.maximum(row_alt, col_alt), 0.0)
    return chosen - runner_up, runner_up


# ---------------------------------------------------------------------------- buckets
def _buckets_by_key(src_keys: Sequence, tgt_keys: Sequence) -> list[tuple[object, np.ndarray, np.ndarray]]:
    """Positions of each key present on both sides, keys in first-seen source order."""
    src_pos: dict = {}
    for i, k in enumerate(src_keys):
        src_pos.setdefault(k, []).append(i)
    tgt_pos: dict = {}
    for j, k in enumerate(tgt_keys):
        tgt_pos.setdefault(k, []).append(j)
    return [
        (k, np.asarray(rows, dtype=np.int64), np.asarray(tgt_pos[k], dtype=np.int64))
        for k, rows in src_pos.items()
        if k in tgt_pos
    ]


def _dense_ranks(keys: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Replace each position's values by their rank among that position's distinct values.

    Numbering schemes differ (``layer1..4`` vs ``stages.0..3``, 0- vs 1-based); ranks do not.
    Tuples of different lengths are ranked separately.

    >>> _dense_ranks([(1, 5), (2, 5), (), (3,)])
    [(0, 0), (1, 0), (), (0,)]
    """
    by_length: dict[int, list[int]] = {}
    for i, k in enumerate(keys):
        by_length.setdefault(len(k), []).append(i)
    out: list[tuple[int, ...]] = [()] * len(keys)
    for length, members in by_length.items():
        if not length:
            continue
        try:
            values = np.array([keys[i] for i in members], dtype=np.int64)
        except OverflowError:  # a digit run past int64 (a hash in a name): rank them one by one
            return _dense_ranks_exact(keys)
        ranks = np.empty_like(values)
        for p in range(length):  # np.unique sorts: the inverse is the rank among distinct values
            ranks[:, p] = np.unique(values[:, p], return_inverse=True)[1].reshape(-1)
        for i, ranked in zip(members, map(tuple, ranks.tolist())):
            out[i] = ranked
    return out


def _dense_ranks_exact(keys: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """:func:`_dense_ranks` in plain Python, for integers of any size."""
    values: dict[tuple[int, int], set[int]] = {}
    for k in keys:
        for p, v in enumerate(k):
            values.setdefault((len(k), p), set()).add(v)
    ranked = {lp: {v: r for r, v in enumerate(sorted(vs))} for lp, vs in values.items()}
    return [tuple(ranked[(len(k), p)][v] for p, v in enumerate(k)) for k in keys]


def split_by_indices(
    buckets: list[tuple[object, np.ndarray, np.ndarray]], src_items: Items, tgt_items: Items
) -> list[tuple[object, np.ndarray, np.ndarray]]:
    """Decompose buckets along repeated blocks: ``layers.3.*`` only competes with ``layers.3.*``.

    A bucket is split by the positions its candidates' names enumerate, when both sides
    enumerate the same positions, as the same network under other names does. These readings
    are tried in turn: the numeric path components (``layers.3.experts.7`` -> ``(3, 7)``), then
    every digit run (``layer4.2.conv1`` -> ``(4, 2, 1)``), both with the same count per
    position on each side; then the outermost path position alone (the layer) with the same
    set of values on each side; then the ranks among repeated siblings in the module tree
    (:attr:`~weight_mapper.tree.ModuleTree.repeat_ranks`: ``block3.block3-1`` and ``s3.b2``
    both read ``(2, 1)``), cut to the longest prefix on which both sides agree. Each
    position's values are replaced by their rank, so 0- and 1-based numbering agree. Otherwise
    the bucket stays whole. Each sub-bucket is solved optimally on its own, so tens of
    thousands of same-shaped experts cost many tiny problems instead of one dense one.
    """
    src_path, tgt_path = src_items.numeric_components, tgt_items.numeric_components
    readings = (  # (source keys, target keys, must the counts per key agree too?)
        (src_path, tgt_path, True),
        (list(src_items.indices), list(tgt_items.indices), True),
        # The outermost position alone (the layer), when both sides have the same layers but
        # different numbers of candidates per layer (stacked vs per-expert tensors).
        ([p[:1] for p in src_path], [p[:1] for p in tgt_path], False),
    )
    out = []
    for key, s, t in buckets:
        if len(s) < 2:
            out.append((key, s, t))
            continue
        for src_ix, tgt_ix, exact in readings:
            s_raw, t_raw = [src_ix[i] for i in s], [tgt_ix[j] for j in t]
            # A candidate without any position is not one of an enumeration: pairing it with the
            # other side's unnumbered one would pin ``shortcut.0`` to ``conv2`` (a digit each).
            if exact and not (all(s_raw) and all(t_raw)):
                continue
            s_keys, t_keys = _dense_ranks(s_raw), _dense_ranks(t_raw)
            agree = sorted(s_keys) == sorted(t_keys) if exact else set(s_keys) == set(t_keys)
            if len(set(s_keys)) < 2 or not agree:
                continue
            break
        else:
            s_keys, t_keys = _common_prefix_keys([src_items.positions[i] for i in s],
                                                 [tgt_items.positions[j] for j in t])
            if s_keys is None:
                out.append((key, s, t))
                continue
        out.extend(((key, ix), s[a], t[b]) for ix, a, b in _buckets_by_key(s_keys, t_keys))
    return out


def _common_prefix_keys(src_pos: list[tuple[int, ...]], tgt_pos: list[tuple[int, ...]]):
    """The longest prefix of the positions that splits both sides alike, or ``(None, None)``.

    Deeper positions may mean different things on the two sides (a ``Sequential``'s conv/norm
    index in one, ``conv1``..``conv3`` in the other), so the positions are cut to the longest
    length at which both sides hold the same multiset of (dense-ranked) keys.
    """
    # Every candidate must be enumerated that deep: an unrepeated module has no rank to agree on.
    longest = min((len(p) for p in [*src_pos, *tgt_pos]), default=0)
    for length in range(longest, 0, -1):
        s_keys = _dense_ranks([p[:length] for p in src_pos])
        t_keys = _dense_ranks([p[:length] for p in tgt_pos])
        if len(set(s_keys)) > 1 and sorted(s_keys) == sorted(t_keys):
            return s_keys, t_keys
    return None, None


def _tensor_bucket_key(shape: tuple[int, ...], tolerance: float) -> str:
    """Shapes that can possibly match share a key: the same number of elements (equal,
    2-D transposed, reshaped or flattened), or the same rank under ``shape_tolerance``."""
    if tolerance > 0:
        return f"ndim{len(shape)}"
    return f"numel{math.prod(shape)}"


@dataclass(eq=False)
class Level:
    """One level's assignment problems, scored as one list of candidate pairs (edges).

    Bucket ``k`` pairs ``bucket_src[k]`` with ``bucket_tgt[k]``; its edges are
    ``offsets[k]:offsets[k + 1]`` of ``si``/``ti``, row-major, so they reshape to the bucket's
    dense ``[n_src, n_tgt]`` matrix; except in a large bucket (``sparse[k]``), whose edges are
    only the candidates :func:`weight_mapper.candidates.bucket_candidates` proposes (sorted
    row-major). ``by_order`` marks the edges the order alignment decides there.
    """

    src: Items
    tgt: Items
    keys: list
    bucket_src: list[np.ndarray]
    bucket_tgt: list[np.ndarray]
    offsets: np.ndarray
    si: np.ndarray
    ti: np.ndarray
    scores: dict[str, np.ndarray]
    allowed: np.ndarray
    tie: np.ndarray
    pinned: np.ndarray | None = None
    sparse: np.ndarray | None = None
    by_order: np.ndarray | None = None

    @classmethod
    def build(cls, src: Items, tgt: Items, buckets, *, weights, tolerance, incompatible_pairs,
              offset: tuple[str, str] = ("", "")) -> Level:
        """Score every pair inside every bucket at once.

        Pairs whose names are identical (up to ``offset``, a prefix one side adds, see
        :func:`name_offset`) are *pinned*: nothing else is admissible for either candidate.
        """
        src_bucket = np.full(len(src), -1, dtype=np.int64)
        tgt_bucket = np.full(len(tgt), -1, dtype=np.int64)
        for k, (_, s, t) in enumerate(buckets):
            src_bucket[s], tgt_bucket[t] = k, k
        balanced = np.array([len(s) == len(t) for _, s, t in buckets] + [True], dtype=bool)
        src, tgt = (src.with_ranks(src_bucket, ~balanced[src_bucket]),
                    tgt.with_ranks(tgt_bucket, ~balanced[tgt_bucket]))
        src_key, tgt_key = _label_ids(src.labels, tgt.labels, offset)
        # A large bucket is scored on its blocked candidates only (weight_mapper/candidates.py).
        is_sparse = np.array([len(s) * len(t) for _, s, t in buckets], dtype=np.int64) > candidates.SPARSE_MIN_PAIRS
        edges = [candidates.bucket_candidates(src, tgt, s, t, src_key, tgt_key) if big
                 else (np.repeat(s, len(t)), np.tile(t, len(s))) for big, (_, s, t) in zip(is_sparse, buckets)]
        sizes = np.array([len(a) for a, _ in edges], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        empty = np.zeros(0, dtype=np.int64)
        si = np.concatenate([a for a, _ in edges]).astype(np.int64) if buckets else empty
        ti = np.concatenate([b for _, b in edges]).astype(np.int64) if buckets else empty
        del edges
        scores = score_edges(src, tgt, si, ti, weights=weights, tolerance=tolerance)
        allowed = (scores["shape"] > 0) & ~forbidden(src, tgt, si, ti, incompatible_pairs)
        # Exact ties go to the pair closest in relative order within the bucket (deterministic).
        tie = _TIE_EPS * np.nan_to_num(1.0 - np.abs(src.order_rank[si] - tgt.order_rank[ti]), nan=0.5)
        pinned = allowed & (src_key[si] == tgt_key[ti])
        allowed = _pin(allowed, pinned, si, ti, len(src), len(tgt))
        by_order = None
        if is_sparse.any():  # where names say nothing, the order alignment decides
            by_order = np.zeros(len(si), dtype=bool)
            for k in np.flatnonzero(is_sparse):
                e = slice(offsets[k], offsets[k + 1])
                _, s, t = buckets[k]
                by_order[e] = candidates.order_decided(
                    src, tgt, s, t, si[e], ti[e], {c: v[e] for c, v in scores.items()}, allowed[e] & ~pinned[e])
            tie = np.where(by_order, candidates.ORDER_BONUS, tie)
        return cls(src, tgt, [k for k, _, _ in buckets], [s for _, s, _ in buckets], [t for _, _, t in buckets],
                   offsets, si, ti, scores, allowed, tie, pinned, is_sparse, by_order)

    def __len__(self) -> int:
        return len(self.keys)

    @cached_property
    def leaf_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """Each source and target candidate's leaf path as an id equal across the sides, -1 for none.

        A group's leaf path is its module's own name (``q_proj``), a single tensor's its module's
        name and its leaf (``q_proj.weight``); bare positions (``0``) do not count. Read by
        :func:`_leaf_pins` in every context round, computed once per level.
        """
        depth = 0 if self.src.shapes is None else 1  # tensors: ancestors[:, 0] is the owning module itself

        def leaf_paths(labels: Sequence[str]) -> list[str]:
            parts = [lab.split(".") for lab in labels]
            return [".".join(p[-1 - depth:]) if len(p) > depth + 1 and not p[-1 - depth].isdecimal() else ""
                    for p in parts]

        vocab: dict[str, int] = {"": -1}
        s_leaf = np.array([vocab.setdefault(x, len(vocab)) for x in leaf_paths(self.src.labels)], dtype=np.int64)
        t_leaf = np.array([vocab.setdefault(x, len(vocab)) for x in leaf_paths(self.tgt.labels)], dtype=np.int64)
        return s_leaf, t_leaf

    def block(self, values: np.ndarray, k: int) -> np.ndarray:
        """Bucket ``k``'s slice of a per-edge array, as its dense matrix (a blocked bucket's as a
        :class:`~weight_mapper.candidates.SparseBlock`, read row by row)."""
        part = values[self.offsets[k]:self.offsets[k + 1]]
        shape = (len(self.bucket_src[k]), len(self.bucket_tgt[k]))
        if self.sparse is not None and self.sparse[k]:
            rows, cols = self.local_edges(k)
            return candidates.SparseBlock(part, rows, cols, shape)
        return part.reshape(shape)

    def local_edges(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Bucket ``k``'s edges as (row, column) positions in its ``bucket_src``/``bucket_tgt``."""
        e = slice(self.offsets[k], self.offsets[k + 1])
        s, t = self.bucket_src[k], self.bucket_tgt[k]
        src_local = np.zeros(len(self.src), np.int64)
        src_local[s] = np.arange(len(s))
        tgt_local = np.zeros(len(self.tgt), np.int64)
        tgt_local[t] = np.arange(len(t))
        return src_local[self.si[e]], tgt_local[self.ti[e]]

    def locate(self, item: int) -> tuple[int, int] | None:
        """``(bucket, row)`` of source candidate ``item``, or None if it was in no bucket."""
        for k, s in enumerate(self.bucket_src):
            hit = np.flatnonzero(s == item)
            if len(hit):
                return k, int(hit[0])
        return None


def name_offset(src_names: Sequence[str], tgt_names: Sequence[str]) -> tuple[str, str]:
    """A prefix one side puts before names the other has bare: ``("", "backbone.body.")``.

    A backbone inside a detector (torchvision's ``fasterrcnn_resnet50_fpn`` holds a ResNet-50
    under ``backbone.body.``) keeps the backbone's names under a prefix. Up to three leading
    components are tried on each side; a prefix counts when it turns at least half of the
    other side's names into names this side has.

    >>> name_offset(["layer1.0.conv1.weight", "layer1.0.bn1.weight", "fc.weight"],
    ...             ["backbone.body.layer1.0.conv1.weight", "backbone.body.layer1.0.bn1.weight", "rpn.w"])
    ('', 'backbone.body.')
    """
    best = ("", ""), 0
    for flip in (False, True):
        bare, prefixed = (tgt_names, src_names) if flip else (src_names, tgt_names)
        bare_set = set(bare)
        counts: dict[str, int] = {}
        for name in prefixed:
            parts = name.split(".")
            for k in range(1, min(4, len(parts))):
                if ".".join(parts[k:]) in bare_set:
                    prefix = ".".join(parts[:k]) + "."
                    counts[prefix] = counts.get(prefix, 0) + 1
        if counts:
            prefix, n = max(counts.items(), key=lambda kv: (kv[1], -len(kv[0])))
            if n >= max(2, len(bare) / 2) and n > best[1]:
                best = ((prefix, "") if flip else ("", prefix)), n
    return best[0]


_OFFSETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # source table -> {target table: offset}


def _table_offset(src_table: TensorTable, tgt_table: TensorTable) -> tuple[str, str]:
    """:func:`name_offset` of two tables' names, found once per pair of tables while both live
    (matching assigns the same two tables twice; tables are immutable)."""
    by_target = _OFFSETS.setdefault(src_table, weakref.WeakKeyDictionary())
    offset = by_target.get(tgt_table)
    if offset is None:
        offset = by_target[tgt_table] = name_offset(src_table.names, tgt_table.names)
    return offset


def _label_ids(src_labels: Sequence[str], tgt_labels: Sequence[str], offset: tuple[str, str]):
    """Integer ids of the labels, equal where the names are (one side's ``offset`` prefix removed)."""
    vocab: dict[str, int] = {}

    def ids(labels: Sequence[str], prefix: str) -> np.ndarray:
        keys = (lab[len(prefix):] if prefix and lab.startswith(prefix) else lab for lab in labels)
        return np.fromiter((vocab.setdefault(k, len(vocab)) for k in keys), dtype=np.int64, count=len(labels))

    return ids(src_labels, offset[0]), ids(tgt_labels, offset[1])


def _pin(allowed: np.ndarray, pinned: np.ndarray, si: np.ndarray, ti: np.ndarray, n_src: int, n_tgt: int):
    """``allowed`` with every other pair of a pinned candidate (either side) removed."""
    if not pinned.any():
        return allowed
    src_pinned = np.zeros(n_src, dtype=bool)
    tgt_pinned = np.zeros(n_tgt, dtype=bool)
    src_pinned[si[pinned]] = True
    tgt_pinned[ti[pinned]] = True
    return allowed & (pinned | ~(src_pinned[si] | tgt_pinned[ti]))


def _leaf_pins(level: Level, module_map: np.ndarray) -> np.ndarray:
    """Pairs with the same leaf path (:attr:`Level.leaf_ids`) under parents the module map already pairs."""
    src, tgt = level.src, level.tgt
    s_leaf, t_leaf = level.leaf_ids
    if not len(level.si):
        return np.zeros(len(level.si), dtype=bool)
    s_parent, t_parent = src.chain[:, 1], tgt.chain[:, 1]  # the module's parent, for groups and tensors
    si, ti = level.si, level.ti
    return (level.allowed & (s_leaf[si] >= 0) & (s_leaf[si] == t_leaf[ti])
            & (module_map[s_parent[si]] == t_parent[ti]) & (module_map[s_parent[si]] >= 0))


# ---------------------------------------------------------------------------- rounds
@dataclass(frozen=True, eq=False)
class LevelDetail:
    """What one level solved, kept to explain a match: the level and its final scores.

    ``total`` and ``context`` are the final round's per-edge score and context (None without
    context); ``src``/``tgt`` the matched candidate positions.
    """

    level: Level
    total: np.ndarray
    context: np.ndarray | None
    src: np.ndarray
    tgt: np.ndarray


@dataclass(frozen=True, eq=False)
class _LevelResult:
    src: np.ndarray  # positions in the level's source Items
    tgt: np.ndarray
    score: np.ndarray
    margin: np.ndarray
    components: dict[str, np.ndarray]
    bucket_sizes: list[tuple[int, int]]
    rounds: int
    converged: bool
    detail: LevelDetail
    flags: np.ndarray


def _module_map(
    src_items: Items, tgt_items: Items, src: np.ndarray, tgt: np.ndarray, n_src_modules: int,
    prior: tuple[np.ndarray, ...] | None = None, margin: np.ndarray | None = None,
) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Weighted majority vote of matched candidates for mapping their modules and ancestors.

    A match votes, level by level, for mapping its module and ancestors onto the target's.
    Its vote weighs :data:`_VOTE_FLOOR` plus its margin: when a module's two children went to
    two places (a shortcut conv decided by the data flow, its BatchNorm still a near-tie), the
    sure one decides where the module went.

    Returns ``(src2tgt_module, votes)``; ``votes`` can seed the next level's map.
    """
    vs = src_items.chain[src].ravel()
    vt = tgt_items.chain[tgt].ravel()
    weight = _VOTE_FLOOR + (np.clip(margin, 0.0, None) if margin is not None else np.zeros(len(src)))
    vw = np.repeat(weight, src_items.chain.shape[1])
    if prior is not None:
        vs, vt, vw = np.concatenate([prior[0], vs]), np.concatenate([prior[1], vt]), np.concatenate([prior[2], vw])
    src2tgt = np.full(n_src_modules, _UNMATCHED, dtype=np.int64)
    if len(vs):
        width = int(vt.max()) + 1
        codes, inverse = np.unique(vs * width + vt, return_inverse=True)
        totals = np.bincount(inverse.reshape(-1), weights=vw)
        pairs = np.stack([codes // width, codes % width], 1)
        order = np.lexsort((pairs[:, 1], -totals, pairs[:, 0]))
        pairs = pairs[order]
        first = np.ones(len(pairs), dtype=bool)
        first[1:] = pairs[1:, 0] != pairs[:-1, 0]
        src2tgt[pairs[first, 0]] = pairs[first, 1]
    return src2tgt, (vs, vt, vw)


def _solve_pairs_of_two(w: np.ndarray, mw: np.ndarray, solve) -> tuple[np.ndarray, ...]:
    """Solve many 2 x 2 buckets at once, exactly as :func:`solve_optimal` / :func:`solve_greedy`
    and :func:`pair_margins` would one by one.

    Args:
        w, mw: ``[B, 2, 2]`` weights and margin weights.

    Returns:
        ``(bucket, row, col, margin)`` of every chosen pair, and the buckets left for the
        one-by-one solver: with the optimal solver, those whose two assignments tie exactly
        (there the choice is the solver's own tie-break), or tie up to rounding.
    """
    diag, anti = w[:, 0, 0] + w[:, 1, 1], w[:, 0, 1] + w[:, 1, 0]
    if solve is solve_optimal:
        # Near ties (within rounding: 0.2 + 0.7 != 0.9) go to the solver too, whose own
        # arithmetic decides them.
        deferred = np.abs(diag - anti) <= 1e-9 * np.maximum(1.0, np.abs(diag))
        use_anti = anti > diag
    else:  # highest first, ties by (row, col): the first maximum in row-major order
        first = np.argmax(w.reshape(len(w), 4), axis=1)
        deferred = np.zeros(len(w), dtype=bool)
        use_anti = (first == 1) | (first == 2)
    b = np.flatnonzero(~deferred)
    rows = np.array([0, 1])
    cols = np.where(use_anti[b, None], rows[::-1][None, :], rows[None, :])  # [n, 2]
    bucket, row = np.repeat(b, 2), np.tile(rows, len(b))
    col = cols.reshape(-1)
    keep = w[bucket, row, col] > 0
    bucket, row, col = bucket[keep], row[keep], col[keep]
    m = np.where(mw > 0, mw, 0.0)
    runner_up = np.maximum(np.maximum(m[bucket, row, 1 - col], m[bucket, 1 - row, col]), 0.0)
    return bucket, row, col, m[bucket, row, col] - runner_up, np.flatnonzero(deferred)


def _solve_buckets(level: Level, weight: np.ndarray, margin_weight: np.ndarray, solve) -> tuple[np.ndarray, ...]:
    """Solve every bucket; returns matched edge ids and their margins.

    Buckets of one candidate per side (most of them once repeated blocks are split) are
    decided in one vectorised step, and so are buckets of two (a layer's two norms); the
    others each get their own solver call.
    """
    n_src = np.array([len(s) for s in level.bucket_src], dtype=np.int64)
    n_tgt = np.array([len(t) for t in level.bucket_tgt], dtype=np.int64)
    single = np.flatnonzero((n_src == 1) & (n_tgt == 1))
    edges = level.offsets[single]
    keep = weight[edges] > 0
    chosen, margins = [edges[keep]], [margin_weight[edges[keep]]]
    two = np.flatnonzero((n_src == 2) & (n_tgt == 2))
    block_edges = level.offsets[two][:, None] + np.arange(4)[None, :]
    bucket, row, col, margin, deferred = _solve_pairs_of_two(
        weight[block_edges].reshape(-1, 2, 2), margin_weight[block_edges].reshape(-1, 2, 2), solve)
    chosen.append(level.offsets[two][bucket] + row * 2 + col)
    margins.append(margin)
    one_by_one = np.flatnonzero(~((n_src == 1) & (n_tgt == 1)) & ~((n_src == 2) & (n_tgt == 2)))
    for k in np.concatenate([one_by_one, two[deferred]]).astype(np.int64):
        if level.sparse is not None and level.sparse[k]:  # a blocked bucket: its candidates only
            rows, cols = level.local_edges(k)
            e = slice(level.offsets[k], level.offsets[k + 1])
            kind = "optimal" if solve is solve_optimal else "greedy"
            picked = candidates.solve_sparse(rows, cols, weight[e], n_src[k], n_tgt[k], kind)
            chosen.append(level.offsets[k] + picked)
            margins.append(candidates.sparse_margins(rows, cols, margin_weight[e], picked, n_src[k], n_tgt[k]))
            continue
        w = level.block(weight, k)
        rows, cols = solve(w)
        if len(rows):
            margin, _ = pair_margins(level.block(margin_weight, k), rows, cols)
            chosen.append(level.offsets[k] + rows * n_tgt[k] + cols)
            margins.append(margin)
    ids = np.concatenate(chosen).astype(np.int64)
    order = np.argsort(ids, kind="stable")
    return ids[order], np.concatenate(margins)[order]


def _solve_level(
    level: Level, *, solver: str, threshold: float, use_context: bool, max_rounds: int, n_src_modules: int,
    prior_votes=None, progress=None, name: str = "",
) -> tuple[_LevelResult, tuple[np.ndarray, np.ndarray]]:
    solve = SOLVERS[solver]
    src_items, tgt_items, base = level.src, level.tgt, level.scores["base"]
    module_map = None
    if use_context and prior_votes is not None and len(prior_votes[0]):
        module_map, _ = _module_map(src_items, tgt_items, np.zeros(0, int), np.zeros(0, int), n_src_modules, prior_votes)
    previous, votes = None, prior_votes if prior_votes is not None else (np.zeros(0, int), np.zeros(0, int), np.zeros(0))
    rounds, converged = 0, not use_context
    ctx, best = None, None
    for rounds in range(1, (max_rounds if use_context else 1) + 1):
        _report(progress, f"{name}: assigning, round {rounds}")
        if use_context and module_map is not None:
            ctx = context_score(src_items, tgt_items, level.si, level.ti, module_map)
            total = with_context(base, ctx)
        else:
            ctx, total = None, base
        # The context rounds are a local search (an assignment, then the module map it votes
        # for, and so on) on a non-convex objective, so where they end depends on where they
        # start. A context-free round only seeds the first module map: it is solved
        # highest-score-first, whose votes keep each block's locally strongest pairs together,
        # and it is never returned when rounds follow (see _SEED_SOLVER).
        seed = use_context and module_map is None and rounds < max_rounds
        allowed, pinned = level.allowed, level.pinned
        if module_map is not None:  # same leaf under paired parents: pinned like identical names
            leaf = _leaf_pins(level, module_map)
            pinned = pinned | leaf
            allowed = _pin(allowed, leaf, level.si, level.ti, len(level.src), len(level.tgt))
        weight = np.where(allowed & ((total >= threshold) | pinned), total + level.tie + _TIE_EPS, 0.0)
        # Margins count every admissible alternative, also one just under the threshold.
        margin_weight = np.where(allowed, total + _TIE_EPS, 0.0)
        edges, margin = _solve_buckets(level, weight, margin_weight, SOLVERS[_SEED_SOLVER] if seed else solve)
        src, tgt = level.si[edges], level.ti[edges]
        module_map, votes = _module_map(src_items, tgt_items, src, tgt, n_src_modules, prior_votes, margin)
        round_total = float(total[edges].sum())
        if not (seed and solve is not SOLVERS[_SEED_SOLVER]) and (best is None or round_total > best[0]):
            best = (round_total, edges, margin, total, ctx, src, tgt, votes, allowed, pinned)
        if previous is not None and np.array_equal(previous, edges):
            converged = True
            break
        previous = edges
        if not len(level):
            converged = True
            break
    if not converged:  # the context kept flipping the assignment: keep the best round seen
        _, edges, margin, total, ctx, src, tgt, votes, allowed, pinned = best
    components = {c: level.scores[c][edges] for c in BASE_COMPONENTS}
    components[CONTEXT] = ctx[edges] if ctx is not None else np.full(len(edges), np.nan)
    result = _LevelResult(
        src=src, tgt=tgt, score=total[edges], margin=margin, components=components,
        bucket_sizes=[(len(s), len(t)) for s, t in zip(level.bucket_src, level.bucket_tgt)],
        rounds=rounds, converged=converged,
        detail=LevelDetail(level, total, ctx, src, tgt),
        flags=_swap_partners(level, edges, margin, total, allowed, pinned, _edge_flags(level, edges, allowed, pinned)),
    )
    return result, votes


def _swap_partners(level: Level, edges: np.ndarray, margin: np.ndarray, total: np.ndarray, allowed: np.ndarray,
                   pinned: np.ndarray | None, flags: np.ndarray) -> np.ndarray:
    """``flags`` with ``swap_partner`` added to the chosen pairs a doubtful pair could be swapped with.

    Wrong matches come in swaps: two norms exchanged, or a cycle of three. When a chosen pair
    ``a -> x`` is doubtful (margin under :data:`AMBIGUITY_MARGIN`, or flagged), look at the pairs
    holding its runner-ups (``b -> y`` where ``y`` is ``a``'s best other target, or ``b`` is
    ``x``'s best other source; in a bucket of at most 64 pairs, every other pair). Exchanging the two (``a -> y``, ``b -> x``) is a real alternative
    when both crossed pairs are admissible and the exchange loses less than
    :data:`SWAP_PARTNER_MARGIN` of their summed score: then ``b -> y`` is doubtful too. Repeated
    until nothing changes (a cycle). Pinned pairs (identical names) are never flagged.
    """
    if not len(edges):
        return flags
    s, t = level.si[edges], level.ti[edges]
    n_tgt = len(level.tgt)
    holder_of_src = np.full(len(level.src), -1, dtype=np.int64)
    holder_of_tgt = np.full(n_tgt, -1, dtype=np.int64)
    holder_of_src[s] = np.arange(len(edges))
    holder_of_tgt[t] = np.arange(len(edges))
    is_chosen = np.zeros(len(level.si), dtype=bool)
    is_chosen[edges] = True
    others = allowed & ~is_chosen
    row_edge = _best_edge(level.si, total, others, len(level.src))[s]  # the source's best other target
    col_edge = _best_edge(level.ti, total, others, n_tgt)[t]  # the target's best other source
    partners = np.stack([np.where(row_edge >= 0, holder_of_tgt[level.ti[np.maximum(row_edge, 0)]], -1),
                         np.where(col_edge >= 0, holder_of_src[level.si[np.maximum(col_edge, 0)]], -1)], 1)
    # Admissible edges by (source, target) key, to score the crossed pairs of an exchange.
    keys = level.si * n_tgt + level.ti
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]

    def crossed(a: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Score of ``a -> y`` where admissible, else -inf."""
        want = a * n_tgt + y
        at = np.minimum(np.searchsorted(sorted_keys, want), len(sorted_keys) - 1)  # edges exist: chosen ones
        e = order[at]
        return np.where((sorted_keys[at] == want) & allowed[e], total[e], -np.inf)

    # Every other chosen pair of the same (small) bucket is a possible partner too: a doubtful
    # pair's runner-up can be a third pair, while the swap that matters is with a fourth.
    bucket = np.searchsorted(level.offsets, edges, side="right") - 1
    by_bucket: dict[int, np.ndarray] = {}
    order_b = np.argsort(bucket, kind="stable")
    ids, starts, counts = np.unique(bucket[order_b], return_index=True, return_counts=True)
    for b, start, count in zip(ids.tolist(), starts.tolist(), counts.tolist()):
        if 2 < count <= _SWAP_BUCKET_MAX:
            by_bucket[b] = order_b[start:start + count]
    doubtful = (margin < AMBIGUITY_MARGIN) | np.array([bool(f) for f in flags], dtype=bool)
    can_flag = ~pinned[edges] if pinned is not None else np.ones(len(edges), dtype=bool)
    marked = np.zeros(len(edges), dtype=bool)
    frontier: np.ndarray = np.flatnonzero(doubtful)
    chosen_score = total[edges]
    while len(frontier):
        ks, ps = [np.repeat(frontier, 2)], [partners[frontier].ravel()]
        for f in frontier.tolist():
            members = by_bucket.get(int(bucket[f]))
            if members is not None:
                ks.append(np.full(len(members), f))
                ps.append(members)
        k, p = np.concatenate(ks), np.concatenate(ps)
        keep = (p >= 0) & (p != k)
        k, p = k[keep], p[keep]
        loss = chosen_score[k] + chosen_score[p] - crossed(s[k], t[p]) - crossed(s[p], t[k])
        hit = np.unique(p[loss < SWAP_PARTNER_MARGIN])
        hit = hit[can_flag[hit] & ~doubtful[hit] & ~marked[hit]]
        marked[hit] = True
        frontier = hit
    out = flags.copy()
    for row in np.flatnonzero(marked).tolist():
        out[row] = (*flags[row], "swap_partner")
    return out


def _edge_flags(level: Level, edges: np.ndarray, allowed: np.ndarray, pinned: np.ndarray) -> np.ndarray:
    """Reasons to review each chosen pair besides its margin (see ``plan.FLAG_DESCRIPTIONS``).

    ``order_only``: another admissible candidate of its row or column has a name that fits
    as well, and no data flow was known, so definition order or position decided.
    ``names_disagree``: another candidate's name fits clearly better (by
    :data:`_NAME_DISAGREES`) and that candidate did not go to a pair whose name fits at least
    as well, and no data flow was known; order or context overrode the names. Pinned pairs
    (identical names) carry neither.
    """
    out = np.empty(len(edges), dtype=object)
    out[:] = [()] * len(edges)
    if not len(edges):
        return out
    name = level.scores["name"]
    chosen = name[edges]
    s, t = level.si[edges], level.ti[edges]
    # The name score each candidate got in the assignment (-inf: unmatched).
    src_got, tgt_got = np.full(len(level.src), -np.inf), np.full(len(level.tgt), -np.inf)
    src_got[s], tgt_got[t] = chosen, chosen
    is_chosen = np.zeros(len(level.si), dtype=bool)
    is_chosen[edges] = True
    others = allowed & ~is_chosen
    row_edge = _best_edge(level.si, name, others, len(level.src))[s]  # best other target of the row
    col_edge = _best_edge(level.ti, name, others, len(level.tgt))[t]  # best other source of the column
    row_alt = np.where(row_edge >= 0, name[np.maximum(row_edge, 0)], -np.inf)
    col_alt = np.where(col_edge >= 0, name[np.maximum(col_edge, 0)], -np.inf)
    alt = np.maximum(row_alt, col_alt)
    free = ~pinned[edges]
    flow = "exec" in level.scores and not np.isnan(level.scores["exec"][edges]).any()
    order_only = free & (alt >= chosen - _NAME_TIE) & (not flow)
    if level.by_order is not None:  # the order alignment decided it (names said nothing)
        order_only |= free & level.by_order[edges]
    # An alternative that went to a pair whose name fits at least as well explains itself.
    row_open = (row_alt > chosen + _NAME_DISAGREES) & (tgt_got[level.ti[np.maximum(row_edge, 0)]] < row_alt - 1e-9)
    col_open = (col_alt > chosen + _NAME_DISAGREES) & (src_got[level.si[np.maximum(col_edge, 0)]] < col_alt - 1e-9)
    # With a data flow on both sides the order evidence is the flow itself, which outranks
    # names inside a block (the zoo: torchvision -> timm RegNets map exactly from the models,
    # yet names_disagree fired on 85 right entries there).
    disagree = free & (row_open | col_open) & (not flow)
    for k in np.flatnonzero(order_only | disagree):
        out[k] = ("order_only",) if order_only[k] else ("names_disagree",)
    return out


def _best_edge(keys: np.ndarray, values: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
    """Per key, the masked edge with the highest value (-1 where none)."""
    out = np.full(n, -1, dtype=np.int64)
    idx = np.flatnonzero(mask)
    if not len(idx):
        return out
    order = idx[np.lexsort((-values[idx], keys[idx]))]
    k = keys[order]
    first = np.ones(len(k), dtype=bool)
    first[1:] = k[1:] != k[:-1]
    out[k[first]] = order[first]
    return out


# ---------------------------------------------------------------------------- the stage
@dataclass(frozen=True, eq=False)
class Assignment:
    """Matched tensor rows of both tables, with how and how surely they were matched.

    Attributes:
        src, tgt: Tensor rows (canonical tensors only; aliases are the plan's business).
        score: Final combined score of each pair.
        margin: Score minus the best alternative's score in the same bucket row or column.
        level: ``"group"`` (matched with its whole module) or ``"tensor"`` (fallback).
        components: Score of each pair per :data:`~weight_mapper.score.REPORTED_COMPONENTS`
            (``shape``, ``name``, ``hierarchy``, ``context``).
        rounds: Hierarchy-context rounds run at the group level and the tensor level.
        converged: Whether both levels stopped because the assignment stopped changing.
        largest_bucket: Size ``(n_src, n_tgt)`` of the largest assignment problem solved.
        levels: ``{"group": LevelDetail, "tensor": LevelDetail}`` for explanations.
        flags: Per pair, a tuple of flag names (``"order_only"``, ``"names_disagree"``): why
            it needs a review besides its margin.
        offset: The wrapper prefixes (:func:`name_offset`) of the two tables, found once by
            :func:`assign`.
    """

    src: np.ndarray
    tgt: np.ndarray
    score: np.ndarray
    margin: np.ndarray
    level: np.ndarray
    components: dict[str, np.ndarray]
    rounds: tuple[int, int]
    converged: bool
    largest_bucket: tuple[int, int] = field(default=(0, 0))
    levels: dict = field(default_factory=dict)
    flags: np.ndarray | None = None
    offset: tuple[str, str] = ("", "")

    def above(self, threshold: float) -> Assignment:
        """The matches whose final score reaches ``threshold`` (a group's tensors share its score).

        ``assign(..., threshold=t)`` equals ``assign(..., threshold=0).above(t)``.
        """
        keep = self.score >= threshold
        if keep.all():
            return self
        return replace(self, src=self.src[keep], tgt=self.tgt[keep], score=self.score[keep],
                       margin=self.margin[keep], level=self.level[keep],
                       components={c: v[keep] for c, v in self.components.items()})


def assign(
    src_table: TensorTable,
    tgt_table: TensorTable,
    *,
    weights: Mapping[str, float],
    threshold: float,
    solver: str = "optimal",
    use_context: bool = True,
    tolerance: float = 0.0,
    incompatible_pairs: Sequence[tuple[Sequence[str], Sequence[str]]] = (),
    max_rounds: int = MAX_ROUNDS,
    skip_src: np.ndarray | None = None,
    skip_tgt: np.ndarray | None = None,
    progress: Callable[[str], None] | None = None,
) -> Assignment:
    """Match the canonical tensors of two tables: module groups first, then leftovers.

    Args:
        src_table, tgt_table: The two sides.
        weights: Validated component weights.
        threshold: Pairs whose final score (with the hierarchy context, the score shown) is
            below it are left out. It filters the assignment of every admissible pair, so a
            pair's score never depends on it and raising it only removes pairs; a module group
            below it is left out whole, not matched tensor by tensor.
        solver: ``"optimal"`` or ``"greedy"``.
        use_context: Re-solve with the hierarchy context until the assignment is stable.
        tolerance: ``shape_tolerance``.
        incompatible_pairs: Validated ``incompatible_pairs`` rules.
        max_rounds: Bound on the context rounds per level.
        skip_src, skip_tgt: Rows to leave out (taken by combined matches).
        progress: Called with a short description as each step starts (for a status line).

    >>> from torch import nn
    >>> t = TensorTable.from_module(nn.Linear(2, 3))
    >>> a = assign(t, t, weights={"shape": .5, "name": .3, "hierarchy": .2}, threshold=.6)
    >>> sorted(zip(a.src.tolist(), a.tgt.tolist()))
    [(0, 0), (1, 1)]
    """
    _report(progress, f"building module trees ({len(src_table)} + {len(tgt_table)} tensors)")
    src_tree, tgt_tree = ModuleTree.of(src_table), ModuleTree.of(tgt_table)
    src_groups = GroupTable.from_table(src_table, src_tree, skip=skip_src)
    tgt_groups = GroupTable.from_table(tgt_table, tgt_tree, skip=skip_tgt)
    g_src, g_tgt = Items.of_groups(src_table, src_tree, src_groups), Items.of_groups(tgt_table, tgt_tree, tgt_groups)
    offset = _table_offset(src_table, tgt_table)

    def solve_level(src: Items, tgt: Items, buckets, *, name: str, prior_votes=None):
        level = Level.build(src, tgt, buckets, weights=weights, tolerance=tolerance,
                            incompatible_pairs=incompatible_pairs, offset=offset)
        # Every admissible pair competes (threshold 0); the threshold then filters the final scores,
        # the ones shown, so that a pair's score never depends on it (issue 13).
        return _solve_level(level, solver=solver, threshold=0.0, use_context=use_context, max_rounds=max_rounds,
                            n_src_modules=len(src_tree), prior_votes=prior_votes, progress=progress, name=name)

    group_buckets = split_by_indices(_buckets_by_key(src_groups.signatures, tgt_groups.signatures), g_src, g_tgt)
    _report(progress, f"module groups: scoring {len(group_buckets)} buckets")
    groups, votes = solve_level(g_src, g_tgt, group_buckets, name="module groups")

    # Expand matched groups into member tensor pairs: equal signatures align sorted members.
    # A group scoring under the threshold is left out whole (its tensors are not split up).
    src_rows, tgt_rows, expand = [], [], []
    for k, (gs, gt) in enumerate(zip(groups.src, groups.tgt)):
        ms = _sorted_members(src_table, src_groups.members[gs])
        mt = _sorted_members(tgt_table, tgt_groups.members[gt])
        src_rows.append(ms)
        tgt_rows.append(mt)
        expand.append(np.full(len(ms), k))
    expand_idx = np.concatenate(expand) if expand else np.zeros(0, np.int64)
    g_src_rows = np.concatenate(src_rows) if src_rows else np.zeros(0, np.int64)
    g_tgt_rows = np.concatenate(tgt_rows) if tgt_rows else np.zeros(0, np.int64)

    # Fallback: tensors of groups without a partner group, bucketed by size (shapes that can
    # possibly match).
    left_src = np.setdiff1d(np.concatenate(src_groups.members or [np.zeros(0, np.int64)]), g_src_rows)
    left_tgt = np.setdiff1d(np.concatenate(tgt_groups.members or [np.zeros(0, np.int64)]), g_tgt_rows)
    passed = groups.score[expand_idx] >= threshold
    expand_idx, g_src_rows, g_tgt_rows = expand_idx[passed], g_src_rows[passed], g_tgt_rows[passed]
    t_src, t_tgt = Items.of_tensors(src_table, src_tree, left_src), Items.of_tensors(tgt_table, tgt_tree, left_tgt)
    tensor_buckets = split_by_indices(_buckets_by_key(
        [_tensor_bucket_key(src_table.shapes[r], tolerance) for r in left_src],
        [_tensor_bucket_key(tgt_table.shapes[r], tolerance) for r in left_tgt],
    ), t_src, t_tgt)
    _report(progress, f"single tensors: scoring {len(tensor_buckets)} buckets")
    tensors, _ = solve_level(t_src, t_tgt, tensor_buckets, prior_votes=votes, name="single tensors")
    tensors = _above(tensors, threshold)

    n_group, n_tensor = len(g_src_rows), len(tensors.src)
    sizes = groups.bucket_sizes + tensors.bucket_sizes
    return Assignment(
        src=np.concatenate([g_src_rows, t_src.rows[tensors.src]]).astype(np.int64),
        tgt=np.concatenate([g_tgt_rows, t_tgt.rows[tensors.tgt]]).astype(np.int64),
        score=np.concatenate([groups.score[expand_idx], tensors.score]),
        margin=np.concatenate([groups.margin[expand_idx], tensors.margin]),
        level=np.array(["group"] * n_group + ["tensor"] * n_tensor, dtype=object),
        components={
            c: np.concatenate([groups.components[c][expand_idx], tensors.components[c]]) for c in REPORTED_COMPONENTS
        },
        rounds=(groups.rounds, tensors.rounds),
        converged=groups.converged and tensors.converged,
        largest_bucket=max(sizes, key=lambda s: s[0] * s[1], default=(0, 0)),
        levels={"group": groups.detail, "tensor": tensors.detail},
        flags=np.concatenate([groups.flags[expand_idx], tensors.flags]) if n_group + n_tensor else np.zeros(0, object),
        offset=offset,
    )


def _above(result: _LevelResult, threshold: float) -> _LevelResult:
    """The matches of a level whose final score reaches ``threshold``."""
    keep = result.score >= threshold
    if keep.all():
        return result
    return replace(result, src=result.src[keep], tgt=result.tgt[keep], score=result.score[keep],
                   margin=result.margin[keep], components={c: v[keep] for c, v in result.components.items()})


def _report(progress: Callable[[str], None] | None, message: str) -> None:
    if progress is not None:
        progress(message)


def _sorted_members(table: TensorTable, rows: np.ndarray) -> np.ndarray:
    """Members ordered by (leaf, shape), the order their signature lists them in."""
    keys = [table.signature_keys[r] for r in rows.tolist()]
    return rows[np.argsort(keys, kind="stable")]


def explain(
    assignment: Assignment, src_table: TensorTable, name: str, *, top_k: int = 5
) -> dict:
    """Why source tensor ``name`` was matched as it was: its scores and its best alternatives.

    The explanation is taken at the level the tensor was matched on (its module group, or the
    tensor alone for fallback matches), from the final round's score matrices.

    Returns:
        ``{"source", "level", "candidate", "target_label", "score", "components",
        "sub_scores", "alternatives"}``. ``candidate`` and ``target_label`` are the names
        compared (module paths at the group level); ``target_label``/``score`` are None when
        the tensor stayed unmatched; each alternative is ``{"label", "score", "components"}``,
        best first.

    Raises:
        MappingError: If ``name`` is not a source tensor.
    """
    return explain_many(assignment, src_table, [name], top_k=top_k)[0]


def explain_many(
    assignment: Assignment, src_table: TensorTable, names: Sequence[str], *, top_k: int = 5
) -> list[dict]:
    """:func:`explain` for many source tensors: each level is indexed once, not once per name.

    Raises:
        MappingError: If a name is not a source tensor.
    """
    index = _ExplainIndex(assignment)
    return [_explain_one(assignment, src_table, index, name, top_k) for name in names]


class _ExplainIndex:
    """Lookups that :func:`explain` needs per name, built once per level on first use."""

    def __init__(self, assignment: Assignment):
        self.assignment = assignment
        self._row2hit: dict[int, int] | None = None
        self._levels: dict[str, tuple[dict, dict, dict]] = {}

    def first_hit(self, row: int) -> int | None:
        """Position of source ``row`` in the assignment, if matched."""
        if self._row2hit is None:
            self._row2hit = {}
            for k, s in enumerate(self.assignment.src.tolist()):
                self._row2hit.setdefault(int(s), k)
        return self._row2hit.get(row)

    def level(self, level_name: str, detail: LevelDetail) -> tuple[dict, dict, dict]:
        """``(label2positions, item2where, item2matched)`` of one level."""
        if level_name not in self._levels:
            lv = detail.level
            label2positions: dict[str, list[int]] = {}
            for i, label in enumerate(lv.src.labels):
                label2positions.setdefault(label, []).append(i)
            item2where: dict[int, tuple[int, int]] = {}
            for k, items in enumerate(lv.bucket_src):
                for i, item in enumerate(items.tolist()):
                    item2where.setdefault(int(item), (k, i))
            item2matched: dict[int, int] = {}
            for m, item in enumerate(detail.src.tolist()):
                item2matched.setdefault(int(item), m)
            self._levels[level_name] = (label2positions, item2where, item2matched)
        return self._levels[level_name]


def _explain_one(assignment: Assignment, src_table: TensorTable, index: _ExplainIndex, name: str, top_k: int) -> dict:
    from weight_mapper.errors import MappingError

    if name not in src_table.name2row:
        raise MappingError(f"{name!r} is not a source tensor; source tensors are e.g. {list(src_table.names[:3])}")
    row = int(src_table.name2row[name])
    if not src_table.is_canonical[row]:
        row = int(src_table.alias_of[row])
    candidates = [("group", src_table.modules[row]), ("tensor", src_table.names[row])]
    hit = index.first_hit(row)
    if hit is not None and assignment.level[hit] == "tensor":  # its group went unmatched; the tensor did not
        candidates.reverse()
    for level_name, label in candidates:
        detail: LevelDetail | None = assignment.levels.get(level_name)
        if detail is None:
            continue
        lv = detail.level
        label2positions, item2where, item2matched = index.level(level_name, detail)
        positions = label2positions.get(label, [])
        if level_name == "tensor":
            positions = [i for i in positions if lv.src.rows[i] == row]
        where = item2where.get(positions[0]) if positions else None
        if where is None:
            continue
        k, i = where
        total = lv.block(detail.total, k)
        ctx = lv.block(detail.context, k) if detail.context is not None else None
        allowed = lv.block(lv.allowed, k)
        scores = {key: lv.block(v, k) for key, v in lv.scores.items()}
        tgt_pos = lv.bucket_tgt[k]
        matched = item2matched.get(int(lv.bucket_src[k][i]))
        chosen = int(np.flatnonzero(tgt_pos == detail.tgt[matched])[0]) if matched is not None else None

        def parts(j: int) -> dict:
            comps = {c: float(scores[c][i, j]) for c in BASE_COMPONENTS}
            comps[CONTEXT] = float(ctx[i, j]) if ctx is not None else None
            return comps

        sub = {} if chosen is None else {
            key: float(v[i, chosen]) for key, v in scores.items()
            if key in SUB_SCORES and not np.isnan(v[i, chosen])
        }
        order = np.argsort(-np.where(allowed[i], total[i], -np.inf), kind="stable")
        alternatives = [
            {"label": lv.tgt.labels[tgt_pos[j]], "score": float(total[i, j]), "components": parts(int(j))}
            for j in order
            if j != chosen and allowed[i, j]
        ][:top_k]
        return {
            "source": name,
            "level": level_name,
            "candidate": label,
            "target_label": None if chosen is None else lv.tgt.labels[tgt_pos[chosen]],
            "score": None if chosen is None else float(total[i, chosen]),
            "components": None if chosen is None else parts(chosen),
            "sub_scores": sub,
            "alternatives": alternatives,
        }
    return {"source": name, "level": None, "candidate": None, "target_label": None, "score": None,
            "components": None, "sub_scores": {}, "alternatives": []}
