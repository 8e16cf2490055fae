"""Candidate pairs that stay sparse: blocking, order alignment and the sparse assignment.

A bucket of the assignment stage (one module signature, or one tensor size) is normally scored
densely, every source against every target. Where a bucket is large (more than
:data:`SPARSE_MIN_PAIRS` pairs; only models whose repeated blocks carry no index to split by get
there) this module proposes the pairs worth scoring instead, so that the cost grows as
``n x k`` and not ``n x n``:

- **a window in relative order**: each candidate's place in its bucket (its rank by definition
  order, or by natural order for a side without one) scaled to [0, 1]; for each source, the
  :data:`WINDOW` targets on either side of its place;
- **blocking by name**: the ``k`` (:data:`NAME_CLASSES`) target skeletons whose names fit the
  source's skeleton best (token overlap, edit distance and LCS, weighted as in the name score),
  and for each of them the :data:`WINDOW` targets of that skeleton on either side of the
  source's place. A layer whose ``q`` and ``o`` are defined in the other order on the other
  side still has both among its candidates;
- the pair of the **order alignment** (:func:`order_alignment`) and every pair of identical
  names.

The scorers score only these pairs (they work on edge lists), and :func:`solve_sparse` solves
the assignment on them: ``scipy.sparse.csgraph.min_weight_full_bipartite_matching`` (the
LAPJVsp algorithm) for ``best_match``, rounds of mutually best pairs for ``greedy``.

**Order when names say nothing.** Names carry evidence for a source when its candidates differ
in what the names share: the token overlap, the leaf, or the ordinal series
(:func:`order_decided`). The edit distance, the LCS and the digit runs of names that split
into no common enumeration are left out of that test: two unrelated names differ in them by
chance (``net.blk_4821fabc.a`` reads the position 4821, and is closer in letters to ``k`` than
to ``q``). A source without evidence takes the target the order alignment gives it, and the
entry is flagged ``order_only``: within its bucket, that is what zipping the two key lists
does when it is right.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from weight_mapper.score import NAME_WEIGHTS, Items, edit_score, lcs_score, token_score

__all__ = [
    "NAME_CLASSES",
    "ORDER_BONUS",
    "SPARSE_MIN_PAIRS",
    "WINDOW",
    "SparseBlock",
    "bucket_candidates",
    "is_sparse",
    "order_alignment",
    "order_decided",
    "relative_positions",
    "solve_sparse",
    "sparse_margins",
]

# A bucket with more pairs than this is blocked, not scored densely. The largest bucket of the
# accuracy benchmarks and the zoo stays under it, so their results are the dense ones.
SPARSE_MIN_PAIRS = 100_000
NAME_CLASSES = 4  # k: target name skeletons kept per source skeleton
WINDOW = 4  # targets kept on each side of a source's relative place, per skeleton and overall
MAX_SKELETON_PAIRS = 2_000_000  # skeleton pairs scored for blocking; above it, the window alone
# Added to the solver weight of an order-aligned pair of a source whose names say nothing
# (see order_decided): more than any score difference, so the alignment is what is chosen;
# the score shown and the margins are the pair's own.
ORDER_BONUS = 1.0


def is_sparse(n_src: int, n_tgt: int) -> bool:
    """Whether a bucket of ``n_src x n_tgt`` pairs is blocked rather than scored densely.

    >>> is_sparse(250, 400), is_sparse(251, 400)
    (False, True)
    """
    return n_src * n_tgt > SPARSE_MIN_PAIRS


def relative_positions(order: np.ndarray) -> np.ndarray:
    """Each item's rank by ``order`` (ties by position), scaled to [0, 1]; 0.5 for a single item.

    >>> relative_positions(np.array([30, 10, 20])).tolist()
    [1.0, 0.0, 0.5]
    """
    n = len(order)
    out = np.empty(n)
    if n == 1:
        out[:] = 0.5
    elif n:
        out[np.argsort(order, kind="stable")] = np.arange(n) / (n - 1)
    return out


def order_alignment(n_src: int, n_tgt: int) -> tuple[np.ndarray, np.ndarray]:
    """A monotone one-to-one alignment of two sequences by relative place (ranks in, ranks out).

    The shorter sequence is spread evenly over the longer one: equal lengths give the zip, and
    a source ``k`` of ``n`` takes the target nearest ``k / (n - 1)`` of the way along.

    >>> [a.tolist() for a in order_alignment(3, 3)]
    [[0, 1, 2], [0, 1, 2]]
    >>> [a.tolist() for a in order_alignment(3, 5)]
    [[0, 1, 2], [0, 2, 4]]
    >>> [a.tolist() for a in order_alignment(5, 3)]
    [[0, 2, 4], [0, 1, 2]]
    """
    n = min(n_src, n_tgt)
    short = np.arange(n)
    if n == 0:
        return short, short
    longer = max(n_src, n_tgt)
    spread = np.rint(short * (longer - 1) / max(n - 1, 1)).astype(np.int64) if n > 1 else np.array([0])
    return (short, spread) if n_src <= n_tgt else (spread, short)


def _windows(src_pos: np.ndarray, tgt_pos: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """For each source place, the ``width`` targets on either side of it: ``(source, target)``
    local index pairs; ``tgt_pos`` sorted ascending."""
    n_t = len(tgt_pos)
    if n_t == 0 or len(src_pos) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    span = min(2 * width, n_t)
    start = np.clip(np.searchsorted(tgt_pos, src_pos) - width, 0, n_t - span)
    cols = start[:, None] + np.arange(span)[None, :]
    rows = np.repeat(np.arange(len(src_pos)), span)
    return rows, cols.reshape(-1)


def _skeleton_classes(src: Items, tgt: Items, s: np.ndarray, t: np.ndarray, k: int) -> tuple[np.ndarray, ...] | None:
    """The ``k`` best-fitting target skeletons of each source skeleton of the bucket.

    Returns ``(source skeleton id per source, target skeleton id per target, best [S_s, k]
    target skeleton ids)``, ids local to the bucket; None when there are too many skeleton
    pairs to score (then the window alone proposes candidates).
    """
    s_ids, s_inv = np.unique(src.skeleton_ids[s], return_inverse=True)
    t_ids, t_inv = np.unique(tgt.skeleton_ids[t], return_inverse=True)
    if len(s_ids) * len(t_ids) > MAX_SKELETON_PAIRS:
        return None
    # One representative item per skeleton: these scores depend on the skeletons only.
    s_rep = np.empty(len(s_ids), np.int64)
    s_rep[s_inv.reshape(-1)] = s
    t_rep = np.empty(len(t_ids), np.int64)
    t_rep[t_inv.reshape(-1)] = t
    si, ti = np.repeat(s_rep, len(t_rep)), np.tile(t_rep, len(s_rep))
    parts = (("tokens", token_score), ("edit", edit_score), ("lcs", lcs_score))
    fit = sum(NAME_WEIGHTS[key] * scorer(src, tgt, si, ti) for key, scorer in parts)
    fit = np.asarray(fit, dtype=float).reshape(len(s_ids), len(t_ids))
    kk = min(k, len(t_ids))
    best = np.argsort(-fit, axis=1, kind="stable")[:, :kk]
    return s_inv.reshape(-1), t_inv.reshape(-1), best


def bucket_candidates(
    src: Items, tgt: Items, s: np.ndarray, t: np.ndarray, src_key: np.ndarray, tgt_key: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """The candidate pairs of one large bucket, as item positions ``(si, ti)``, sorted row-major.

    Args:
        src, tgt: The level's candidates.
        s, t: Positions of the bucket's sources and targets in ``src`` / ``tgt``.
        src_key, tgt_key: Label ids, equal where two names are identical (up to the prefix
            one side adds): such pairs are always candidates, as they are pinned.

    Each source gets at most ``2 * WINDOW * (NAME_CLASSES + 1)`` candidates plus its aligned
    and identically named targets, so the pairs grow as ``n x k``.
    """
    n_s, n_t = len(s), len(t)
    ps, pt = relative_positions(src.order[s]), relative_positions(tgt.order[t])
    t_order = np.argsort(pt, kind="stable")  # local target indices in relative order
    rows, cols = [], []
    r, c = _windows(ps, pt[t_order], WINDOW)  # the window, whatever the names
    rows.append(r)
    cols.append(t_order[c])
    classes = _skeleton_classes(src, tgt, s, t, NAME_CLASSES)
    if classes is not None:
        s_class, t_class, best = classes
        for v in range(int(t_class.max()) + 1 if n_t else 0):
            members = t_order[t_class[t_order] == v]  # targets of skeleton v, in relative order
            wants = np.flatnonzero((best[s_class] == v).any(1))  # sources that keep skeleton v
            if not len(members) or not len(wants):
                continue
            r, c = _windows(ps[wants], pt[members], WINDOW)
            rows.append(wants[r])
            cols.append(members[c])
    a_src, a_tgt = order_alignment(n_s, n_t)  # ranks -> local indices
    s_rank = np.argsort(ps, kind="stable")
    rows.append(s_rank[a_src])
    cols.append(t_order[a_tgt])
    same = _identical(src_key[s], tgt_key[t])
    rows.append(same[0])
    cols.append(same[1])
    code = np.unique(np.concatenate(rows).astype(np.int64) * n_t + np.concatenate(cols).astype(np.int64))
    return s[code // n_t], t[code % n_t]


def _identical(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Local index pairs ``(i, j)`` with ``a[i] == b[j]``."""
    order = np.argsort(b, kind="stable")
    lo, hi = np.searchsorted(b[order], a, "left"), np.searchsorted(b[order], a, "right")
    count = hi - lo
    rows = np.repeat(np.arange(len(a)), count)
    cols = order[np.concatenate([np.arange(x, y) for x, y in zip(lo[count > 0], hi[count > 0])]) if count.any()
                 else np.zeros(0, np.int64)]
    return rows, cols


