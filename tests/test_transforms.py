import pytest
import torch

from weight_mapper import MappingPlan, PlanEntry, PlanError, apply_plan
from weight_mapper.transforms import TRANSFORMS, get_transform, invert_entries

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
