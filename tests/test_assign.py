import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fixture_models import NewModel, OldModel
from weight_mapper.assign import assign, pair_margins, solve_greedy, solve_optimal
from weight_mapper.score import validate_weights
from weight_mapper.table import TensorTable


def test_optimal_beats_greedy_on_the_classic_trap():
    w = np.array([[0.9, 0.8], [0.8, 0.1]])
    r, c = solve_optimal(w)
    assert w[r, c].sum() == pytest.approx(1.6)
    r, c = solve_greedy(w)
    assert w[r, c].sum() == pytest.approx(1.0)


def test_zero_weights_are_never_paired():
    w = np.array([[0.0, 0.5], [0.0, 0.0]])
    for solve in (solve_optimal, solve_greedy):
        r, c = solve(w)
        assert r.tolist() == [0] and c.tolist() == [1]
    assert solve_optimal(np.zeros((0, 3)))[0].size == 0


def sequential_greedy(w):
    """Independent reference: take the best remaining pair, ties by (row, col)."""
    w = w.copy()
    pairs = []
    while w.size and w.max() > 0:
        i, j = np.unravel_index(np.argmax(w), w.shape)
        pairs.append((int(i), int(j)))
        w[i, :] = 0
        w[:, j] = 0
    return sorted(pairs)


weights = arrays(np.float64, st.tuples(st.integers(0, 7), st.integers(0, 7)), elements=st.sampled_from([0.0, 0.2, 0.5, 0.7, 0.9, 1.0]))


@settings(max_examples=200, deadline=None)
@given(weights)
def test_vectorised_greedy_equals_sequential_greedy(w):
    r, c = solve_greedy(w)
    assert sorted(zip(r.tolist(), c.tolist())) == sequential_greedy(w)


@settings(max_examples=200, deadline=None)
@given(weights)
def test_optimal_total_is_never_below_greedy(w):
    r1, c1 = solve_optimal(w)
    r2, c2 = solve_greedy(w)
    assert w[r1, c1].sum() >= w[r2, c2].sum() - 1e-9
    for r, c in ((r1, c1), (r2, c2)):
        assert len(set(r.tolist())) == len(r) and len(set(c.tolist())) == len(c)
        assert (w[r, c] > 0).all()


def test_margins():
    w = np.array([[0.9, 0.85], [0.1, 0.2]])
    margin, runner = pair_margins(w, np.array([0, 1]), np.array([0, 1]))
    assert margin == pytest.approx([0.05, 0.2 - 0.85])
    assert runner == pytest.approx([0.85, 0.85])


def test_assign_reports_levels_rounds_and_components():
    a = assign(
        TensorTable.from_module(OldModel()), TensorTable.from_module(NewModel()),
        weights=validate_weights(None), threshold=0.6,
    )
    assert len(a.src) == 8 and set(a.level) == {"group"}
    assert a.converged and a.rounds[0] >= 2
    assert set(a.components) == {"shape", "name", "hierarchy", "context"}
    assert (a.score >= 0.6).all()


def test_buckets_split_along_repeated_blocks_whatever_their_names():
    """``block3.block3-1`` (digit runs 3, 3, 1) and ``s3.b2`` (3, 2) are the same block."""
    shape = (8, 8, 1, 1)
    src = {f"trunk.block{s}.block{s}-{b}.f.{leaf}.0.weight": shape for s in (1, 2) for b in range(3) for leaf in "ac"}
    tgt = {f"s{s}.b{b + 1}.conv{k}.conv.weight": shape for s in (1, 2) for b in range(3) for k in (1, 3)}
    a = assign(TensorTable.from_state_dict(src), TensorTable.from_state_dict(tgt),
               weights=validate_weights(None), threshold=0.0)
    assert a.largest_bucket == (2, 2)  # one bucket per block, not one of 12
    s_names, t_names = list(src), list(tgt)
    pairs = {s_names[i]: t_names[j] for i, j in zip(a.src, a.tgt)}
    assert pairs["trunk.block2.block2-1.f.c.0.weight"] == "s2.b2.conv3.conv.weight"
    assert pairs["trunk.block1.block1-2.f.a.0.weight"] == "s1.b3.conv1.conv.weight"


