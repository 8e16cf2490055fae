"""Blocked candidates, order alignment and the sparse assignment of large buckets (issue 16)."""

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from weight_mapper import WeightMapper, candidates
from weight_mapper.assign import pair_margins, solve_greedy, solve_optimal
from weight_mapper.candidates import order_alignment, solve_sparse, sparse_margins

weights = arrays(np.float64, st.tuples(st.integers(1, 7), st.integers(1, 7)),
                 elements=st.sampled_from([0.0, 0.2, 0.5, 0.7, 0.9, 1.0, 0.31, 0.77]))


def dense_edges(w):
    rows, cols = np.nonzero(np.ones_like(w, dtype=bool))
    return rows, cols, w[rows, cols]


@settings(max_examples=200, deadline=None)
@given(weights)
def test_sparse_optimal_reaches_the_dense_optimum(w):
    rows, cols, v = dense_edges(w)
    picked = solve_sparse(rows, cols, v, *w.shape, "optimal")
    r, c = solve_optimal(w)
    assert v[picked].sum() == pytest.approx(w[r, c].sum())
    assert len(set(rows[picked].tolist())) == len(picked) and len(set(cols[picked].tolist())) == len(picked)
    assert (v[picked] > 0).all()


@settings(max_examples=200, deadline=None)
@given(weights)
def test_sparse_greedy_is_the_dense_greedy(w):
    rows, cols, v = dense_edges(w)
    picked = solve_sparse(rows, cols, v, *w.shape, "greedy")
    r, c = solve_greedy(w)
    assert sorted(zip(rows[picked].tolist(), cols[picked].tolist())) == sorted(zip(r.tolist(), c.tolist()))


@settings(max_examples=100, deadline=None)
@given(weights)
def test_sparse_margins_are_the_dense_margins(w):
    rows, cols, v = dense_edges(w)
    picked = solve_sparse(rows, cols, v, *w.shape, "optimal")
    margin = sparse_margins(rows, cols, v, picked, *w.shape)
    dense, _ = pair_margins(w, rows[picked], cols[picked])
    np.testing.assert_allclose(margin, dense)


def test_sparse_solvers_only_use_the_candidate_edges():
    # A 3 x 3 problem whose best dense assignment uses the missing pair (0, 2).
    rows, cols = np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 1, 2, 0, 2])
    w = np.array([0.5, 0.4, 0.5, 0.1, 0.2, 0.5])
    for kind in ("optimal", "greedy"):
        picked = solve_sparse(rows, cols, w, 3, 3, kind)
        assert sorted(zip(rows[picked].tolist(), cols[picked].tolist())) == [(0, 0), (1, 1), (2, 2)]


@given(st.integers(0, 40), st.integers(0, 40))
def test_order_alignment_is_monotone_and_one_to_one(n_src, n_tgt):
    a, b = order_alignment(n_src, n_tgt)
    assert len(a) == len(b) == min(n_src, n_tgt)
    assert (np.diff(a) > 0).all() and (np.diff(b) > 0).all()
    assert a.min(initial=0) >= 0 and b.min(initial=0) >= 0
    assert (a < n_src).all() and (b < n_tgt).all()
    if n_src == n_tgt:
        assert a.tolist() == b.tolist() == list(range(n_src))


def anonymous(n_blocks, dim=8, target_order="qkvo"):
    """Hashed source blocks ``a..d`` -> ``layers.N.q/k/v/o`` (the scale family at small size)."""
    src, tgt, truth = {}, {}, {}
    for i in range(n_blocks):
        h = hashlib.sha1(f"block {i}".encode()).hexdigest()[:8]
        for a, z in zip("abcd", "qkvo"):
            for leaf, shape in (("weight", (dim, dim)), ("bias", (dim,))):
                src[f"net.blk_{h}.{a}.{leaf}"] = shape
                truth[f"net.blk_{h}.{a}.{leaf}"] = f"model.layers.{i}.{z}.{leaf}"
        for z in target_order:
            for leaf, shape in (("weight", (dim, dim)), ("bias", (dim,))):
                tgt[f"model.layers.{i}.{z}.{leaf}"] = shape
    return src, tgt, truth


def right(plan, truth):
    return sum(truth.get(e.source[0]) == e.target for e in plan.entries)


@pytest.fixture
def small_threshold(monkeypatch):
    monkeypatch.setattr(candidates, "SPARSE_MIN_PAIRS", 1_000)


@pytest.mark.parametrize("strategy", ["best_match", "greedy"])
def test_names_that_say_nothing_leave_it_to_order_and_say_so(small_threshold, strategy):
    src, tgt, truth = anonymous(60)  # 240 modules on each side in one bucket: 57,600 pairs
    mapper = WeightMapper(src, tgt)
    mapper.suggest_mapping(strategy=strategy)
    plan = mapper.get_plan()
    zipped = sum(truth[s] == t for s, t in zip(src, tgt))
    assert zipped == len(truth)
    assert right(plan, truth) >= zipped  # at least as right as the zip
    assert all("order_only" in e.flags for e in plan.entries)
    n_src, n_tgt = mapper._assignment.largest_bucket
    assert n_src * n_tgt > candidates.SPARSE_MIN_PAIRS  # it went through the blocked path
    level = mapper._assignment.levels["group"].level
    assert len(level.si) < n_src * n_tgt / 4  # and scored a fraction of the pairs


def test_blocked_candidates_stay_few_and_keep_identical_names(small_threshold):
    src, tgt, _ = anonymous(60)
    # One source module under the target's own name, far from its place in order.
    src = {("model.layers.55.q." + k.rsplit(".", 1)[1]) if k.startswith(next(iter(src))[:17]) and ".a." in k else k: v
           for k, v in src.items()}
    mapper = WeightMapper(src, tgt)
    mapping = mapper.suggest_mapping(strategy="best_match")
    assert mapping["model.layers.55.q.weight"] == "model.layers.55.q.weight"
    level = mapper._assignment.levels["group"].level
    per_source = np.bincount(level.si)
    bound = 2 * candidates.WINDOW * (candidates.NAME_CLASSES + 1) + 2
    assert per_source.max() <= bound


def test_explain_reads_a_blocked_bucket(small_threshold):
    src, tgt, _ = anonymous(60)
    mapper = WeightMapper(src, tgt)
    mapper.suggest_mapping(strategy="best_match")
    name = next(iter(src))
    why = mapper.explain(name)
    assert why["target_label"] == "model.layers.0.q"
    assert why["alternatives"] and all(a["label"].startswith("model.layers.") for a in why["alternatives"])


def test_unbalanced_blocked_bucket(small_threshold):
    src, tgt, _ = anonymous(60)
    tgt = dict(list(tgt.items())[:-16])  # two layers fewer on the target side
    mapping = WeightMapper(src, tgt).suggest_mapping(strategy="best_match")
    targets = list(mapping.values())
    assert len(targets) == len(set(targets)) == len(tgt)
