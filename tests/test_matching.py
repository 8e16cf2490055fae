"""match(): the library core from two tables to a plan, and its one options object."""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from fixture_models import (
    BatchNormed,
    BatchNormedRenamed,
    EncoderDecoder,
    NewModel,
    OldModel,
    Transposed,
    TransposedTarget,
)
from weight_mapper import MappingError, MatchOptions, TensorTable, WeightMapper, match
from weight_mapper.flow import record_execution_order
from weight_mapper.matching import STRATEGIES, prepare_tables, strip_source_prefix


class SeparateQKV(nn.Module):
    """Attention with one projection per q / k / v."""

    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({k: nn.Linear(8, 8) for k in ("q_proj", "k_proj", "v_proj", "o_proj")})


class FusedQKV(nn.Module):
    """SeparateQKV with q / k / v fused into one projection: only a concat fills it."""

    def __init__(self):
        super().__init__()
        self.attn = nn.ModuleDict({"qkv": nn.Linear(8, 24), "out": nn.Linear(8, 8)})


def same(a, b) -> bool:
    """Two plans alike in every field and bit (their JSON: NaN sub-scores compare unequal as floats)."""
    return a.to_json() == b.to_json()


def _tables(source, target):
    return TensorTable.from_module(source), TensorTable.from_module(target)


PAIRS = [(OldModel, NewModel), (BatchNormed, BatchNormedRenamed), (Transposed, TransposedTarget),
         (SeparateQKV, FusedQKV), (FusedQKV, SeparateQKV)]


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0].__name__}->{p[1].__name__}")
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_match_is_the_plan_the_mapper_makes(pair, strategy):
    source, target = pair[0](), pair[1]()
    mapper = WeightMapper(source, target, trace=False)
    mapper.suggest_mapping(strategy=strategy, repair=False)
    plan = match(*_tables(source, target), options=MatchOptions(strategy=strategy))
    assert same(plan, mapper.get_plan())
    assert mapper.options == MatchOptions(strategy=strategy)


def test_combined_matches_come_from_the_core_and_shape_only_has_none():
    src, tgt = _tables(SeparateQKV(), FusedQKV())
    plan = match(src, tgt)
    fused = {e.target: e.source for e in plan.entries if e.transform == "concat"}
    assert fused["attn.qkv.weight"] == ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight")
    split = match(tgt, src)
    assert {e.target for e in split.entries if e.level == "split"} >= {"attn.q_proj.weight", "attn.k_proj.weight"}
    assert not [e for e in match(src, tgt, options=MatchOptions(strategy="shape_only")).entries
                if len(e.source) > 1]


def test_strategy_rules_reach_the_plan():
    src, tgt = _tables(OldModel(), NewModel())
    plan = match(src, tgt, options=MatchOptions(strategy="conservative", threshold=0.5))
    assert plan.threshold == 0.75 and plan.strategy == "conservative"
    shape_only = match(src, tgt, options=MatchOptions(strategy="shape_only", weights={"name": 1.0}))
    assert shape_only.weights == {"shape": 1.0, "name": 0.0, "hierarchy": 0.0}  # the strategy's own
    weighted = match(src, tgt, options=MatchOptions(weights={"shape": 2, "name": 1, "hierarchy": 1}))
    assert weighted.weights == {"shape": 0.5, "name": 0.25, "hierarchy": 0.25}
    strict = match(src, tgt, options=MatchOptions(threshold=1.0))
    assert len(strict.entries) < len(match(src, tgt).entries)


def test_incompatible_pairs_keep_sides_apart():
    table = TensorTable.from_module(EncoderDecoder())
    swapped = TensorTable.from_state_dict({n.replace("encoder", "x").replace("decoder", "encoder").replace("x", "decoder"): s
                                           for n, s in zip(table.names, table.shapes)})
    free = match(table, swapped, options=MatchOptions(threshold=0.0))
    assert free.mapping["encoder.weight"] == "encoder.weight"
    apart = match(table, swapped, options=MatchOptions(threshold=0.0, incompatible_pairs=[("encoder", "encoder")]))
    assert apart.mapping.get("encoder.weight") != "encoder.weight"


