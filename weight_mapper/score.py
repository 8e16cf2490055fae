"""Stage 3: similarity of every source candidate to every target candidate, as matrices.

Each scorer is a small pure function ``(src: Items, tgt: Items, si, ti) -> ndarray[n_edges]``
answering one question with values in [0, 1]. The registry :data:`SCORE_COMPONENTS` says which
scorers make each top-level component (shape, name, hierarchy), with which shares, its default
weight and its label; :func:`score_edges` evaluates it and :func:`weighted_base` weighs the
components with the user's weights, for the assignment and the combined matches alike. Nothing
here loops over source x target pairs in Python.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from types import MappingProxyType
from typing import Any

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq, Levenshtein
from scipy import sparse

from weight_mapper.errors import MappingError
from weight_mapper.names import contested_rows, natural_key, pad_indices, semantic_chunks
from weight_mapper.table import TensorTable
from weight_mapper.transforms import (  # noqa: F401  (re-exported)
    FLATTEN_SCORE,
    INFERRED_IN_OUT,
    LINEAR_TYPES,
    RESHAPE_SCORE,
    TRANSPOSED_SCORE,
    TRANSPOSED_TYPES,
    compared_shape,
    relate,
    stored_transposed,
)
from weight_mapper.tree import GroupTable, ModuleTree

__all__ = [
    "SubScore",
    "Component",
    "SCORE_COMPONENTS",
    "KEY2COMPONENT",
    "BASE_COMPONENTS",
    "REPORTED_COMPONENTS",
    "SUB_SCORES",
    "SUB_SCORE_LABELS",
    "CONTEXT",
    "DEFAULT_WEIGHTS",
    "NAME_WEIGHTS",
    "HIERARCHY_WEIGHTS",
    "HIERARCHY_WEIGHTS_EXEC",
    "CONTEXT_WEIGHT",
    "TRANSPOSED_SCORE",
    "Items",
    "validate_weights",
    "shape_score",
    "token_score",
    "edit_score",
    "lcs_score",
    "index_score",
    "leaf_score",
    "ordinal_score",
    "depth_score",
    "sibling_score",
    "order_score",
    "exec_score",
    "context_score",
    "with_context",
    "forbidden",
    "all_pairs",
    "rank_within",
    "score_edges",
    "weighted_base",
    "score_matrices",
]

# The score components, their default weights, sub-scores and labels: :data:`SCORE_COMPONENTS`
# (with the scorers, below). DEFAULT_WEIGHTS, NAME_WEIGHTS and HIERARCHY_WEIGHTS(_EXEC) are read off it.

# Share of the hierarchy context in the score from the second round on (80 % base + 20 %).
# Context only adds evidence: a parent mapped elsewhere (a regrouping refactor) or not yet
# mapped counts as the base score itself, so context never pushes a match under threshold.
CONTEXT_WEIGHT = 0.2
# Shape scores of 1:1 relations, and the module-type storage conventions they read, belong to
# the transform registry (weight_mapper.transforms); they are re-exported here.
NEAR_SCORE = 0.5  # shape score of a near shape accepted by shape_tolerance
UNKNOWN_CONTEXT = 0.5  # context of a candidate whose parent has no mapped counterpart yet
CONTEXT_LEVELS = 2  # parent and grandparent
VOTE_LEVELS = 4  # how far up a match votes for its ancestors' mapping


@dataclass(frozen=True, eq=False)
class Items:
    """Match candidates of one side (module groups or single tensors) as columns.

    Attributes:
        labels: The names compared (group module path or full tensor name).
        tokens, skeletons, indices: Normalised name pieces (see :mod:`weight_mapper.names`).
        leaves: Normalised leaf name (``""`` for groups, whose leaves the signature fixed).
        shapes: Tensor shapes, or None for groups (a bucket holds equal signatures only).
        depth: Number of dotted components of the label.
        sibling_pos: Position of the (owning) module among its siblings in [0, 1]; NaN when
            the side's order is unknown (like ``global_pos``).
        order: Definition order (row of the first tensor).
        global_pos: ``order`` scaled to [0, 1] over the whole side.
        exec_pos: First-execution position in [0, 1], NaN when unknown.
        ancestors: ``[n, CONTEXT_LEVELS]`` module ids whose mapping gives the context.
        chain: ``[n, VOTE_LEVELS]`` the candidate's own module and its ancestors; a match
            votes for mapping these onto the target's, level by level.
        rows: Row of each candidate in its group table or tensor table.
        module_types: Class name of the owning module (``""`` when unknown).
        positions: The owning module's ranks among repeated siblings, from the root down
            (:attr:`~weight_mapper.tree.ModuleTree.repeat_ranks`).
        order_rank, exec_rank: Rank by definition / execution order within the candidate's
            bucket, in [0, 1] (set by :meth:`with_ranks`; NaN until then or when unknown).
        digit_rank: On a side without definition order (a sorted header), the rank its digits
            give within a bucket whose names differ only in digits (NaN elsewhere); None on a
            side with definition order.
        ordinal: The owning module's rank in its series of ordinal siblings (``conv_a``..``c``,
            ``norm1``/``norm2``), in [0, 1]; NaN outside a series
            (:attr:`~weight_mapper.tree.ModuleTree.ordinal_rank`).
        path_indices: The purely numeric components of each label (``layers.3.experts.7.w1``
            -> ``(3, 7)``), read off the module tree; ``()`` for items not made from one
            (:attr:`numeric_components` then reads the labels).
    """

    labels: tuple[str, ...]
    tokens: tuple[tuple[str, ...], ...]
    skeletons: tuple[str, ...]
    indices: tuple[tuple[int, ...], ...]
    leaves: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...] | None
    depth: np.ndarray
    sibling_pos: np.ndarray
    order: np.ndarray
    global_pos: np.ndarray
    exec_pos: np.ndarray
    ancestors: np.ndarray
    chain: np.ndarray
    rows: np.ndarray
    module_types: tuple[str, ...] = ()
    positions: tuple[tuple[int, ...], ...] = ()
    order_rank: np.ndarray | None = None
    exec_rank: np.ndarray | None = None
    digit_rank: np.ndarray | None = None
    ordinal: np.ndarray | None = None
    path_indices: tuple[tuple[int, ...], ...] = ()

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def numeric_components(self) -> tuple[tuple[int, ...], ...]:
        """:attr:`path_indices`, or the same read off the labels when the items were made without."""
        if len(self.path_indices) == len(self.labels):
            return self.path_indices
        return tuple(tuple(int(p) for p in label.split(".") if p.isdecimal()) for label in self.labels)

    def with_ranks(self, bucket_of: np.ndarray, unbalanced: np.ndarray | None = None) -> Items:
        """A copy whose ranks are taken within each bucket (``bucket_of[i]``: item i's bucket).

        Items of ``unbalanced`` buckets (a different number of candidates on the other side:
        18 per-expert tensors against 2 shared ones) get no definition-order rank: the k-th of
        18 says nothing about which of 2 it is.
        """
        exec_rank = rank_within(bucket_of, np.nan_to_num(self.exec_pos, nan=0.0))
        exec_rank[np.isnan(self.exec_pos)] = np.nan
        order_rank = rank_within(bucket_of, self.order.astype(float))
        digit_rank = self._numeric_ranks(bucket_of) if len(self) and np.isnan(self.global_pos).all() else None
        if unbalanced is not None:
            order_rank[unbalanced] = np.nan
            if digit_rank is not None:
                digit_rank[unbalanced] = np.nan
        return replace(self, order_rank=order_rank, exec_rank=exec_rank, digit_rank=digit_rank)

    def _numeric_ranks(self, bucket_of: np.ndarray) -> np.ndarray:
        """Ranks a side without definition order (a sorted header) still has: within a bucket whose
        names differ only in their digits (``block.0.1`` / ``block.1.1``), numeric order is
        definition order (a Sequential, a ModuleList); elsewhere NaN."""
        out = np.full(len(self), np.nan)
        # Names equal once their digit runs are blanked (not the skeletons: those drop ordinal
        # words too, and ``ln_post`` sorts before ``ln_pre``).
        blanked, _ = _ids([_DIGIT_RUNS.sub("#", label) for label in self.labels])
        pairs = np.unique(np.stack([bucket_of, blanked], 1), axis=0)
        buckets, n_skeletons = np.unique(pairs[:, 0], return_counts=True)
        one_skeleton = np.isin(bucket_of, buckets[n_skeletons == 1]) & (bucket_of >= 0)
        if not one_skeleton.any():
            return out
        rows = np.flatnonzero(one_skeleton)
        by_name = sorted(rows.tolist(), key=lambda r: natural_key(self.labels[r]))
        position = np.empty(len(self))
        position[by_name] = np.arange(len(by_name))
        out[rows] = rank_within(bucket_of[rows], position[rows])
        return out

    # Derived columns for vectorised scoring, computed once per side.
    @cached_property
    def shape_ids(self) -> tuple[np.ndarray, list[tuple[int, ...]]]:
        """Each candidate's index into the list of distinct shapes, and that list."""
        return _ids(self.shapes or ())

    @cached_property
    def type_ids(self) -> tuple[np.ndarray, list[str]]:
        """Each candidate's index into the list of distinct module types, and that list."""
        return _ids(self.module_types)

    @cached_property
    def containers(self) -> np.ndarray:
        """``[n, VOTE_LEVELS - 1]`` the candidate's parent (``ancestors[:, 0]``) and its ancestors."""
        offset = (self.chain[:, 0] != self.ancestors[:, 0]).astype(np.int64) if len(self) else np.zeros(0, np.int64)
        cols = offset[:, None] + np.arange(VOTE_LEVELS - 1)[None, :]
        return np.take_along_axis(self.chain, cols, axis=1)

    @cached_property
    def index_matrix(self) -> np.ndarray:
        width = max((len(i) for i in self.indices), default=0)
        return np.array(pad_indices(self.indices, max(width, 1)), dtype=np.int64).reshape(len(self), max(width, 1))

    @cached_property
    def _skeletons(self) -> tuple[list[str], np.ndarray]:
        pos: dict[str, int] = {}
        ids = np.fromiter((pos.setdefault(sk, len(pos)) for sk in self.skeletons), dtype=np.int64, count=len(self))
        return list(pos), ids

    @property
    def skeleton_list(self) -> list[str]:
        """Distinct skeletons, in first-seen order."""
        return self._skeletons[0]

    @property
    def skeleton_ids(self) -> np.ndarray:
        """Position of each candidate's skeleton in :attr:`skeleton_list`."""
        return self._skeletons[1]

    @cached_property
    def contested(self) -> np.ndarray:
        """True for candidates whose module name means different layers in different architectures
        (:data:`~weight_mapper.names.CONTESTED`, with the sibling that decides it among these candidates)."""
        modules = self.labels if self.shapes is None else [lab.rpartition(".")[0] for lab in self.labels]
        out = np.zeros(len(self.labels), dtype=bool)
        out[list(contested_rows(modules))] = True
        return out

    @cached_property
    def leaf_array(self) -> np.ndarray:
        return np.array(self.leaves, dtype=object)

    @classmethod
    def of_groups(cls, table: TensorTable, tree: ModuleTree, groups: GroupTable) -> Items:
        """One candidate per module group."""
        first = np.array([m[0] for m in groups.members], dtype=np.int64)
        paths = groups.paths
        ids = groups.module_ids.tolist()
        return cls(
            labels=paths,
            tokens=tuple(tree.tokens[m] for m in ids),
            skeletons=tuple(tree.skeletons[m] for m in ids),
            indices=tuple(tree.indices[m] for m in ids),
            leaves=("",) * len(paths),
            shapes=None,
            depth=np.array([p.count(".") + 1 if p else 0 for p in paths], dtype=np.int64),
            sibling_pos=_if_ordered(table, tree.sibling_pos[groups.module_ids]),
            order=first,
            global_pos=_if_ordered(table, first / max(len(table) - 1, 1)),
            exec_pos=table.exec_pos[first],
            ancestors=tree.ancestor_ids(tree.parent_id[groups.module_ids], CONTEXT_LEVELS),
            chain=tree.ancestor_ids(groups.module_ids, VOTE_LEVELS),
            rows=np.arange(len(paths), dtype=np.int64),
            module_types=tuple(table.module_types[r] for r in first),
            positions=tuple(tree.repeat_ranks[m] for m in ids),
            ordinal=tree.ordinal_rank[groups.module_ids] if len(paths) else np.zeros(0),
            path_indices=tuple(tree.path_indices[m] for m in ids),
        )

    @classmethod
    def of_tensors(cls, table: TensorTable, tree: ModuleTree, rows: Sequence[int] | np.ndarray) -> Items:
        """One candidate per tensor row."""
        rows = np.asarray(rows, dtype=np.int64)
        listed = rows.tolist()
        module_ids = np.array([tree.path2id[table.modules[r]] for r in listed], dtype=np.int64)
        ids = module_ids.tolist()
        names = table.names
        return cls(
            labels=tuple(names[r] for r in listed),
            tokens=tuple(table.tokens[r] for r in listed),
            skeletons=tuple(table.skeletons[r] for r in listed),
            indices=tuple(table.indices[r] for r in listed),
            leaves=tuple(table.leaves[r] for r in listed),
            shapes=tuple(table.shapes[r] for r in listed),
            depth=np.array([names[r].count(".") + 1 for r in listed], dtype=np.int64),
            sibling_pos=_if_ordered(table, tree.sibling_pos[module_ids] if len(rows) else np.zeros(0)),
            order=rows,
            global_pos=_if_ordered(table, rows / max(len(table) - 1, 1)),
            exec_pos=table.exec_pos[rows],
            ancestors=tree.ancestor_ids(module_ids, CONTEXT_LEVELS),
            chain=tree.ancestor_ids(module_ids, VOTE_LEVELS),
            rows=rows,
            module_types=tuple(table.module_types[r] for r in listed),
            positions=tuple(tree.repeat_ranks[m] for m in ids),
            ordinal=tree.ordinal_rank[module_ids] if len(rows) else np.zeros(0),
            path_indices=tuple(_with_leaf_index(tree.path_indices[m], names[r]) for m, r in zip(ids, listed)),
        )


def _with_leaf_index(module_indices: tuple[int, ...], name: str) -> tuple[int, ...]:
    """A tensor's numeric path components: its module's, and its leaf's if that is a number."""
    leaf = name.rpartition(".")[2]
    return (*module_indices, int(leaf)) if leaf.isdecimal() else module_indices


_DIGIT_RUNS = re.compile(r"\d+")


def _ids(values: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
    """Each value's index into the list of distinct values (first-seen order), and that list."""
    index: dict[Any, int] = {}
    ids = np.fromiter((index.setdefault(v, len(index)) for v in values), dtype=np.int64, count=len(values))
    return ids, list(index)


def _if_ordered(table: TensorTable, positions: np.ndarray) -> np.ndarray:
    """Positions derived from row order, or NaN where row order is not definition order."""
    return positions if table.ordered else np.full(len(positions), np.nan)


def validate_weights(weights: Mapping[str, float] | None) -> dict[str, float]:
    """Check user component weights and scale them to sum to 1.

    Missing components weigh 0; ``None`` gives :data:`DEFAULT_WEIGHTS`.

    Raises:
        MappingError: On an unknown component, a negative or non-finite weight, or all zeros.

    >>> validate_weights({"shape": 1, "name": 1})
    {'shape': 0.5, 'name': 0.5, 'hierarchy': 0.0}
    """
    if weights is None:
        return dict(DEFAULT_WEIGHTS)
    if not isinstance(weights, Mapping):
        raise MappingError(f"weights must be a dict like {DEFAULT_WEIGHTS}, got {type(weights).__name__}")
    unknown = sorted(set(weights) - set(DEFAULT_WEIGHTS))
    if unknown:
        raise MappingError(
            f"unknown score component(s) {unknown} in weights; valid components are "
            f"{sorted(DEFAULT_WEIGHTS)} (e.g. {DEFAULT_WEIGHTS})"
        )
    out = {}
    for key in DEFAULT_WEIGHTS:
        value = weights.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise MappingError(f"weights[{key!r}] must be a finite number >= 0, got {value!r}")
        out[key] = float(value)
    total = sum(out.values())
    if total <= 0:
        raise MappingError(f"weights must not all be zero, got {dict(weights)}; the default is {DEFAULT_WEIGHTS}")
    return {k: v / total for k, v in out.items()}


# ---------------------------------------------------------------------------- edges
def all_pairs(n_src: int, n_tgt: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (source, target) position pair, row-major: the edges of a dense matrix."""
    return np.repeat(np.arange(n_src), n_tgt), np.tile(np.arange(n_tgt), n_src)


def _unique_pair_ids(a_keys: np.ndarray, b_keys: np.ndarray, si: np.ndarray, ti: np.ndarray):
    """Distinct (a_key, b_key) pairs among the edges, and each edge's pair id."""
    if len(si) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    width = int(b_keys.max(initial=0)) + 1
    code = a_keys[si] * width + b_keys[ti]
    uniq, inverse = np.unique(code, return_inverse=True)
    return uniq // width, uniq % width, inverse.reshape(-1)


# ---------------------------------------------------------------------------- shape
def shape_score(src: Items, tgt: Items, si: np.ndarray, ti: np.ndarray, *, tolerance: float = 0.0) -> np.ndarray:
    """1.0 equal, 0.7 transposed 2-D, 0.6 equal but for size-1 dims, 0.55 flattened, 0.5 near, else 0.

    The transform registry owns these rules (:func:`weight_mapper.transforms.relate`); it is
    asked once per distinct (source shape, target shape, stored-transposed) triple among the
    edges, and the answers are spread to the edges. A near shape, which no transform relates,
    has the same number of dimensions and every dimension within ``tolerance`` (relative).
    Groups (``shapes is None``) are bucketed by signature, so they score 1.
    """
    if src.shapes is None or tgt.shapes is None:
        return np.ones(len(si))
    s_ids, s_shapes = src.shape_ids
    t_ids, t_shapes = tgt.shape_ids
    n_t = max(len(t_shapes), 1)
    code = (s_ids[si] * n_t + t_ids[ti]) * 2 + _transposed_types(src, tgt, si, ti)
    keys, inverse = _distinct(code, 2 * len(s_shapes) * n_t)
    values = np.array([_pair_score(s_shapes[k // 2 // n_t], t_shapes[k // 2 % n_t], bool(k % 2), tolerance)
                       for k in keys.tolist()], dtype=float)
    return values[inverse] if len(keys) else np.zeros(len(si))


def _pair_score(s_shape: tuple[int, ...], t_shape: tuple[int, ...], transposed_types: bool, tolerance: float) -> float:
    """The shape score of one distinct pair: its transform relation's, else near, else 0."""
    relation = relate(s_shape, t_shape, transposed_types=transposed_types)
    if relation is not None:
        return relation.score
    a = compared_shape(s_shape, transposed_types)
    if tolerance > 0 and len(a) == len(t_shape) and all(
            abs(x - y) / max(x, y, 1.0) <= tolerance for x, y in zip(a, t_shape)):
        return NEAR_SCORE
    return 0.0


def _distinct(code: np.ndarray, n_codes: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of ``code`` (in ``[0, n_codes)``) and each element's index among them.

    A dense lookup table when the code space is small against the edges (no sort), else
    ``np.unique``.
    """
    if n_codes <= 4 * len(code) + (1 << 16):
        present = np.zeros(n_codes, dtype=bool)
        present[code] = True
        keys = np.flatnonzero(present)
        lookup = np.zeros(n_codes, dtype=np.int64)
        lookup[keys] = np.arange(len(keys))
        return keys, lookup[code]
    keys, inverse = np.unique(code, return_inverse=True)
    return keys, inverse.reshape(-1)


def _transposed_types(src: Items, tgt: Items, si: np.ndarray, ti: np.ndarray) -> np.ndarray:
    """Per edge: do the owning module types store 2-D weights transposed from each other?"""
    if not src.module_types or not tgt.module_types:
        return np.zeros(len(si), dtype=np.int64)
    s_ids, s_types = src.type_ids
    t_ids, t_types = tgt.type_ids
    table = np.array([[stored_transposed(a, b) for b in t_types] for a in s_types], dtype=np.int64)
    return table[s_ids[si], t_ids[ti]]


def _pad_cols(m: np.ndarray, width: int) -> np.ndarray:
    if m.shape[1] == width:
        return m
    return np.pad(m, ((0, 0), (0, width - m.shape[1])), constant_values=-1)


# ---------------------------------------------------------------------------- name
# Name scores depend on the two skeletons only, so each is computed once per distinct
# (source skeleton, target skeleton) pair among the edges, then spread to the edges.
def _incidence(token_lists: Sequence[Sequence[str]], vocab: dict[str, int]) -> sparse.csr_matrix:
    rows, cols = [], []
    for i, tokens in enumerate(token_lists):
        for t in set(tokens):
            rows.append(i)
            cols.append(vocab.setdefault(t, len(vocab)))
    return sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(token_lists), max(len(vocab), 1)))


def token_score(src: Items, tgt: Items, si: np.ndarray, ti: np.ndarray) -> np.ndarray:
    """Jaccard overlap of the normalised word tokens of the two names."""
    ua, ub, inverse = _unique_pair_ids(src.skeleton_ids, tgt.skeleton_ids, si, ti)
    vocab: dict[str, int] = {}
    a = _incidence([sk.split(".") if sk else [] for sk in src.skeleton_list], vocab)
    b = _incidence([sk.split(".") if sk else [] for sk in tgt.skeleton_list], vocab)
    a.resize((a.shape[0], max(len(vocab), 1)))
    b.resize((b.shape[0], max(len(vocab), 1)))
    inter = np.asarray(a[ua].multiply(b[ub]).sum(1)).reshape(-1)
    union = np.asarray(a.sum(1)).reshape(-1)[ua] + np.asarray(b.sum(1)).reshape(-1)[ub] - inter
    per_pair = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return per_pair[inverse]


def _string_score(src: Items, tgt: Items, si: np.ndarray, ti: np.ndarray, scorer) -> np.ndarray:
    ua, ub, inverse = _unique_pair_ids(src.skeleton_ids, tgt.skeleton_ids, si, ti)
    if len(ua) == 0:
        return np.zeros(0)
    per_pair = process.cpdist(
        [_spelled(src.skeleton_list[i]) for i in ua], [_spelled(tgt.skeleton_list[j]) for j in ub],
        scorer=scorer, dtype=np.float64,
    )
    return np.asarray(per_pair, dtype=float)[inverse]


def _spelled(skeleton: str) -> str:
    """A skeleton as spelled, without its synonym-class tokens (``~qproj``): those are for the
    token overlap; in an edit distance their length would only add noise."""
    return ".".join(t for t in skeleton.split(".") if not t.startswith("~")) if "~" in skeleton else skeleton


def edit_score(src: Items, tgt: Items, si: np.ndarray, ti: np.ndarray) -> np.ndarray:
    """Normalised Levenshtein similarity of the digit-free name skeletons."""
    return _string_score(src, tgt, si, ti, Levenshtein.normalized_similarity)


def lcs_score(src: Items, tgt: Items, si: np.ndarray, ti: np.ndarray) -> np.ndarray:
    """Normalised longest-common-subsequence similarity of the name skeletons."""
    return _string_score(src, tgt, si, ti, LCSseq.normalized_similarity)


def index_score(src: Items, tgt: Items, si: np.ndarray, ti: np.ndarray) -> np.ndarray:
    """Agreement of the numeric positions in the names (``layer3.2`` -> ``(3, 2)``).

    Positions are compared left-aligned and, where both names have two or more, right-aligned
    too (a level one side inserts shifts them:
    SSDlite's ``backbone.features.0.2.block.1.1`` is torchvision's ``features.2.block.1.1``); the
    score is the better fraction of equal positions over the longer tuple, and 1.0 when neither
    name has a number.
    """
    width = max(src.index_matrix.shape[1], tgt.index_matrix.shape[1])
    a = _pad_cols(src.index_matrix, width)[si]
    b = _pad_cols(tgt.index_matrix, width)[ti]
    equal = ((a == b) & (a >= 0)).sum(-1)
    na, nb = (a >= 0).sum(1), (b >= 0).sum(1)
    # Right-aligned too: a level one side inserts (SSDlite's ``features.0.``) shifts the positions.
    # A lone number is not shifted: ``w1`` against ``experts.3.w1`` says nothing about expert 3.
    ra, rb = _right_aligned(a, na), _right_aligned(b, nb)
    shifted = ((ra == rb) & (ra >= 0)).sum(-1)
    equal = np.where((na >= 2) & (nb >= 2), np.maximum(equal, shifted), equal)
    longer = np.maximum(na, nb)
    return np.where(longer > 0, equal / np.maximum(longer, 1), 1.0)


def _right_aligned(m: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Rows of a -1-padded index matrix with their values moved to the right end."""
    width = m.shape[1] if m.ndim == 2 else 0
    if not len(m) or not width:
        return m
    cols = np.arange(width)[None, :] - (width - n)[:, None]
    return np.where(cols >= 0, np.take_along_axis(m, np.clip(cols, 0, width - 1), axis=1), -1)


def ordinal_score(src: Items, tgt: Items, si: np.ndarray, ti: np.ndarray) -> np.ndarray:
    """Closeness of the candidates' ranks in their ordinal series (``conv_b`` ~ ``conv2``,
    ``layernorm_after`` ~ ``norm2``); NaN where either has none."""
    if src.ordinal is None or tgt.ordinal is None:
        return np.full(len(si), np.nan)
    return _closeness(src.ordinal[si], tgt.ordinal[ti])


def leaf_score(src: Items, tgt: Items, si: np.ndarray, ti: np.ndarray) -> np.ndarray:
    """1 when the normalised leaf names (parameter types) agree, else 0."""
    return (src.leaf_array[si] == tgt.leaf_array[ti]).astype(float)


# ---------------------------------------------------------------------------- hierarchy
def _closeness(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return 1.0 - np.abs(a - b)


def rank_within(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Rank of each item by ``values`` among the items sharing its key, scaled to [0, 1].

    An item alone under its key gets 0.5.

    >>> rank_within(np.array([0, 0, 1]), np.array([5.0, 2.0, 7.0])).tolist()
    [1.0, 0.0, 0.5]
    """
    n = len(keys)
    if n == 0:
        return np.zeros(0)
    order = np.lexsort((np.arange(n), values, keys))
    sorted_keys = keys[order]
    start = np.ones(n, dtype=bool)
    start[1:] = sorted_keys[1:] != sorted_keys[:-1]
    group_start = np.maximum.accumulate(np.where(start, np.arange(n), 0))
    counts = np.diff(np.append(np.flatnonzero(start), n))
    size = np.repeat(counts, counts)
    pos = np.arange(n) - group_start
    out = np.empty(n)
    out[order] = np.where(size > 1, pos / np.maximum(size - 1, 1), 0.5)
    return out


def depth_score(src: Items, tgt: Items, si: np.ndarray, ti: np.ndarray) -> np.ndarray:
    """1 - |depth difference| / larger depth."""
    da, db = src.depth[si].astype(float), tgt.depth[ti].astype(float)
    return 1.0 - np.abs(da - db) / np.maximum(np.maximum(da, db), 1.0)


def _known(*positions: np.ndarray) -> bool:
    return not any(np.isnan(p).any() for p in positions)


def sibling_score(src: Items, tgt: Items, si: np.ndarray, ti: np.ndarray) -> np.ndarray | None:
    """Closeness of the positions among siblings, or None when either side's order is unknown."""
    if not _known(src.sibling_pos, tgt.sibling_pos):
        return None
    return _closeness(src.sibling_pos[si], tgt.sibling_pos[ti])


def order_score(src: Items, tgt: Items, si: np.ndarray, ti: np.ndarray) -> np.ndarray | None:
    """Closeness of relative definition order: rank within the bucket and place in the model.

    A side whose order is unknown (a safetensors file keeps no definition order) still has the
    ranks its digits give (:meth:`Items.with_ranks`): where both candidates have one, the rank
    decides alone; elsewhere NaN (the hierarchy is then scored without order for that pair, as
    for a side with no rank at all, which gives None).
    """
    if not _known(src.global_pos, tgt.global_pos):
        s_rank = src.digit_rank if src.digit_rank is not None else src.order_rank
        t_rank = tgt.digit_rank if tgt.digit_rank is not None else tgt.order_rank
        if not len(si) or s_rank is None or t_rank is None or (src.digit_rank is None and tgt.digit_rank is None):
            return None
        rank = _closeness(s_rank[si], t_rank[ti])
        return None if np.isnan(rank).all() else rank
    place = _closeness(src.global_pos[si], tgt.global_pos[ti])
    rank = _closeness(src.order_rank[si], tgt.order_rank[ti])
    # A rank is only comparable between buckets of equal size (see Items.with_ranks).
    return np.where(np.isnan(rank), place, 0.5 * rank + 0.5 * place)


def exec_score(src: Items, tgt: Items, si: np.ndarray, ti: np.ndarray) -> np.ndarray | None:
    """Closeness of relative execution order, or None unless every candidate ran."""
    if not _known(src.exec_pos, tgt.exec_pos):
        return None
    return 0.5 * _closeness(src.exec_rank[si], tgt.exec_rank[ti]) + 0.5 * _closeness(
        src.exec_pos[si], tgt.exec_pos[ti]
    )


def context_score(
    src: Items, tgt: Items, si: np.ndarray, ti: np.ndarray, src2tgt_module: np.ndarray | None
) -> np.ndarray:
    """How consistently the candidates' parents are already mapped onto each other.

    ``src2tgt_module[m]`` is the target module that source module ``m`` maps to (-1 if none).
    Per ancestor level of the source candidate (parent, grandparent): 1 if it maps onto the
    target candidate's parent or one of its ancestors (so ``features.3.1`` mapped onto
    ``stages.1.blocks.1`` supports a target inside it at any depth), 0 if it maps elsewhere,
    :data:`UNKNOWN_CONTEXT` if it is unmapped; levels are averaged.
    """
    if src2tgt_module is None:
        return np.full(len(si), UNKNOWN_CONTEXT)
    mapped = src2tgt_module[src.ancestors[si]]  # [n_edges, levels]
    containers = tgt.containers
    inside = np.zeros(mapped.shape, dtype=bool)
    for k in range(containers.shape[1]):
        inside |= mapped == containers[ti, k][:, None]
    per_level = np.where(mapped < 0, UNKNOWN_CONTEXT, inside.astype(float))
    return per_level.mean(-1)


def with_context(base: np.ndarray, context: np.ndarray) -> np.ndarray:
    """``80 % base + 20 % context``, where context below the base counts as the base.

    >>> with_context(np.array([0.5, 0.5]), np.array([1.0, 0.0])).round(3).tolist()
    [0.6, 0.5]
    """
    return (1 - CONTEXT_WEIGHT) * base + CONTEXT_WEIGHT * np.maximum(base, context)


# ---------------------------------------------------------------------------- rules
def forbidden(
    src: Items, tgt: Items, si: np.ndarray, ti: np.ndarray,
    incompatible_pairs: Sequence[tuple[Sequence[str], Sequence[str]]] | None,
) -> np.ndarray:
    """True where an ``incompatible_pairs`` rule forbids the match (symmetrically).

    Each side of a validated rule is a tuple of alternatives (see
    :func:`validate_incompatible_pairs`). A source whose name contains every chunk of one
    alternative of one side (``yolo_backbone``: ``{yolo, backbone}``) never matches a target
    containing every chunk of an alternative of the other side, in both directions.
    """
    out = np.zeros(len(si), dtype=bool)
    if not incompatible_pairs:
        return out
    incompatible_pairs = validate_incompatible_pairs(incompatible_pairs)  # idempotent on validated rules
    src_chunks = [semantic_chunks(n) for n in src.labels]
    tgt_chunks = [semantic_chunks(n) for n in tgt.labels]

    def hits(alternatives: Sequence[str], chunks: list[frozenset[str]]) -> np.ndarray:
        wanted = [semantic_chunks(a) for a in alternatives]
        return np.array([any(w <= c for w in wanted) for c in chunks], dtype=bool)

    for left, right in incompatible_pairs:
        s_left, s_right = hits(left, src_chunks), hits(right, src_chunks)
        t_left, t_right = hits(left, tgt_chunks), hits(right, tgt_chunks)
        out |= (s_left[si] & t_right[ti]) | (s_right[si] & t_left[ti])
    return out


def validate_incompatible_pairs(pairs) -> tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]:
    """Check ``incompatible_pairs`` and bring each rule to ``(left alternatives, right alternatives)``.

    A rule is a pair of sides. A side is a module name (``"encoder"``, ``"yolo_backbone"``:
    every chunk must occur) or, as in the user guide, a set of such names meaning any of them
    (``({"encoder", "embedding"}, {"decoder", "output"})``).

    Raises:
        MappingError: Naming the malformed rule.

    >>> validate_incompatible_pairs([({"encoder", "embedding"}, "decoder")])
    ((('embedding', 'encoder'), ('decoder',)),)
    """
    if pairs is None:
        return ()
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Iterable):
        raise MappingError(f"incompatible_pairs must be a list of pairs, got {pairs!r}")
    out = []
    for rule in pairs:
        sides = [_alternatives(side) for side in rule] if isinstance(rule, (tuple, list)) else []
        if len(sides) != 2 or not all(sides):
            raise MappingError(
                f"incompatible_pairs entry {rule!r} must be a pair of module names such as "
                "('encoder', 'decoder'), or of sets of alternatives such as "
                "({'encoder', 'embedding'}, {'decoder', 'output'})"
            )
        out.append((sides[0], sides[1]))
    return tuple(out)


def _alternatives(side: Any) -> tuple[str, ...] | None:
    """A rule side as a sorted tuple of names, or None when it is malformed."""
    names = [side] if isinstance(side, str) else list(side) if isinstance(side, (set, frozenset, list, tuple)) else None
    if not names or not all(isinstance(n, str) and semantic_chunks(n) for n in names):
        return None
    return tuple(sorted(set(names)))


# ---------------------------------------------------------------------------- combination
def mean_of_known(scores: Mapping[str, np.ndarray], shares: Mapping[str, float], n: int) -> np.ndarray:
    """Per edge, the share-weighted mean of the sub-scores it has (NaN: not available for that pair).

    >>> mean_of_known({"a": np.array([1.0, 1.0]), "b": np.array([0.0, np.nan])}, {"a": 0.5, "b": 0.5}, 2).tolist()
    [0.5, 1.0]
    """
    total, weight = np.zeros(n), np.zeros(n)
    for key, w in shares.items():
        value = scores[key]
        known = ~np.isnan(value)
        total += np.where(known, w * np.nan_to_num(value), 0.0)
        weight += np.where(known, w, 0.0)
    return total / np.maximum(weight, 1e-12)


def share_weighted_sum(scores: Mapping[str, np.ndarray], shares: Mapping[str, float], n: int) -> np.ndarray:
    """The sub-scores weighted by their shares, rescaled to sum to 1 (per edge, over the sub-scores it has).

    Not :func:`mean_of_known` with no NaN: the two round differently, and each component keeps
    the arithmetic its scores were tuned with.

    >>> share_weighted_sum({"a": np.array([1.0]), "b": np.array([0.0])}, {"a": 0.3, "b": 0.1}, 1).round(3).tolist()
    [0.75]
    """
    if any(np.isnan(scores[key]).any() for key in shares):
        # An edge without one of them (a sorted side's order where its digits give no rank) is
        # scored on the others, rescaled, as if that sub-score did not exist for it.
        out, weight = np.zeros(n), np.zeros(n)
        for key, w in shares.items():
            known = ~np.isnan(scores[key])
            out = out + np.where(known, w * np.nan_to_num(scores[key]), 0.0)
            weight = weight + np.where(known, w, 0.0)
        return out / np.maximum(weight, 1e-12)
    out, total = np.zeros(n), sum(shares.values())
    for key, w in shares.items():
        out = out + w / total * scores[key]  # 0 + x is x: the same floats as a plain sum
    return out


@dataclass(frozen=True)
class SubScore:
    """One sub-score of a component: its key, its scorer and how the views call it.

    ``scorer(src, tgt, si, ti)`` returns one value per edge in [0, 1], NaN for a pair that has
    no such score, or None when a whole side cannot provide it (no definition order).
    """

    key: str
    scorer: Callable[[Items, Items, np.ndarray, np.ndarray], np.ndarray | None]
    label: str


@dataclass(frozen=True)
class Component:
    """One top-level score component: what it is made of, its default weight and its label.

    A component is scored either directly, ``scorer(src, tgt, si, ti, tolerance=...)``, or as a
    mean of its ``parts``: ``mean(sub_scores, shares, n_edges)`` over the sub-scores available,
    with the shares of ``shares`` (or of the first ``shares_when`` table whose sub-score is
    available).

    Attributes:
        key: The name in ``weights=`` and in every ``components`` dict.
        weight: Default weight (:data:`DEFAULT_WEIGHTS`).
        label: How the views and the review page call it.
        short: A shorter label for narrow columns (the label by default).
        scorer: The direct scorer, or None for a component made of parts.
        parts: Sub-scores, in the order they are computed and shown.
        shares: Share of each sub-score in the component (rescaled over the ones available).
        shares_when: ``(sub-score key, shares)``: the table used instead when that sub-score is available.
        mean: How the sub-scores are combined: :func:`mean_of_known` (per pair) or
            :func:`share_weighted_sum` (a sub-score is available for a whole side or not at all).
    """

    key: str
    weight: float
    label: str
    scorer: Callable[..., np.ndarray] | None = None
    parts: tuple[SubScore, ...] = ()
    shares: Mapping[str, float] = field(default_factory=dict)
    shares_when: tuple[tuple[str, Mapping[str, float]], ...] = ()
    mean: Callable[[Mapping[str, np.ndarray], Mapping[str, float], int], np.ndarray] = mean_of_known
    short: str = ""

    @property
    def short_label(self) -> str:
        return self.short or self.label

    def shares_for(self, available: Collection[str]) -> dict[str, float]:
        """Shares of the ``available`` sub-scores, from the table in force, not yet rescaled."""
        table = next((t for key, t in self.shares_when if key in available), self.shares)
        return {k: w for k, w in table.items() if k in available}

    def rescaled_shares(self, available: Collection[str]) -> dict[str, float]:
        """Each available sub-score's share of the component, summing to 1 (empty for a direct one).

        >>> KEY2COMPONENT["hierarchy"].rescaled_shares({"depth", "order"})
        {'depth': 0.17647058823529413, 'order': 0.8235294117647058}
        """
        shares = self.shares_for(available)
        total = sum(shares.values())
        return {k: w / total for k, w in shares.items()} if total else {}

    def score(self, src: Items, tgt: Items, si: np.ndarray, ti: np.ndarray, *, tolerance: float,
              sub_scores: dict[str, np.ndarray]) -> np.ndarray:
        """The component on each edge; its available sub-scores are added to ``sub_scores``."""
        if self.scorer is not None:
            return self.scorer(src, tgt, si, ti, tolerance=tolerance)
        for part in self.parts:
            value = part.scorer(src, tgt, si, ti)
            if value is not None:  # a side cannot provide it: left out, the other shares rescaled
                sub_scores[part.key] = value
        available = [p.key for p in self.parts if p.key in sub_scores]
        return self.mean(sub_scores, self.shares_for(available), len(si))


# The registry of score components, in the order they are computed, weighed and shown. A new
# component is one entry here (its scorer or sub-scores, default weight and label); score_edges,
# weighted_base, validate_weights, the assignment, the explanations, the views and the review
# page all iterate it.
SCORE_COMPONENTS: tuple[Component, ...] = (
    Component("shape", 0.5, "shape", scorer=shape_score),
    Component(
        "name", 0.3, "name",
        parts=(SubScore("tokens", token_score, "token overlap"), SubScore("edit", edit_score, "edit distance"),
               SubScore("lcs", lcs_score, "common subsequence"), SubScore("index", index_score, "numeric indices"),
               SubScore("leaf", leaf_score, "leaf type"), SubScore("ordinal", ordinal_score, "ordinal position")),
        # "ordinal" only for pairs in an ordinal series: a pair without one is scored on the others.
        shares=MappingProxyType({"tokens": 0.3, "edit": 0.2, "lcs": 0.15, "index": 0.25, "leaf": 0.1, "ordinal": 0.2}),
        mean=mean_of_known,
    ),
    Component(
        "hierarchy", 0.2, "hierarchy", short="hier.",
        parts=(SubScore("depth", depth_score, "depth"), SubScore("sibling", sibling_score, "sibling position"),
               SubScore("order", order_score, "definition order"), SubScore("exec", exec_score, "execution order")),
        shares=MappingProxyType({"depth": 0.15, "sibling": 0.15, "order": 0.7}),
        # With execution order known on both sides, what runs when says more than where it was
        # defined, so "exec" takes most of "order"'s share.
        shares_when=(("exec", MappingProxyType({"depth": 0.15, "sibling": 0.15, "order": 0.2, "exec": 0.5})),),
        mean=share_weighted_sum,
    ),
)
KEY2COMPONENT: dict[str, Component] = {c.key: c for c in SCORE_COMPONENTS}
#: The components weighed into the base score, in registry order.
BASE_COMPONENTS: tuple[str, ...] = tuple(KEY2COMPONENT)
#: The hierarchy context: not weighed into the base, it lifts the score from the second round on
#: (:func:`with_context`, :data:`CONTEXT_WEIGHT`).
CONTEXT = "context"
#: The components every match reports (``Assignment.components``, ``PlanEntry.components``).
REPORTED_COMPONENTS: tuple[str, ...] = (*BASE_COMPONENTS, CONTEXT)
#: Every sub-score key, in registry order, and how the views call it.
SUB_SCORES: tuple[str, ...] = tuple(p.key for c in SCORE_COMPONENTS for p in c.parts)
SUB_SCORE_LABELS: dict[str, str] = {p.key: p.label for c in SCORE_COMPONENTS for p in c.parts}
# The user-facing component weights (documented defaults of the reference design).
DEFAULT_WEIGHTS: dict[str, float] = {c.key: c.weight for c in SCORE_COMPONENTS}
# The share tables by their former names.
NAME_WEIGHTS: Mapping[str, float] = KEY2COMPONENT["name"].shares
HIERARCHY_WEIGHTS: Mapping[str, float] = KEY2COMPONENT["hierarchy"].shares
HIERARCHY_WEIGHTS_EXEC: Mapping[str, float] = dict(KEY2COMPONENT["hierarchy"].shares_when)["exec"]


def weighted_base(weights: Mapping[str, float], components: Mapping[str, Any]) -> Any:
    """The base score: the components weighed by the user's weights (arrays or floats).

    >>> weighted_base({"shape": 0.5, "name": 0.3, "hierarchy": 0.2}, {"shape": 1.0, "name": 0.5, "hierarchy": 0.0})
    0.65
    """
    return sum(weights[key] * components[key] for key in BASE_COMPONENTS)


#: The name score of every pair with a contested name (:attr:`Items.contested`).
CONTESTED_NAME_SCORE = 0.5


def score_edges(
    src: Items, tgt: Items, si: np.ndarray, ti: np.ndarray, *, weights: Mapping[str, float], tolerance: float = 0.0
) -> dict[str, np.ndarray]:
    """Every sub-score, the components of :data:`SCORE_COMPONENTS` and their weighted ``base``, one value per edge.

    Args:
        src, tgt: Candidates of both sides, with ranks set by :meth:`Items.with_ranks`.
        si, ti: Positions of the candidate pairs (edges) to score.
        weights: Validated component weights (see :func:`validate_weights`).
        tolerance: ``shape_tolerance`` of the mapper.

    Returns:
        Dict with the sub-scores (``tokens``, ``edit``, ``lcs``, ``index``, ``leaf``, ``ordinal``,
        ``depth``; ``sibling``, ``order`` and ``exec`` when known), the components ``shape``,
        ``name``, ``hierarchy`` and ``base``. ``shape == 0`` marks an infeasible pair.
    """
    out: dict[str, np.ndarray] = {}
    for component in SCORE_COMPONENTS:
        out[component.key] = component.score(src, tgt, si, ti, tolerance=tolerance, sub_scores=out)
    # A contested name (Gemma's post_attention_layernorm) says nothing about its partner: every
    # pair with one gets the same name score, so that the data flow, order and context decide.
    contested = src.contested[si] | tgt.contested[ti]
    if contested.any():
        out["name"] = np.where(contested, CONTESTED_NAME_SCORE, out["name"])
    out["base"] = weighted_base(weights, out)
    return out


def score_matrices(
    src: Items, tgt: Items, *, weights: Mapping[str, float], tolerance: float = 0.0
) -> dict[str, np.ndarray]:
    """:func:`score_edges` over every pair, as ``[n_src, n_tgt]`` matrices (one bucket).

    >>> from weight_mapper.table import TensorTable
    >>> from weight_mapper.tree import ModuleTree
    >>> t = TensorTable.from_state_dict({"a.weight": (2, 3), "b.weight": (3, 2)})
    >>> items = Items.of_tensors(t, ModuleTree(t), [0, 1])
    >>> score_matrices(items, items, weights=validate_weights(None))["shape"].tolist()
    [[1.0, 0.7], [0.7, 1.0]]
    """
    src, tgt = src.with_ranks(np.zeros(len(src), np.int64)), tgt.with_ranks(np.zeros(len(tgt), np.int64))
    si, ti = all_pairs(len(src), len(tgt))
    edges = score_edges(src, tgt, si, ti, weights=weights, tolerance=tolerance)
    return {k: v.reshape(len(src), len(tgt)) for k, v in edges.items()}