def order_decided(
    src: Items, tgt: Items, s: np.ndarray, t: np.ndarray, si: np.ndarray, ti: np.ndarray,
    scores: dict[str, np.ndarray], allowed: np.ndarray,
) -> np.ndarray:
    """Per edge of one blocked bucket: is it the order-aligned pair of a source whose names say nothing?

    A source's names say nothing when all its admissible candidates share as many tokens with
    it (``tokens``), agree as much on the leaf (``leaf``) and on the place in an ordinal series
    (``ordinal``). Then the order alignment decides (see the module docstring).
    """
    n_edges = len(si)
    out = np.zeros(n_edges, dtype=bool)
    if not n_edges:
        return out
    src_local = np.full(len(src), -1, np.int64)
    src_local[s] = np.arange(len(s))
    tgt_local = np.full(len(tgt), -1, np.int64)
    tgt_local[t] = np.arange(len(t))
    row = src_local[si]
    evidence = np.zeros(len(s), dtype=bool)
    for key in ("tokens", "leaf", "ordinal"):
        v = np.where(allowed, np.nan_to_num(scores[key], nan=-1.0), np.nan)
        hi = np.full(len(s), -np.inf)
        lo = np.full(len(s), np.inf)
        ok = allowed
        np.maximum.at(hi, row[ok], v[ok])
        np.minimum.at(lo, row[ok], v[ok])
        evidence |= np.isfinite(hi) & (hi - lo > 1e-9)
    a_src, a_tgt = order_alignment(len(s), len(t))
    aligned = np.full(len(s), -1, np.int64)
    s_rank = np.argsort(relative_positions(src.order[s]), kind="stable")
    t_rank = np.argsort(relative_positions(tgt.order[t]), kind="stable")
    aligned[s_rank[a_src]] = t_rank[a_tgt]
    return allowed & ~evidence[row] & (aligned[row] == tgt_local[ti]) & (aligned[row] >= 0)