def test_the_wrapper_prefix_is_stripped_for_matching_and_kept_on_the_plan():
    sd = {f"module.{k}": v for k, v in OldModel().state_dict().items()}
    src, tgt = TensorTable.from_state_dict(sd, label="source state_dict"), TensorTable.from_module(NewModel())
    plan = match(src, tgt)
    assert plan.source_prefix == "module."
    assert plan.mapping["module.classifier.2.weight"] == "head.2.weight"
    assert src.names[0].startswith("module.")  # the given table is not modified
    mapper = WeightMapper(sd, NewModel(), trace=False)
    mapper.suggest_mapping(repair=False)
    assert same(mapper.get_plan(), plan)
    kept = match(src, tgt, options=MatchOptions(source_prefix=""))
    assert kept.source_prefix == "" and all(s.startswith("module.") for e in kept.entries for s in e.source)


def test_strip_source_prefix_is_pure_and_checks_the_prefix():
    src = TensorTable.from_state_dict({"module.a.weight": (2, 3), "module.b.weight": (3, 3)})
    tgt = TensorTable.from_state_dict({"a.weight": (2, 3)})
    stripped, prefix = strip_source_prefix(src, tgt)
    assert (stripped.names, prefix) == (("a.weight", "b.weight"), "module.")
    assert src.names == ("module.a.weight", "module.b.weight")
    assert strip_source_prefix(src, src) == (src, "")  # the target has it too: nothing to strip
    with pytest.raises(MappingError, match="source_prefix 'a.' is not a prefix of every source key"):
        strip_source_prefix(src, tgt, prefix="a.")
    with pytest.raises(MappingError, match="not a prefix of every source key"):
        match(src, tgt, options=MatchOptions(source_prefix="model."))


def test_storage_of_untyped_sides_is_inferred_unless_switched_off():
    sd = {k: v for k, v in Transposed().state_dict().items()}
    src, tgt = TensorTable.from_state_dict(sd), TensorTable.from_module(TransposedTarget())
    assert "[in, out]" in prepare_tables(src, tgt).source.module_types
    assert "[in, out]" not in prepare_tables(src, tgt, options=MatchOptions(infer_storage=False)).source.module_types
    plan = match(src, tgt)
    assert {e.target: e.transform for e in plan.entries}["fc_in.weight"] == "transpose"


def test_use_flow_false_matches_as_without_flow_and_records_none():
    source, target = BatchNormed(), BatchNormedRenamed()
    x = torch.randn(2, 3, 6, 6)
    flowed = (TensorTable.from_module(source, exec_order=record_execution_order(source, x)),
              TensorTable.from_module(target, exec_order=record_execution_order(target, x)))
    assert np.isfinite(flowed[0].exec_pos).any()
    with_flow = match(*flowed, options=MatchOptions(flow_sources=("dummy_input", "dummy_input")))
    assert with_flow.flow_sources == ("dummy_input", "dummy_input")
    without = match(*flowed, options=MatchOptions(use_flow=False, flow_sources=("dummy_input", "dummy_input")))
    assert without.flow_sources == ("none", "none")
    assert same(without, match(*_tables(source, target)))
    assert [e.components for e in with_flow.entries] != [e.components for e in without.entries]


def test_the_mapper_with_dummy_input_is_the_core_with_flow():
    source, target = BatchNormed(), BatchNormedRenamed()
    x = torch.randn(2, 3, 6, 6)
    mapper = WeightMapper(source, target, dummy_input=x)
    mapper.suggest_mapping(repair=False)
    tables = (TensorTable.from_module(source, exec_order=record_execution_order(source, x)),
              TensorTable.from_module(target, exec_order=record_execution_order(target, x)))
    options = MatchOptions(flow_sources=("dummy_input", "dummy_input"))
    assert mapper.options == options
    assert same(match(*tables, options=options), mapper.get_plan())


