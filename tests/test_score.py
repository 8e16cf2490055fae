import numpy as np
import pytest

from weight_mapper.score import (
    Items,
    all_pairs,
    context_score,
    edit_score,
    forbidden,
    index_score,
    order_score,
    rank_within,
    score_edges,
    score_matrices,
    shape_score,
    token_score,
    validate_weights,
    with_context,
)
from weight_mapper.table import TensorTable
from weight_mapper.tree import ModuleTree


def items(shapes: dict) -> Items:
    table = TensorTable.from_state_dict(shapes)
    return Items.of_tensors(table, ModuleTree(table), np.arange(len(table))).with_ranks(np.zeros(len(table), int))


def matrix(scorer, src, tgt, **kwargs):
    si, ti = all_pairs(len(src), len(tgt))
    return scorer(src, tgt, si, ti, **kwargs).reshape(len(src), len(tgt))


def test_shape_score_exact_transposed_near_and_incompatible():
    src = items({"a": (3, 5), "b": (5, 3), "c": (2, 2, 1), "d": (10,)})
    tgt = items({"x": (3, 5), "y": (11,)})
    s = matrix(shape_score, src, tgt)
    assert s[:, 0].tolist() == [1.0, 0.7, 0.0, 0.0]
    assert s[3, 1] == 0.0
    assert matrix(shape_score, src, tgt, tolerance=0.15)[3, 1] == 0.5


def test_name_scorers_agree_with_a_direct_computation():
    src = items({"backbone.layer1.conv.weight": (1,), "head.fc.weight": (1,)})
    tgt = items({"encoder.layer1.conv.weight": (1,), "head.linear.weight": (1,)})
    tokens = matrix(token_score, src, tgt)
    # {backbone, layer, conv, weight} vs {encoder, layer, conv, weight}: 3 shared of 5
    assert tokens[0, 0] == pytest.approx(3 / 5)
    # fc and linear are synonyms
    assert tokens[1, 1] == 1.0
    from rapidfuzz.distance import Levenshtein

    edit = matrix(edit_score, src, tgt)
    assert edit[0, 1] == pytest.approx(Levenshtein.normalized_similarity(src.skeletons[0], tgt.skeletons[1]))


def test_index_score_reads_numbers_as_positions():
    src = items({"layers.3.q.weight": (1,), "layers.13.q.weight": (1,), "norm.weight": (1,)})
    tgt = items({"blocks.3.q.weight": (1,), "final.weight": (1,)})
    s = matrix(index_score, src, tgt)
    assert s[0, 0] == 1.0 and s[1, 0] == 0.0
    assert s[2, 1] == 1.0  # no numbers on either side


def test_order_score_prefers_the_same_relative_place():
    src = items({"a": (1,), "b": (1,), "c": (1,)})
    tgt = items({"x": (1,), "y": (1,), "z": (1,)})
    s = matrix(order_score, src, tgt)
    assert (s.argmax(1) == np.arange(3)).all()


def test_rank_within_buckets():
    assert rank_within(np.array([1, 0, 1, 1]), np.array([3.0, 9.0, 1.0, 2.0])).tolist() == [1.0, 0.5, 0.0, 0.5]


def test_context_scores_consistent_parents():
    src = items({"enc.a.weight": (1,), "dec.a.weight": (1,)})
    tgt = items({"encoder.a.weight": (1,), "decoder.a.weight": (1,)})
    s_tree = ModuleTree(TensorTable.from_state_dict({"enc.a.weight": (1,), "dec.a.weight": (1,)}))
    t_tree = ModuleTree(TensorTable.from_state_dict({"encoder.a.weight": (1,), "decoder.a.weight": (1,)}))
    src2tgt = np.full(len(s_tree), -1)
    src2tgt[s_tree.path2id["enc.a"]] = t_tree.path2id["encoder.a"]
    ctx = matrix(context_score, src, tgt, src2tgt_module=src2tgt)
    assert ctx[0, 0] > ctx[0, 1]
    assert ctx[1, 0] == ctx[1, 1]  # dec.a not mapped yet: neutral
    assert (matrix(context_score, src, tgt, src2tgt_module=None) == 0.5).all()


def test_context_only_adds_evidence():
    base = np.array([0.7, 0.7])
    assert with_context(base, np.array([0.0, 1.0])).tolist() == pytest.approx([0.7, 0.76])


def test_forbidden_is_symmetric():
    src = items({"encoder.w": (1,), "decoder.w": (1,)})
    tgt = items({"encoder.w": (1,), "decoder.w": (1,)})
    mask = matrix(forbidden, src, tgt, incompatible_pairs=[("encoder", "decoder")])
    assert mask.tolist() == [[False, True], [True, False]]
    assert not matrix(forbidden, src, tgt, incompatible_pairs=None).any()


def test_score_matrices_combine_components_with_the_weights():
    src = items({"a.weight": (2, 3), "a.bias": (2,)})
    tgt = items({"b.weight": (2, 3)})
    w = validate_weights(None)
    out = score_matrices(src, tgt, weights=w)
    expected = 0.5 * out["shape"] + 0.3 * out["name"] + 0.2 * out["hierarchy"]
    assert np.allclose(out["base"], expected)
    assert out["base"].shape == (2, 1)
    # NaN: a sub-score the pair does not have (the ordinal of candidates outside an ordinal series)
    assert all(np.all(np.isnan(v) | ((0 <= v) & (v <= 1))) for v in out.values())


def test_edges_score_only_the_pairs_asked_for():
    src = items({"a.weight": (2, 3), "b.weight": (2, 3), "c.weight": (2, 3)})
    dense = score_matrices(src, src, weights=validate_weights(None))
    si, ti = np.array([2, 0]), np.array([1, 0])
    sparse_ = score_edges(src, src, si, ti, weights=validate_weights(None))
    assert np.allclose(sparse_["name"], dense["name"][si, ti])


def test_validate_weights_defaults_and_scaling():
    assert validate_weights(None) == {"shape": 0.5, "name": 0.3, "hierarchy": 0.2}
    assert validate_weights({"name": 2.0}) == {"shape": 0.0, "name": 1.0, "hierarchy": 0.0}


def test_index_score_aligns_positions_after_an_inserted_level():
    # SSDlite keeps a MobileNetV3's ``features.N`` under ``features.0``: the positions shift by one
    src = items({"features.2.block.1.1.weight": (1,), "features.2.block.3.1.weight": (1,)})
    tgt = items({"backbone.features.0.2.block.1.1.weight": (1,), "backbone.features.0.2.block.3.1.weight": (1,)})
    s = matrix(index_score, src, tgt)
    assert s[0, 0] == s[1, 1] == 0.75 and s[0, 1] == s[1, 0] == 0.5
