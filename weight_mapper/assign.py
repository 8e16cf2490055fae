"""Stage 4: the one-to-one assignment of source tensors to target tensors.

Module groups are bucketed by signature and each bucket is solved on its own score matrix;
tensors of groups left over fall back to per-tensor buckets keyed by shape. Within a bucket
the solver is ``scipy.optimize.linear_sum_assignment`` (strategy ``best_match``, optimal) or
the highest-score-first greedy of the reference design (strategy ``greedy``). The hierarchy
context (do the parents already map onto each other?) is recomputed from the assignment and
the buckets re-solved until the assignment stops changing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from weight_mapper.score import (
    Items,
    context_score,
    forbidden_mask,
    score_matrices,
    with_context,
)
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
AMBIGUITY_MARGIN = 0.02  # a match whose runner-up is closer than this is ambiguous
MAX_ROUNDS = 10  # bound on hierarchy-context rounds
_TIE_EPS = 1e-7  # breaks exact ties by relative order, never outweighs a real difference
COMPONENTS = ("shape", "name", "hierarchy", "context")


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
@dataclass(eq=False)
class _Bucket:
    """One independent assignment problem: candidates of both sides and their base scores."""

    key: str
    src: np.ndarray  # positions in the level's source Items
    tgt: np.ndarray
    scores: dict[str, np.ndarray]
    allowed: np.ndarray
    tie: np.ndarray


def _make_bucket(key, src_items, tgt_items, src_idx, tgt_idx, *, weights, tolerance, incompatible_pairs) -> _Bucket:
    s, t = src_items.take(src_idx), tgt_items.take(tgt_idx)
    scores = score_matrices(s, t, weights=weights, tolerance=tolerance)
    allowed = (scores["shape"] > 0) & ~forbidden_mask(s, t, incompatible_pairs)
    # Exact ties go to the pair closest in relative row order (deterministic either way).
    tie = _TIE_EPS * (1.0 - np.abs(_rank(s.order)[:, None] - _rank(t.order)[None, :]))
    return _Bucket(key, np.asarray(src_idx), np.asarray(tgt_idx), scores, allowed, tie)


def _rank(order: np.ndarray) -> np.ndarray:
    ranks = np.empty(len(order))
    ranks[np.argsort(order, kind="stable")] = np.arange(len(order))
    return ranks / max(len(order) - 1, 1)


def _buckets_by_key(src_keys: Sequence[str], tgt_keys: Sequence[str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Positions of each key present on both sides, keys in first-seen source order."""
    src_pos: dict[str, list[int]] = {}
    for i, k in enumerate(src_keys):
        src_pos.setdefault(k, []).append(i)
    tgt_pos: dict[str, list[int]] = {}
    for j, k in enumerate(tgt_keys):
        tgt_pos.setdefault(k, []).append(j)
    return [
        (k, np.asarray(rows, dtype=np.int64), np.asarray(tgt_pos[k], dtype=np.int64))
        for k, rows in src_pos.items()
        if k in tgt_pos
    ]


def _tensor_bucket_key(shape: tuple[int, ...], tolerance: float) -> str:
    """Shapes that can possibly match share a key: equal, or 2-D transposed, or near."""
    if tolerance > 0:
        return f"ndim{len(shape)}"
    if len(shape) == 2:
        return "x".join(map(str, sorted(shape))) + "/2d"
    return "x".join(map(str, shape)) + f"/{len(shape)}d"


# ---------------------------------------------------------------------------- rounds
@dataclass(frozen=True, eq=False)
class LevelDetail:
    """What one level solved, kept to explain a match: candidates, buckets, final totals.

    ``totals[k]`` and ``contexts[k]`` are bucket ``k``'s final score and context matrices;
    ``src``/``tgt`` the matched candidate positions.
    """

    src_items: Items
    tgt_items: Items
    buckets: tuple[_Bucket, ...]
    totals: tuple[np.ndarray, ...]
    contexts: tuple[np.ndarray | None, ...]
    src: np.ndarray
    tgt: np.ndarray

    def locate(self, item: int) -> tuple[int, int] | None:
        """``(bucket, row)`` of source candidate ``item``, or None if it was in no bucket."""
        for k, b in enumerate(self.buckets):
            hit = np.flatnonzero(b.src == item)
            if len(hit):
                return k, int(hit[0])
        return None