@pytest.mark.parametrize(("options", "message"), [
    ({"strategy": "fast"}, r"unknown strategy 'fast'; choose one of \['best_match'"),
    ({"threshold": 1.5}, r"threshold must be a number in \[0, 1\], got 1.5"),
    ({"threshold": True}, r"threshold must be a number in \[0, 1\], got True"),
    ({"threshold": "0.6"}, r"threshold must be a number"),
    ({"weights": {"shape": -1}}, r"weights\['shape'\] must be a finite number >= 0"),
    ({"weights": {"colour": 1}}, r"unknown score component\(s\) \['colour'\]"),
    ({"weights": {"shape": 0}}, r"weights must not all be zero"),
    ({"shape_tolerance": 1.0}, r"shape_tolerance must be a number in \[0, 1\), got 1.0"),
    ({"incompatible_pairs": [("encoder",)]}, r"incompatible_pairs entry \('encoder',\) must be a pair"),
    ({"max_rounds": 0}, r"max_rounds must be an integer >= 1, got 0"),
    ({"source_prefix": 3}, r"source_prefix must be a string such as 'module.'"),
    ({"infer_storage": "yes"}, r"infer_storage must be True or False, got 'yes'"),
    ({"use_flow": None}, r"use_flow must be True or False, got None"),
    ({"flow_sources": ("fx",)}, r"flow_sources must be a \(source, target\) pair of"),
    ({"flow_sources": ("fx", "guess")}, r"flow_sources must be a \(source, target\) pair of"),
])
def test_bad_options_are_refused_when_built(options, message):
    with pytest.raises(MappingError, match=message):
        MatchOptions(**options)
    with pytest.raises(MappingError, match=message):  # replace() validates again
        dataclasses.replace(MatchOptions(), **options)


def test_options_are_frozen_normalised_and_hashable():
    weights = {"shape": 1, "name": 1}
    options = MatchOptions(weights=weights, threshold=1, incompatible_pairs=[({"encoder", "embedding"}, "decoder")])
    weights["shape"] = 100  # the caller's dict is copied
    assert options.weights == {"shape": 1, "name": 1}
    assert options.effective_weights == {"shape": 0.5, "name": 0.5, "hierarchy": 0.0}
    assert options.threshold == 1.0 and isinstance(options.threshold, float)
    assert options.incompatible_pairs == ((("embedding", "encoder"), ("decoder",)),)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.threshold = 0.5  # type: ignore[misc]
    with pytest.raises(TypeError):
        options.weights["shape"] = 3  # type: ignore[index]
    assert dataclasses.replace(options) == options and hash(dataclasses.replace(options)) == hash(options)
    assert MatchOptions(strategy="conservative").rule == STRATEGIES["conservative"]


def test_mapper_options_validate_as_before_and_follow_the_last_call():
    with pytest.raises(MappingError, match=r"shape_tolerance must be a number in \[0, 1\)"):
        WeightMapper(OldModel(), NewModel(), shape_tolerance=2)
    mapper = WeightMapper(OldModel(), NewModel(), 0.1, None, [("backbone", "head")], trace=False)
    assert mapper.shape_tolerance == 0.1 and mapper.incompatible_pairs == ((("backbone",), ("head",)),)
    mapper.suggest_mapping(0.3, "greedy", repair=False)
    assert (mapper.options.strategy, mapper.options.threshold, mapper.options.shape_tolerance) == ("greedy", 0.3, 0.1)
    with pytest.raises(MappingError, match="unknown strategy"):
        mapper.suggest_mapping(strategy="fast")
    assert mapper.options.strategy == "greedy"  # a refused call changes nothing


