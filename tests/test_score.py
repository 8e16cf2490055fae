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


def _reference_shape_score(src: Items, tgt: Items, si, ti, *, tolerance: float = 0.0) -> np.ndarray:
    """The vectorised shape rules as score.py wrote them before the transform registry owned
    them (an independent computation: the registry must give exactly these scores)."""
    def padded(shapes, width):
        out = np.full((len(shapes), width), -1, dtype=np.int64)
        for i, s in enumerate(shapes):
            out[i, :len(s)] = s
        return out

    def squeeze(m):
        keep = (m != 1) & (m >= 0)
        order = np.argsort(~keep, axis=1, kind="stable")
        return np.take_along_axis(np.where(keep, m, -1), order, axis=1)

    width = max(max((len(s) for s in (*src.shapes, *tgt.shapes)), default=0), 2)
    a, b = padded(src.shapes, width)[si], padded(tgt.shapes, width)[ti]
    pairs = {("Conv1D", "Linear"), ("Linear", "Conv1D")} | {
        p for t in ("Linear", "NonDynamicallyQuantizableLinear") for p in (("[in, out]", t), (t, "[in, out]"))}
    types = np.array([(src.module_types[i], tgt.module_types[j]) in pairs if src.module_types and tgt.module_types
                      else False for i, j in zip(si, ti)], dtype=bool)
    flip = types & ((a >= 0).sum(1) == 2)
    a = a.copy()
    a[flip, 0], a[flip, 1] = a[flip, 1], a[flip, 0].copy()
    exact = (a == b).all(-1)
    nd_a, nd_b = (a >= 0).sum(1), (b >= 0).sum(1)
    transposed = (nd_a == 2) & (nd_b == 2) & (a[:, 0] == b[:, 1]) & (a[:, 1] == b[:, 0]) & ~exact
    out = np.where(exact, 1.0, np.where(transposed, 0.7, 0.0))
    out = np.where((out == 0) & (squeeze(a) == squeeze(b)).all(-1), 0.6, out)
    numel_a, numel_b = np.where(a >= 0, a, 1).prod(1), np.where(b >= 0, b, 1).prod(1)
    flat = (out == 0) & (nd_a != nd_b) & (np.minimum(nd_a, nd_b) >= 2) & (a[:, 0] == b[:, 0]) & (numel_a == numel_b)
    out = np.where(flat, 0.55, out)
    if tolerance > 0:
        fa, fb = a.astype(float), b.astype(float)
        rel = np.abs(fa - fb) / np.maximum(np.maximum(fa, fb), 1.0)
        out = np.where((nd_a == nd_b) & (rel <= tolerance).all(-1) & (out == 0), 0.5, out)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_shape_score_asks_the_transform_registry_once_per_distinct_pair_and_agrees_with_the_reference(seed):
    from dataclasses import replace

    rng = np.random.default_rng(seed)
    dims = [1, 2, 3, 4, 6, 8, 12, 24]

    def random_items(n, fixed):  # fixed: one pair per rule, so that every rule is exercised
        shapes = {f"m{i}.w": tuple(int(d) for d in rng.choice(dims, size=rng.integers(0, 5))) for i in range(n)}
        shapes.update({f"f{i}.w": s for i, s in enumerate(fixed)})
        types = tuple(str(rng.choice(["", "Linear", "Conv1D", "[in, out]", "Conv2d"])) if k[0] == "m" else ""
                      for k in shapes)
        return replace(items(shapes), module_types=types) if seed % 3 else items(shapes)

    src = random_items(40, [(16, 72), (8, 1, 1), (3, 5), (4, 4)])
    tgt = random_items(50, [(16, 8, 3, 3), (8,), (5, 3), (4, 4)])
    si, ti = all_pairs(len(src), len(tgt))
    for tolerance in (0.0, 0.3):
        expected = _reference_shape_score(src, tgt, si, ti, tolerance=tolerance)
        assert shape_score(src, tgt, si, ti, tolerance=tolerance).tolist() == expected.tolist()
        assert {0.0, 0.55, 0.6, 0.7, 1.0} <= set(expected.tolist())  # every rule is exercised
    assert 0.5 in expected  # near, at tolerance 0.3
    sub = rng.choice(len(si), size=300)  # a sparse set of edges scores like the dense one
    assert shape_score(src, tgt, si[sub], ti[sub]).tolist() == _reference_shape_score(src, tgt, si[sub], ti[sub]).tolist()
    assert shape_score(src, tgt, si[:0], ti[:0]).shape == (0,)