@settings(max_examples=100, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 40), st.just(2), st.just(2)),
              elements=st.sampled_from([0.0, 0.2, 0.5, 0.7, 0.9, 1.0])),
       st.sampled_from([solve_optimal, solve_greedy]))
@example(np.array([[[0.0, 0.2], [0.7, 0.9]]]), solve_optimal)  # 0.2 + 0.7 != 0.9: a tie up to rounding
def test_batched_two_by_two_buckets_solve_exactly_as_one_by_one(w, solve):
    """Buckets of two are solved in one vectorised step; exact ties stay with the solver."""
    from weight_mapper.assign import _solve_pairs_of_two

    margin_weight = w + 0.1
    bucket, row, col, margin, deferred = _solve_pairs_of_two(w, margin_weight, solve)
    for b in set(range(len(w))) - set(deferred.tolist()):
        rows, cols = solve(w[b])
        expected, _ = pair_margins(margin_weight[b], rows, cols) if len(rows) else (np.zeros(0), None)
        mine = bucket == b
        assert row[mine].tolist() == rows.tolist() and col[mine].tolist() == cols.tolist()
        assert np.allclose(margin[mine], expected)


def test_the_wrapper_offset_is_found_once_per_pair_of_tables_and_never_shared():
    from weight_mapper.assign import _table_offset, name_offset

    bare = TensorTable.from_state_dict({"layer1.conv.weight": (2, 2), "layer2.conv.weight": (2, 2), "fc.weight": (1, 2)})
    wrapped = TensorTable.from_state_dict({f"backbone.body.{n}": s for n, s in
                                           (("layer1.conv.weight", (2, 2)), ("layer2.conv.weight", (2, 2)))})
    other = TensorTable.from_state_dict({"layer1.conv.weight": (2, 2), "layer2.conv.weight": (2, 2)})
    assert _table_offset(bare, wrapped) == name_offset(bare.names, wrapped.names) == ("", "backbone.body.")
    assert _table_offset(bare, wrapped) is _table_offset(bare, wrapped)  # found once
    # Another pair, even of equal names, gets its own answer: the cache is keyed by the tables.
    assert _table_offset(bare, other) == ("", "") and _table_offset(wrapped, bare) == ("backbone.body.", "")
    weights = validate_weights(None)
    a = assign(bare, wrapped, weights=weights, threshold=0.5)
    assert a.offset == ("", "backbone.body.")


def test_leaf_ids_of_a_level_equal_across_sides_and_skip_bare_positions():
    from weight_mapper.assign import Level, _buckets_by_key
    from weight_mapper.score import Items
    from weight_mapper.tree import GroupTable, ModuleTree

    src = TensorTable.from_state_dict({"enc.0.q_proj.weight": (2, 2), "enc.0.k_proj.weight": (2, 2), "enc.1.weight": (2, 2)})
    tgt = TensorTable.from_state_dict({"model.0.q_proj.weight": (2, 2), "model.0.k_proj.weight": (2, 2), "x.weight": (2, 2)})
    items = []
    for t in (src, tgt):
        tree = ModuleTree.of(t)
        items.append(Items.of_groups(t, tree, GroupTable.from_table(t, tree)))
    buckets = _buckets_by_key(["a"] * 3, ["a"] * 3)
    level = Level.build(items[0], items[1], buckets, weights=validate_weights(None), tolerance=0.0, incompatible_pairs=())
    s_leaf, t_leaf = level.leaf_ids
    assert level.leaf_ids is level.leaf_ids  # once per level, not per round
    assert s_leaf[0] == t_leaf[0] and s_leaf[1] == t_leaf[1] and s_leaf[0] != s_leaf[1]
    assert s_leaf[2] == -1  # "enc.1": a bare position has no leaf path
    assert t_leaf[2] == -1  # "x": a top-level module has no parent to pin under


@given(st.lists(st.lists(st.integers(0, 12), max_size=3).map(tuple), max_size=40))
@example([(2**70, 1), (3, 1), (2**70,)])
def test_dense_ranks_equal_the_plain_python_ranking(keys):
    from weight_mapper.assign import _dense_ranks, _dense_ranks_exact

    assert _dense_ranks(keys) == _dense_ranks_exact(keys)
    assert _dense_ranks([(2**70, 1), (3, 1), (2**70,)]) == [(1, 0), (0, 0), (0,)]