def test_suggest_mapping_takes_one_options_object():
    source, target = OldModel(), NewModel()
    by_arguments = WeightMapper(source, target, trace=False)
    by_arguments.suggest_mapping(0.3, "greedy", {"shape": 1, "name": 1}, max_rounds=3, repair=False)
    by_options = WeightMapper(source, target, trace=False)
    options = MatchOptions(strategy="greedy", threshold=0.3, weights={"shape": 1, "name": 1}, max_rounds=3)
    by_options.suggest_mapping(options=options, repair=False)
    assert same(by_options.get_plan(), by_arguments.get_plan()) and by_options.options == by_arguments.options
    # Its shape_tolerance and incompatible_pairs are the options'; the flow sources stay the mapper's.
    by_options.suggest_mapping(options=dataclasses.replace(options, incompatible_pairs=[("classifier", "head")],
                                                           flow_sources=("fx", "fx")), repair=False)
    assert by_options.options.incompatible_pairs == ((("classifier",), ("head",)),)
    assert by_options.options.flow_sources == ("none", "none")
    assert not any(e.source[0].startswith("classifier") and e.target.startswith("head")
                   for e in by_options.get_plan().entries)


def test_suggest_mapping_refuses_options_beside_its_arguments_or_against_its_tables():
    mapper = WeightMapper({f"module.{k}": v for k, v in OldModel().state_dict().items()}, NewModel(), trace=False)
    with pytest.raises(MappingError, match="inside options, not beside it"):
        mapper.suggest_mapping(0.3, options=MatchOptions())
    with pytest.raises(MappingError, match=r"options.source_prefix is '', but the mapper's tables were built with None"):
        mapper.suggest_mapping(options=MatchOptions(source_prefix=""))
    with pytest.raises(MappingError, match="options must be a MatchOptions, got dict"):
        mapper.suggest_mapping(options={"threshold": 0.3})  # type: ignore[arg-type]
    assert mapper.plan is None
    mapper.suggest_mapping(options=MatchOptions(), repair=False)
    assert mapper.get_plan().source_prefix == "module."


def test_the_cli_checks_its_matching_options_before_reading_any_file(tmp_path, capsys):
    from weight_mapper.cli import main

    missing = tmp_path / "missing.pt"
    assert main(["map", str(missing), "cli_factories:new_net", "-o", str(tmp_path / "p.json"),
                 "--weights", "colour=1"]) == 1
    err = capsys.readouterr().err
    assert "unknown score component(s) ['colour']" in err and "missing.pt" not in err


def test_the_collector_is_paused_while_matching_and_restored_after():
    import gc

    from weight_mapper import matching

    seen = []
    real_build_plan = matching.build_plan

    def spy(*args, **kwargs):
        seen.append(gc.isenabled())
        return real_build_plan(*args, **kwargs)

    old, new = TensorTable.from_module(OldModel()), TensorTable.from_module(NewModel())
    assert gc.isenabled()
    try:
        matching.build_plan = spy
        plan = match(old, new)
    finally:
        matching.build_plan = real_build_plan
    assert seen == [False] and gc.isenabled() and plan.entries
    # Nested uses and errors restore it; a caller's own gc.disable() is kept.
    with pytest.raises(ZeroDivisionError), matching._collector_paused():
        with matching._collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
        1 / 0  # noqa: B018
    assert gc.isenabled()
    gc.disable()
    try:
        match(old, new)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_tables_of_the_mapper_are_built_with_the_collector_paused(monkeypatch):
    import gc

    seen = []
    real_build = TensorTable._build.__func__

    def spy(cls, *args, **kwargs):
        seen.append(gc.isenabled())
        return real_build(cls, *args, **kwargs)

    monkeypatch.setattr(TensorTable, "_build", classmethod(spy))
    WeightMapper({"fc.weight": (3, 2)}, {"head.weight": (3, 2)})
    assert seen == [False, False] and gc.isenabled()