# ---------------------------------------------------------------------------- solving
def solve_sparse(rows: np.ndarray, cols: np.ndarray, weight: np.ndarray, n_rows: int, n_cols: int,
                 kind: str) -> np.ndarray:
    """The chosen edges (indices into ``rows``/``cols``/``weight``) of a sparse assignment.

    Edges of weight <= 0 are never chosen. ``kind="optimal"``: the maximum total weight, by
    ``min_weight_full_bipartite_matching`` on the candidates with one "left out" node per
    vertex (so a full matching always exists and leaving a vertex out costs nothing);
    ``kind="greedy"``: highest weight first, ties by (row, column), as rounds of mutually best
    edges (what :func:`weight_mapper.assign.solve_greedy` does on a dense matrix).

    >>> solve_sparse(np.array([0, 0, 1]), np.array([0, 1, 0]), np.array([.9, .8, .8]), 2, 2, "optimal").tolist()
    [1, 2]
    >>> solve_sparse(np.array([0, 0, 1]), np.array([0, 1, 0]), np.array([.9, .8, .8]), 2, 2, "greedy").tolist()
    [0]
    """
    keep = np.flatnonzero(weight > 0)
    if not len(keep):
        return keep
    if kind == "greedy":
        return _greedy(rows[keep], cols[keep], weight[keep], n_rows, n_cols, keep)
    return _optimal(rows[keep], cols[keep], weight[keep], n_rows, n_cols, keep)