# ------------------------------------------------------------------------------------ the registry
def test_registry_is_what_score_edges_validate_weights_and_the_views_read():
    from weight_mapper.score import (
        BASE_COMPONENTS,
        DEFAULT_WEIGHTS,
        KEY2COMPONENT,
        REPORTED_COMPONENTS,
        SCORE_COMPONENTS,
        SUB_SCORE_LABELS,
        SUB_SCORES,
        weighted_base,
    )

    assert BASE_COMPONENTS == ("shape", "name", "hierarchy") and REPORTED_COMPONENTS == (*BASE_COMPONENTS, "context")
    assert DEFAULT_WEIGHTS == {c.key: c.weight for c in SCORE_COMPONENTS} == validate_weights(None)
    assert set(SUB_SCORES) == set(SUB_SCORE_LABELS) and len(SUB_SCORES) == len(set(SUB_SCORES))
    assert not set(SUB_SCORES) & {*REPORTED_COMPONENTS, "base"}  # one namespace for every score key
    for c in filter(lambda c: c.parts, SCORE_COMPONENTS):  # share tables: own sub-scores (rescaled when used)
        for table in (c.shares, *(t for _, t in c.shares_when)):
            assert set(table) <= {p.key for p in c.parts} and min(table.values()) > 0
    src = items({"enc.layers.0.q.weight": (4, 4), "enc.layers.0.k.bias": (4,), "head.weight": (4, 4)})
    si, ti = all_pairs(len(src), len(src))
    out = score_edges(src, src, si, ti, weights=validate_weights(None))
    assert list(out) == [k for c in SCORE_COMPONENTS for k in (*(p.key for p in c.parts if p.key in out), c.key)] + ["base"]
    # each component is, per edge, its sub-scores weighed by the shares the views show
    for component in ("name", "hierarchy"):
        spec = KEY2COMPONENT[component]
        for e in range(len(si)):
            present = {k: out[k][e] for k in SUB_SCORES if k in out and not np.isnan(out[k][e])}
            shares = spec.rescaled_shares(present)
            assert shares and sum(w * present[k] for k, w in shares.items()) == pytest.approx(out[component][e])
    assert np.array_equal(out["base"], weighted_base(validate_weights(None), out))


_NEW_COMPONENT = '''    Component("parity", 0.0, "same parity", scorer=lambda src, tgt, si, ti, *, tolerance: (si % 2 == ti % 2) * 1.0),
'''

_USES_NEW_COMPONENT = '''
import io, json, math
import numpy as np
from rich.console import Console
from torch import nn
from weight_mapper import WeightMapper
from weight_mapper.page import review_data
from weight_mapper.views import ScoreBreakdownView

src = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
tgt = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
weights = {"shape": 0.5, "name": 0.2, "hierarchy": 0.1, "parity": 0.2}
mapper = WeightMapper(src, tgt)
mapper.suggest_mapping(weights=weights)
plan = mapper.get_plan()
entry = plan.entries[0]
ex = mapper.explain(entry.source[0])
text = io.StringIO()
Console(file=text, color_system=None, width=120).print(ScoreBreakdownView.from_plan(ex, plan))
data = review_data(plan, explanations={entry.source[0]: ex})
base = sum(plan.weights[c] * entry.components[c] for c in ("parity", "shape", "name", "hierarchy"))
ctx = entry.components["context"]
expected = base if math.isnan(ctx) else 0.8 * base + 0.2 * max(base, ctx)
print(json.dumps({"weights": plan.weights, "components": list(entry.components), "explained": list(ex["components"]),
                  "alternative": list(ex["alternatives"][0]["components"]) if ex["alternatives"] else [],
                  "view": text.getvalue(), "meta": data["meta"]["components"],
                  "row_width": len(data["rows"]["components"]) / len(data["rows"]["src"]),
                  "parity": entry.components["parity"], "score_is_weighted_base": math.isclose(entry.score, expected)}))
'''


def test_a_new_component_is_one_registry_entry(tmp_path):
    """Add one entry to a copy of the package's registry: weights, matching, explanations, the
    breakdown view and the review page all pick it up, no other file edited."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import weight_mapper

    package = tmp_path / "weight_mapper"
    shutil.copytree(Path(weight_mapper.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    score_py = package / "score.py"
    anchor = "SCORE_COMPONENTS: tuple[Component, ...] = (\n"
    assert score_py.read_text().count(anchor) == 1
    score_py.write_text(score_py.read_text().replace(anchor, anchor + _NEW_COMPONENT))
    run = subprocess.run([sys.executable, "-c", _USES_NEW_COMPONENT], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["weights"] == pytest.approx({"parity": 0.2, "shape": 0.5, "name": 0.2, "hierarchy": 0.1})
    assert out["components"] == out["explained"] == ["parity", "shape", "name", "hierarchy", "context"]
    assert out["alternative"] in ([], out["components"])
    assert "same parity" in out["view"] and out["meta"] == out["components"] and out["row_width"] == 5
    assert out["score_is_weighted_base"] and out["parity"] in (0.0, 1.0)