@dataclass(frozen=True, eq=False)
class _LevelResult:
    src: np.ndarray  # positions in the level's source Items
    tgt: np.ndarray
    score: np.ndarray
    margin: np.ndarray
    runner_up: np.ndarray
    components: dict[str, np.ndarray]
    bucket_sizes: list[tuple[int, int]]
    rounds: int
    converged: bool
    detail: LevelDetail


def _module_map(
    src_items: Items, tgt_items: Items, src: np.ndarray, tgt: np.ndarray, n_src_modules: int,
    prior: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Majority vote of matched candidates for mapping their modules and ancestors.

    Returns ``(src2tgt_module, votes)``; ``votes`` can seed the next level's map.
    """
    vs = src_items.chain[src].ravel()
    vt = tgt_items.chain[tgt].ravel()
    if prior is not None:
        vs = np.concatenate([prior[0], vs])
        vt = np.concatenate([prior[1], vt])
    src2tgt = np.full(n_src_modules, _UNMATCHED, dtype=np.int64)
    if len(vs):
        pairs, counts = np.unique(np.stack([vs, vt], 1), axis=0, return_counts=True)
        order = np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))
        pairs = pairs[order]
        first = np.ones(len(pairs), dtype=bool)
        first[1:] = pairs[1:, 0] != pairs[:-1, 0]
        src2tgt[pairs[first, 0]] = pairs[first, 1]
    return src2tgt, (vs, vt)


def _solve_level(
    buckets: list[_Bucket], src_items: Items, tgt_items: Items, *, solver: str, threshold: float,
    use_context: bool, max_rounds: int, n_src_modules: int, prior_votes=None,
) -> tuple[_LevelResult, tuple[np.ndarray, np.ndarray]]:
    solve = SOLVERS[solver]
    module_map = None
    if use_context and prior_votes is not None and len(prior_votes[0]):
        module_map, _ = _module_map(src_items, tgt_items, np.zeros(0, int), np.zeros(0, int), n_src_modules, prior_votes)
    previous = None
    rounds, converged = 0, not use_context
    for rounds in range(1, (max_rounds if use_context else 1) + 1):
        parts = []
        for b in buckets:
            s, t = src_items.take(b.src), tgt_items.take(b.tgt)
            base = b.scores["base"]
            if use_context and module_map is not None:
                ctx = context_score(s, t, module_map)
                total = with_context(base, ctx)
            else:
                ctx = None
                total = base
            weight = np.where(b.allowed & (total >= threshold), total + b.tie + _TIE_EPS, 0.0)
            rows, cols = solve(weight)
            # Margins count every admissible alternative, also one just under the threshold.
            margin, runner = pair_margins(np.where(b.allowed, total + _TIE_EPS, 0.0), rows, cols)
            parts.append((b, rows, cols, total, ctx, margin, runner))
        src = np.concatenate([b.src[r] for b, r, *_ in parts]) if parts else np.zeros(0, np.int64)
        tgt = np.concatenate([b.tgt[c] for b, _, c, *_ in parts]) if parts else np.zeros(0, np.int64)
        key = (src.tobytes(), tgt.tobytes())
        module_map, votes = _module_map(src_items, tgt_items, src, tgt, n_src_modules, prior_votes)
        if previous == key:
            converged = True
            break
        previous = key
    components = {c: [] for c in COMPONENTS}
    scores, margins, runners = [], [], []
    for b, r, c, total, ctx, margin, runner in parts:
        scores.append(total[r, c])
        margins.append(margin)
        runners.append(runner)
        for comp in ("shape", "name", "hierarchy"):
            components[comp].append(b.scores[comp][r, c])
        components["context"].append(ctx[r, c] if ctx is not None else np.full(len(r), np.nan))
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)  # noqa: E731
    detail = LevelDetail(src_items, tgt_items, tuple(buckets), tuple(p[3] for p in parts), tuple(p[4] for p in parts),
                         src, tgt)
    result = _LevelResult(
        src=src, tgt=tgt, score=cat(scores), margin=cat(margins), runner_up=cat(runners),
        components={k: cat(v) for k, v in components.items()},
        bucket_sizes=[(len(b.src), len(b.tgt)) for b in buckets], rounds=rounds, converged=converged,
        detail=detail,
    )
    return result, votes


# ---------------------------------------------------------------------------- the stage
@dataclass(frozen=True, eq=False)
class Assignment:
    """Matched tensor rows of both tables, with how and how surely they were matched.

    Attributes:
        src, tgt: Tensor rows (canonical tensors only; aliases are the plan's business).
        score: Final combined score of each pair.
        margin: Score minus the best alternative's score in the same bucket row or column.
        level: ``"group"`` (matched with its whole module) or ``"tensor"`` (fallback).
        components: ``shape``, ``name``, ``hierarchy``, ``context`` score of each pair.
        rounds: Hierarchy-context rounds run at the group level and the tensor level.
        converged: Whether both levels stopped because the assignment stopped changing.
        largest_bucket: Size ``(n_src, n_tgt)`` of the largest assignment problem solved.
        levels: ``{"group": LevelDetail, "tensor": LevelDetail}`` for explanations.
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


def assign(
    src_table: TensorTable,
    tgt_table: TensorTable,
    *,
    weights: Mapping[str, float],
    threshold: float,
    solver: str = "optimal",
    use_context: bool = True,
    tolerance: float = 0.0,
    incompatible_pairs: Sequence[tuple[str, str]] = (),
    max_rounds: int = MAX_ROUNDS,
) -> Assignment:
    """Match the canonical tensors of two tables: module groups first, then leftovers.

    Args:
        src_table, tgt_table: The two sides.
        weights: Validated component weights.
        threshold: Pairs scoring below it are never assigned.
        solver: ``"optimal"`` or ``"greedy"``.
        use_context: Re-solve with the hierarchy context until the assignment is stable.
        tolerance: ``shape_tolerance``.
        incompatible_pairs: Validated ``incompatible_pairs`` rules.
        max_rounds: Bound on the context rounds per level.

    >>> from torch import nn
    >>> t = TensorTable.from_module(nn.Linear(2, 3))
    >>> a = assign(t, t, weights={"shape": .5, "name": .3, "hierarchy": .2}, threshold=.6)
    >>> sorted(zip(a.src.tolist(), a.tgt.tolist()))
    [(0, 0), (1, 1)]
    """
    src_tree, tgt_tree = ModuleTree(src_table), ModuleTree(tgt_table)
    src_groups = GroupTable.from_table(src_table, src_tree)
    tgt_groups = GroupTable.from_table(tgt_table, tgt_tree)
    g_src, g_tgt = Items.of_groups(src_table, src_tree, src_groups), Items.of_groups(tgt_table, tgt_tree, tgt_groups)
    options = dict(weights=weights, tolerance=tolerance, incompatible_pairs=incompatible_pairs)
    group_buckets = [
        _make_bucket(k, g_src, g_tgt, s, t, **options)
        for k, s, t in _buckets_by_key(src_groups.signatures, tgt_groups.signatures)
    ]
    level_options = dict(solver=solver, threshold=threshold, use_context=use_context, max_rounds=max_rounds,
                         n_src_modules=len(src_tree))
    groups, votes = _solve_level(group_buckets, g_src, g_tgt, **level_options)

    # Expand matched groups into member tensor pairs: equal signatures align sorted members.
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

    # Fallback: tensors of unmatched groups, bucketed by compatible shape.
    left_src = np.setdiff1d(np.flatnonzero(src_table.is_canonical), g_src_rows)
    left_tgt = np.setdiff1d(np.flatnonzero(tgt_table.is_canonical), g_tgt_rows)
    t_src, t_tgt = Items.of_tensors(src_table, src_tree, left_src), Items.of_tensors(tgt_table, tgt_tree, left_tgt)
    tensor_buckets = [
        _make_bucket(k, t_src, t_tgt, s, t, **options)
        for k, s, t in _buckets_by_key(
            [_tensor_bucket_key(src_table.shapes[r], tolerance) for r in left_src],
            [_tensor_bucket_key(tgt_table.shapes[r], tolerance) for r in left_tgt],
        )
    ]
    tensors, _ = _solve_level(tensor_buckets, t_src, t_tgt, prior_votes=votes, **level_options)

    n_group, n_tensor = len(g_src_rows), len(tensors.src)
    sizes = groups.bucket_sizes + tensors.bucket_sizes
    return Assignment(
        src=np.concatenate([g_src_rows, t_src.rows[tensors.src]]).astype(np.int64),
        tgt=np.concatenate([g_tgt_rows, t_tgt.rows[tensors.tgt]]).astype(np.int64),
        score=np.concatenate([groups.score[expand_idx], tensors.score]),
        margin=np.concatenate([groups.margin[expand_idx], tensors.margin]),
        level=np.array(["group"] * n_group + ["tensor"] * n_tensor, dtype=object),
        components={
            c: np.concatenate([groups.components[c][expand_idx], tensors.components[c]]) for c in COMPONENTS
        },
        rounds=(groups.rounds, tensors.rounds),
        converged=groups.converged and tensors.converged,
        largest_bucket=max(sizes, key=lambda s: s[0] * s[1], default=(0, 0)),
        levels={"group": groups.detail, "tensor": tensors.detail},
    )


def _sorted_members(table: TensorTable, rows: np.ndarray) -> np.ndarray:
    """Members ordered by (leaf, shape), the order their signature lists them in."""
    keys = [f"{table.leaves[r]}:{'x'.join(map(str, table.shapes[r]))}" for r in rows]
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
    from weight_mapper.errors import MappingError

    if name not in src_table.name2row:
        raise MappingError(f"{name!r} is not a source tensor; source tensors are e.g. {list(src_table.names[:3])}")
    row = int(src_table.name2row[name])
    if not src_table.is_canonical[row]:
        row = int(src_table.alias_of[row])
    candidates = (
        ("group", src_table.modules[row]),
        ("tensor", src_table.names[row]),
    )
    for level, label in candidates:
        detail: LevelDetail | None = assignment.levels.get(level)
        if detail is None:
            continue
        positions = [i for i, lab in enumerate(detail.src_items.labels) if lab == label]
        if level == "tensor":
            positions = [i for i in positions if detail.src_items.rows[i] == row]
        if not positions:
            continue
        where = detail.locate(positions[0])
        if where is None:
            continue
        k, i = where
        bucket, total, ctx = detail.buckets[k], detail.totals[k], detail.contexts[k]
        matched = np.flatnonzero(detail.src == bucket.src[i])
        chosen = None
        if len(matched):
            chosen = int(np.flatnonzero(bucket.tgt == detail.tgt[matched[0]])[0])

        def parts(j: int) -> dict:
            comps = {c: float(bucket.scores[c][i, j]) for c in ("shape", "name", "hierarchy")}
            comps["context"] = float(ctx[i, j]) if ctx is not None else None
            return comps

        sub = {} if chosen is None else {
            k2: float(v[i, chosen]) for k2, v in bucket.scores.items()
            if k2 not in ("shape", "name", "hierarchy", "base")
        }
        order = np.argsort(-np.where(bucket.allowed[i], total[i], -np.inf), kind="stable")
        alternatives = [
            {"label": detail.tgt_items.labels[bucket.tgt[j]], "score": float(total[i, j]), "components": parts(int(j))}
            for j in order
            if j != chosen and bucket.allowed[i, j]
        ][:top_k]
        return {
            "source": name,
            "level": level,
            "candidate": label,
            "target_label": None if chosen is None else detail.tgt_items.labels[bucket.tgt[chosen]],
            "score": None if chosen is None else float(total[i, chosen]),
            "components": None if chosen is None else parts(chosen),
            "sub_scores": sub,
            "alternatives": alternatives,
        }
    return {"source": name, "level": None, "candidate": None, "target_label": None, "score": None,
            "components": None, "sub_scores": {}, "alternatives": []}