def _optimal(rows, cols, w, n_rows, n_cols, ids) -> np.ndarray:
    # Costs (all positive): a real edge 1.5 - w, leaving a vertex out 1, a pair of "left out"
    # nodes 0.5. A matching of m real edges then costs const - sum(w): minimum cost = maximum
    # weight, and a real edge (w > 0) always beats leaving both its ends out.
    # Rows: sources, then one "left out" node per target; columns: targets, then one per source.
    m = len(rows)
    r = np.concatenate([rows, np.arange(n_rows), n_rows + np.arange(n_cols), n_rows + cols])
    c = np.concatenate([cols, n_cols + np.arange(n_rows), np.arange(n_cols), n_cols + rows])
    cost = np.concatenate([1.5 - w, np.ones(n_rows + n_cols), np.full(m, 0.5)])
    size = n_rows + n_cols
    graph = sparse.csr_matrix((cost, (r, c)), shape=(size, size))
    mr, mc = min_weight_full_bipartite_matching(graph)
    real = (mr < n_rows) & (mc < n_cols)
    code = mr[real].astype(np.int64) * n_cols + mc[real]
    edge_code = rows.astype(np.int64) * n_cols + cols
    order = np.argsort(edge_code, kind="stable")
    hit = order[np.searchsorted(edge_code[order], code)]
    return np.sort(ids[hit])


def _greedy(rows, cols, w, n_rows, n_cols, ids) -> np.ndarray:
    alive = np.arange(len(rows))
    chosen = []
    while len(alive):
        r, c, v = rows[alive], cols[alive], w[alive]
        here = np.arange(len(alive))
        mutual = here[(_first_best(r, c, v, n_rows)[r] == here) & (_first_best(c, r, v, n_cols)[c] == here)]
        chosen.append(alive[mutual])
        row_done = np.zeros(n_rows, bool)
        col_done = np.zeros(n_cols, bool)
        row_done[r[mutual]] = True
        col_done[c[mutual]] = True
        alive = alive[~(row_done[r] | col_done[c])]
    return np.sort(ids[np.concatenate(chosen)]) if chosen else np.zeros(0, np.int64)


def _first_best(keys: np.ndarray, other: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Per key, the position of its highest value, ties to the lowest ``other`` (-1: none)."""
    out = np.full(n, -1, dtype=np.int64)
    order = np.lexsort((other, -values, keys))
    k = keys[order]
    first = np.ones(len(k), dtype=bool)
    first[1:] = k[1:] != k[:-1]
    out[k[first]] = order[first]
    return out


def sparse_margins(rows: np.ndarray, cols: np.ndarray, margin_weight: np.ndarray, chosen: np.ndarray,
                   n_rows: int, n_cols: int) -> np.ndarray:
    """Each chosen edge's margin over the best other edge of its row or column (as
    :func:`weight_mapper.assign.pair_margins`; missing pairs weigh 0)."""
    w = np.where(margin_weight > 0, margin_weight, 0.0)
    other = np.ones(len(rows), dtype=bool)
    other[chosen] = False
    row_alt = np.zeros(n_rows)
    col_alt = np.zeros(n_cols)
    np.maximum.at(row_alt, rows[other], w[other])
    np.maximum.at(col_alt, cols[other], w[other])
    runner_up = np.maximum(row_alt[rows[chosen]], col_alt[cols[chosen]])
    return w[chosen] - runner_up


class SparseBlock:
    """A blocked bucket's per-edge values read like its dense matrix: ``block[i]`` is row ``i``
    (missing pairs 0 / False), ``block[i, j]`` one value."""

    def __init__(self, values: np.ndarray, rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]):
        self.values, self.rows, self.cols, self.shape = values, rows, cols, shape
        self._starts = np.searchsorted(rows, np.arange(shape[0] + 1))  # edges are sorted row-major

    def __getitem__(self, key):
        if isinstance(key, tuple):
            i, j = key
            lo, hi = self._starts[i], self._starts[i + 1]
            hit = np.flatnonzero(self.cols[lo:hi] == j)
            return self.values[lo + hit[0]] if len(hit) else self.values.dtype.type(0)
        lo, hi = self._starts[key], self._starts[key + 1]
        out = np.zeros(self.shape[1], dtype=self.values.dtype)
        out[self.cols[lo:hi]] = self.values[lo:hi]
        return out
