from dataclasses import replace

import numpy as np
import pytest
import torch

from weight_mapper import MappingPlan, PlanEntry, PlanError, apply_plan
from weight_mapper.transforms import TRANSFORMS, get_transform, invert_entries, relate

_E, _I, _H = 3, 4, 5  # experts, hidden, model dims


def combined(target, sources, transform, args, source_shape, target_shape) -> PlanEntry:
    return PlanEntry(source=tuple(sources), target=target, transform=transform, score=1.0, margin=1.0,
                     level="combined", source_shape=source_shape, target_shape=target_shape, args=args)


def experts() -> dict[str, torch.Tensor]:
    return {f"e{e}.w{k}": torch.randn(_I, _H) for k in (1, 3) for e in range(_E)}


GATE_UP = combined("gate_up", [f"e{e}.w{k}" for k in (1, 3) for e in range(_E)], "stack_concat",
                   {"dim": 0, "parts": 2, "concat_dim": 1, "sizes": [_I, _I]}, (_I, _H), (_E, 2 * _I, _H))


def test_every_transform_names_a_registered_inverse():
    assert all(t.inverse in TRANSFORMS and TRANSFORMS[t.inverse].inverse == name for name, t in TRANSFORMS.items())


def test_stack_concat_is_each_experts_gate_then_up():
    sd = experts()
    fused = get_transform("stack_concat").apply([sd[k] for k in GATE_UP.source], GATE_UP.args)
    expected = torch.stack([torch.cat([sd[f"e{e}.w1"], sd[f"e{e}.w3"]]) for e in range(_E)])
    assert torch.equal(fused, expected)


def test_stack_concat_inverts_exactly():
    sd = experts()
    plan = MappingPlan(entries=(GATE_UP,))
    there = apply_plan(plan, sd)
    assert there["gate_up"].shape == (_E, 2 * _I, _H)
    inverse = plan.inverse()
    assert {e.transform for e in inverse.entries} == {"slice_index"}
    back = apply_plan(inverse, there)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], v) for k, v in sd.items())
    again = apply_plan(inverse.inverse(), back)  # slice_index pieces regroup into one stack_concat
    assert torch.equal(again["gate_up"], there["gate_up"])


def test_slice_index_pieces_that_miss_an_expert_have_no_inverse():
    pieces = [e for e in invert_entries([GATE_UP]) if e.target != "e2.w3"]
    with pytest.raises(PlanError, match="do not cover it exactly"):
        invert_entries(pieces)


def test_stack_concat_needs_whole_parts():
    with pytest.raises(PlanError, match="multiple of parts=2"):
        get_transform("stack_concat").apply([torch.zeros(2)] * 3, {"parts": 2, "concat_dim": 1})


def test_a_rotary_plan_survives_its_json():
    entry = PlanEntry(("wq",), "q_proj", "rotary_half", 1.0, 1.0, "tensor", (8, 4), (8, 4), args={"n_heads": 2})
    plan = MappingPlan.from_json(MappingPlan((entry,)).to_json())
    assert plan.entries[0].transform == "rotary_half" and plan.entries[0].args == {"n_heads": 2}
    assert plan.inverse().entries[0].transform == "rotary_interleave"
    bad = MappingPlan((replace(entry, args={}),)).to_json()
    with pytest.raises(PlanError, match="needs args.n_heads"):
        MappingPlan.from_json(bad)
    odd = MappingPlan((replace(entry, args={"n_heads": 3}),)).to_json()
    with pytest.raises(PlanError, match="no even number of rows per head"):
        MappingPlan.from_json(odd)


@pytest.mark.parametrize(("s", "t", "types", "expected"), [
    ((3, 4), (3, 4), ("", ""), (None, {}, 1.0)),
    ((3, 4), (4, 3), ("", ""), ("transpose", {}, 0.7)),
    ((4, 4), (4, 4), ("Conv1D", "Linear"), ("transpose", {}, 1.0)),  # square: only the types tell
    ((3, 4), (4, 3), ("[in, out]", "Linear"), ("transpose", {}, 1.0)),
    ((3, 4), (3, 4), ("Linear", "Conv1D"), (None, {}, 0.7)),  # stored transposed, yet the same shape: copied
    ((8, 1, 1), (8,), ("", ""), ("reshape", {"shape": [8]}, 0.6)),
    ((16, 72), (16, 8, 3, 3), ("", ""), ("reshape", {"shape": [16, 8, 3, 3]}, 0.55)),
    ((4, 2, 3), (4, 3, 2), ("", ""), None),  # same rank, other dims: not a flattening
    ((3,), (5,), ("", ""), None),
])
def test_relate_is_the_one_rule_for_scores_and_transforms(s, t, types, expected):
    from weight_mapper.planner import transform_for
    from weight_mapper.transforms import relate

    relation = relate(s, t, *types)
    assert (relation if relation is None else tuple(relation)) == expected
    assert transform_for(s, t, *types) == ((None, {}) if expected is None else expected[:2])


