"""Property tests: renamed random models are recovered; every suggestion is admissible."""

import json
import os
import subprocess
import sys

import torch
import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from weight_mapper import WeightMapper
from weight_mapper.assign import solve_greedy, solve_optimal

WORDS = ["encoder", "decoder", "block", "layer", "conv", "norm", "proj", "attn", "mlp", "head", "embed", "stem"]
NEW_WORDS = ["zeta", "omega", "kappa", "sigma", "delta", "theta", "lamda", "iota", "rho", "tau", "phi", "chi"]
DIMS = [2, 3, 4, 8]


@st.composite
def nested_models(draw, depth=0):
    """A state dict of shapes for a random nested model: {name: shape}."""
    out = {}
    n_children = draw(st.integers(1, 3 if depth else 4))
    sequential = draw(st.booleans())
    used = set()
    for i in range(n_children):
        if sequential:
            name = str(i)
        else:
            name = draw(st.sampled_from([w for w in WORDS if w not in used]))
            used.add(name)
        if depth < 2 and draw(st.booleans()):
            for k, v in draw(nested_models(depth=depth + 1)).items():
                out[f"{name}.{k}"] = v
        else:
            d_out, d_in = draw(st.sampled_from(DIMS)), draw(st.sampled_from(DIMS))
            out[f"{name}.weight"] = (d_out, d_in)
            if draw(st.booleans()):
                out[f"{name}.bias"] = (d_out,)
    return out


@st.composite
def renamed_models(draw):
    model = draw(nested_models())
    perm = draw(st.permutations(NEW_WORDS))
    word2new = dict(zip(WORDS, perm))

    def rename(name):
        parts = name.split(".")
        return ".".join([word2new.get(p, p) for p in parts[:-1]] + parts[-1:])

    return model, {k: rename(k) for k in model}


def as_meta(shapes):
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(renamed_models())
def test_best_match_recovers_a_consistent_renaming(case):
    model, truth = case
    target = {truth[k]: v for k, v in model.items()}
    mapping = WeightMapper(as_meta(model), as_meta(target)).suggest_mapping()
    assert mapping == truth


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nested_models(), nested_models(), st.sampled_from(["best_match", "greedy", "conservative", "shape_only"]),
       st.floats(0.0, 0.9))
def test_suggestions_are_admissible(src, tgt, strategy, threshold):
    mapper = WeightMapper(as_meta(src), as_meta(tgt))
    mapper.suggest_mapping(threshold=threshold, strategy=strategy)
    entries = mapper.get_plan().entries
    targets = [e.target for e in entries]
    # one-to-one, except that the pieces of one split source (level "split") share it
    sources = [s for e in entries if e.level != "split" for s in e.source]
    split_sources = {s for e in entries if e.level == "split" for s in e.source}
    assert len(set(targets)) == len(targets) and len(set(sources)) == len(sources)
    assert not split_sources & set(sources)
    pieces: dict[str, int] = {}
    for e in entries:
        shapes, t = [src[s] for s in e.source], tgt[e.target]
        if e.level == "split":  # a slice (or index) of one fused source; the pieces tile it
            assert e.transform in ("slice", "index", "slice_index") and len(shapes) == 1
            pieces[e.source[0]] = pieces.get(e.source[0], 0) + (
                t[e.args.get("dim", 0)] if e.transform == "slice" else 1)
        elif e.transform == "concat":
            assert all(sh[1:] == t[1:] for sh in shapes) and sum(sh[0] for sh in shapes) == t[0]
        elif e.transform == "stack":
            assert all(sh == t[1:] for sh in shapes) and len(shapes) == t[0]
        else:
            (s,) = shapes
            squeeze = [d for d in s if d != 1] == [d for d in t if d != 1]
            assert s == t or (len(s) == 2 and s[::-1] == t and e.transform == "transpose") or squeeze
        assert e.score >= max(threshold, 0.75 if strategy == "conservative" else 0.0) - 1e-9
    for s, n in pieces.items():  # a split never reads past its source
        assert n <= src[s][0] or len(src[s]) == 2


def group_level(src: dict, tgt: dict):
    """``(Level, source ModuleTree)``: the group-level assignment problems of two state dicts."""
    from weight_mapper.assign import Level, _buckets_by_key
    from weight_mapper.score import Items, validate_weights
    from weight_mapper.table import TensorTable
    from weight_mapper.tree import GroupTable, ModuleTree

    s_tab, t_tab = TensorTable.from_state_dict(src), TensorTable.from_state_dict(tgt)
    s_tree, t_tree = ModuleTree(s_tab), ModuleTree(t_tab)
    s_groups, t_groups = GroupTable.from_table(s_tab, s_tree), GroupTable.from_table(t_tab, t_tree)
    s_items, t_items = Items.of_groups(s_tab, s_tree, s_groups), Items.of_groups(t_tab, t_tree, t_groups)
    buckets = _buckets_by_key(s_groups.signatures, t_groups.signatures)
    level = Level.build(s_items, t_items, buckets, weights=validate_weights(None), tolerance=0.0, incompatible_pairs=())
    return level, s_tree


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nested_models(), nested_models())
def test_optimal_total_is_never_below_greedy_on_the_same_scores(src, tgt):
    # Same score matrices for both solvers: the group-level problem with context disabled.
    level, _ = group_level(src, tgt)
    for k in range(len(level)):
        w = level.block(level.scores["base"], k)
        r1, c1 = solve_optimal(w)
        r2, c2 = solve_greedy(w)
        assert w[r1, c1].sum() >= w[r2, c2].sum() - 1e-9


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nested_models(), nested_models())
def test_first_context_round_is_solved_on_the_weights_greedy_is_scored_with(src, tgt):
    # Both strategies seed the module map with the same highest-first round, so the first
    # context round solves the same weights: there the optimal total cannot be below greedy's.
    # When the rounds do not converge, greedy may keep its context-free seed round (it is a
    # greedy round too), whose scores are on other weights: no comparison then.
    from weight_mapper.assign import _solve_level

    level, s_tree = group_level(src, tgt)
    results = {
        solver: _solve_level(level, solver=solver, threshold=0.0, use_context=True, max_rounds=2,
                             n_src_modules=len(s_tree))[0]
        for solver in ("optimal", "greedy")
    }
    assume(not np.isnan(results["greedy"].components["context"]).any())
    assert results["optimal"].score.sum() >= results["greedy"].score.sum() - 1e-6


SCRIPT = """
import json, torch
from weight_mapper import WeightMapper
src = {f"{p}.{i}.weight": torch.empty(4, 4, device="meta") for p in ("a", "b", "c") for i in range(3)}
tgt = {f"{p}.{i}.weight": torch.empty(4, 4, device="meta") for p in ("x", "y", "z") for i in range(3)}
out = {}
for strategy in ("best_match", "greedy", "shape_only", "conservative"):
    out[strategy] = WeightMapper(src, tgt).suggest_mapping(threshold=0.0, strategy=strategy)
print(json.dumps(out, sort_keys=True))
"""


def test_results_do_not_depend_on_the_hash_seed():
    outputs = set()
    for seed in ("0", "1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
        assert run.returncode == 0, run.stderr
        outputs.add(run.stdout)
    assert len(outputs) == 1
    assert json.loads(outputs.pop())["best_match"]
