"""The zoo benchmark's measuring pieces (benchmarks/accuracy/tracer.py, zoo.score_way) on small converters.

The zoo itself needs torchvision / timm / torchtune and runs outside CI; what decides its numbers
(reading the ground truth from tracer values, scoring a plan by ``torch.equal``) is tested here.
"""

from __future__ import annotations

import torch

from benchmarks.accuracy.tracer import read_truth, tracer_state_dict
from benchmarks.accuracy.zoo import score_way
from weight_mapper import MappingPlan
from weight_mapper.plan import PlanEntry


def _converter(sd):
    """A converter in the style of torchtune's: rename, transpose, fuse, split, permute rows, add a head."""
    w = sd["attn.wq"]
    return {
        "q.weight": w.view(2, 2, 3).transpose(0, 1).reshape(4, 3),  # a row permutation (rotary style)
        "o.weight": sd["attn.wo"].t(),
        "kv.weight": torch.cat([sd["attn.wk"], sd["attn.wv"]]),
        "gate.weight": sd["ffn.w13"][:2],
        "up.weight": sd["ffn.w13"][2:],
        "norm.weight": sd["norm"].reshape(1, 3),
        "head.weight": torch.randn(5, 3),  # a new head: the target's own init
    }


def _source():
    return {"attn.wq": torch.zeros(4, 3), "attn.wo": torch.zeros(3, 4), "attn.wk": torch.zeros(2, 3),
            "attn.wv": torch.zeros(2, 3), "ffn.w13": torch.zeros(4, 3), "norm": torch.zeros(3),
            "steps": torch.zeros((), dtype=torch.long)}


def test_tracer_values_are_unique_across_tensors_and_keep_integer_dtypes():
    sd = tracer_state_dict(_source())
    flat = torch.cat([v.double().reshape(-1) for v in sd.values()])
    assert flat.unique().numel() == flat.numel()
    assert sd["steps"].dtype == torch.long and sd["attn.wq"].dtype == torch.float64


def test_read_truth_names_each_targets_sources_and_how():
    tracer = tracer_state_dict(_source())
    out = _converter(tracer)
    truth = read_truth(tracer, out, [*out, "missing.bias"])
    got = {k: (o.sources, o.kind) for k, o in truth.items()}
    assert got == {
        "q.weight": (("attn.wq",), "permute"),
        "o.weight": (("attn.wo",), "transpose"),
        "kv.weight": (("attn.wk", "attn.wv"), "concat"),
        "gate.weight": (("ffn.w13",), "slice"),
        "up.weight": (("ffn.w13",), "slice"),
        "norm.weight": (("norm",), "reshape"),
        "head.weight": ((), "target_only"),
        "missing.bias": ((), "target_only"),
    }


def test_read_truth_marks_arithmetic_as_computed():
    tracer = tracer_state_dict({"a": torch.zeros(3)})
    truth = read_truth(tracer, {"b": torch.cat([tracer["a"][:2], tracer["a"][2:] * 2])}, ["b"])
    assert truth["b"].kind == "computed" and truth["b"].sources == ("a",)


def _entry(src, tgt, transform=None, margin=1.0, shape=(3, 4), target_shape=None, args=None):
    return PlanEntry(tuple(src), tgt, transform, 0.9, margin, "tensor", shape, target_shape or shape, {}, args or {})


def test_score_way_counts_exact_wrong_flagged_missed_and_false_alarms():
    tracer = tracer_state_dict(_source())
    out = _converter(tracer)
    truth = read_truth(tracer, out, list(out))
    plan = MappingPlan((
        _entry(["attn.wo"], "o.weight", "transpose", shape=(3, 4), target_shape=(4, 3)),  # right
        _entry(["attn.wq"], "q.weight", None, shape=(4, 3)),  # right keys, no permutation: wrong, unflagged
        _entry(["norm"], "norm.weight", "reshape", margin=0.0, shape=(3,), target_shape=(1, 3), args={"shape": [1, 3]}),  # right, flagged
        _entry(["attn.wk"], "head.weight", None, margin=0.0, shape=(2, 3)),  # fills a new head: wrong (flagged)
    ))
    s = score_way(plan, truth, out, tracer)
    assert (s["exact"], s["wrong"], s["unflagged_wrong"], s["flagged_wrong"]) == (2, 2, 1, 1)
    assert s["false_alarms"] == 1  # the flagged norm is right
    assert s["missed"] == 3  # kv, gate, up
    assert s["n_truth"] == 6 and s["n_predicted"] == 4
    # key F1: o, q and norm have the truth's source keys; the head entry does not
    assert abs(s["precision"] - 3 / 4) < 1e-9 and abs(s["recall"] - 3 / 6) < 1e-9


def test_tied_source_tensors_share_tracer_values_and_count_as_one_key():
    w = torch.zeros(4, 3)
    src = {"embed": w, "head": w, "norm": torch.zeros(3)}
    tracer = tracer_state_dict(src)
    assert tracer["head"] is tracer["embed"]
    out = {"tok.weight": tracer["embed"].clone(), "norm.weight": tracer["norm"].clone()}
    truth = read_truth(tracer, out, list(out))
    assert truth["tok.weight"].sources == ("embed",)
    # a plan that reads the tied twin converts the same values: exact, and right for the key F1
    plan = MappingPlan((_entry(["head"], "tok.weight", shape=(4, 3)), _entry(["norm"], "norm.weight", shape=(3,))))
    s = score_way(plan, truth, out, tracer, {"head": "embed"})
    assert (s["exact"], s["wrong"], s["f1"]) == (2, 0, 1.0)
    assert score_way(plan, truth, out, tracer)["f1"] < 1.0  # without the tie the key differs