def test_a_new_one_to_one_transform_is_one_registry_entry(monkeypatch):
    """Registering ``tile2`` (rows repeated twice) is all the matcher, the planner, plan
    validation, apply and inversion need."""
    from weight_mapper import transforms
    from weight_mapper.planner import transform_for
    from weight_mapper.score import Items, shape_score
    from weight_mapper.table import TensorTable
    from weight_mapper.tree import ModuleTree

    tile2 = transforms.Transform(
        "tile2", lambda ts, a: torch.cat([ts[0], ts[0]]), "slice",
        rules=(transforms.ShapeRule(0.4, lambda s, t: {} if len(s) >= 1 and t == (2 * s[0], *s[1:]) else None),),
        inverse_args=lambda e: {"dim": 0, "start": 0, "length": e.source_shape[0]},
    )
    registry = {**TRANSFORMS, "tile2": tile2}
    monkeypatch.setattr(transforms, "TRANSFORMS", registry)
    monkeypatch.setattr(transforms, "_RULES", transforms._ordered_rules(registry))
    import weight_mapper.plan

    monkeypatch.setattr(weight_mapper.plan, "TRANSFORMS", registry)

    src_t, tgt_t = TensorTable.from_state_dict({"a": (3, 4)}), TensorTable.from_state_dict({"b": (6, 4)})
    src, tgt = Items.of_tensors(src_t, ModuleTree(src_t), [0]), Items.of_tensors(tgt_t, ModuleTree(tgt_t), [0])
    assert shape_score(src, tgt, np.array([0]), np.array([0])).tolist() == [0.4]
    assert transform_for((3, 4), (6, 4)) == ("tile2", {})
    entry = PlanEntry(("a",), "b", "tile2", 1.0, 1.0, "tensor", (3, 4), (6, 4))
    plan = MappingPlan.from_json(MappingPlan((entry,)).to_json())
    a = torch.randn(3, 4)
    there = apply_plan(plan, {"a": a})
    assert torch.equal(there["b"], torch.cat([a, a]))
    assert torch.equal(apply_plan(plan.inverse(), there)["a"], a)


@pytest.mark.parametrize(("src", "tgt", "dims"), [
    ((3, 3, 8, 16), (16, 8, 3, 3), [3, 2, 0, 1]),  # TensorFlow / JAX HWIO kernel into PyTorch OIHW
    ((16, 8, 3, 3), (3, 3, 8, 16), [2, 3, 1, 0]),  # and back
    ((1, 1, 8, 8), (8, 8, 1, 1), [3, 2, 0, 1]),  # a 1x1 kernel is no reshape: in and out swap
])
def test_conv_kernels_in_the_other_framework_layout_are_permuted(src, tgt, dims):
    rel = relate(src, tgt)
    assert (rel.transform, rel.args) == ("permute", {"dims": dims})
    w = torch.randn(*src)
    entry = PlanEntry(("k",), "w", "permute", 1.0, 1.0, "tensor", src, tgt, args=rel.args)
    plan = MappingPlan.from_json(MappingPlan((entry,)).to_json())
    there = apply_plan(plan, {"k": w})["w"]
    assert torch.equal(there, w.permute(*dims))
    if src == (3, 3, 8, 16):  # element [h, w, i, o] lands at [o, i, h, w]
        assert there[5, 2, 1, 0] == w[1, 0, 2, 5]
    assert torch.equal(apply_plan(plan.inverse(), {"w": there})["k"], w)


def test_a_permute_entry_checks_its_dims():
    bad = PlanEntry(("k",), "w", "permute", 1.0, 1.0, "tensor", (3, 3, 8, 16), (16, 8, 3, 3),
                    args={"dims": [0, 1, 2, 3]})
    with pytest.raises(PlanError, match="dims"):
        MappingPlan.from_json(MappingPlan((bad,)).to_json())
    assert relate((64, 8, 3, 3), (3, 3, 64, 8)) is None  # [H, W, O, I] is no layout the rule knows
    assert relate((64, 8, 32, 32), (32, 32, 8, 64)) is None  # 32 x 32 is no kernel
