"""Rename rules: a mapping compressed into regex rules that reproduce it exactly."""

import json
import os
import random
import re
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weight_mapper.errors import MappingError
from weight_mapper.rules import (
    RenameRule,
    apply_rules,
    check_rules,
    infer_rules,
    rules_to_key_mapping,
    rules_to_revise_keys,
    rules_to_torchtune_table,
)

_N_LAYERS = 60
_N_EXPERTS = 64

_LLAMA_LAYER = {  # HF Llama -> torchtune, per layer
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.output_proj.weight",
    "mlp.gate_proj.weight": "mlp.w1.weight",
    "mlp.up_proj.weight": "mlp.w3.weight",
    "mlp.down_proj.weight": "mlp.w2.weight",
    "input_layernorm.weight": "sa_norm.scale",
    "post_attention_layernorm.weight": "mlp_norm.scale",
}
_LLAMA_GLOBAL = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.scale",
                 "lm_head.weight": "output.weight"}
_EXPERT = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def llama_hf_to_tune(n_layers=_N_LAYERS):
    """HF Llama keys -> torchtune keys."""
    out = {"model.embed_tokens.weight": "tok_embeddings.weight"}
    for i in range(n_layers):
        out.update({f"model.layers.{i}.{k}": f"layers.{i}.{v}" for k, v in _LLAMA_LAYER.items()})
    out.update({"model.norm.weight": "norm.scale", "lm_head.weight": "output.weight"})
    return out


def moe_hf_to_tune(n_layers=_N_LAYERS, n_experts=_N_EXPERTS):
    """A Mixtral-style MoE: 60 layers x 64 experts x 3 projections, plus attention and norms."""
    out = dict(_LLAMA_GLOBAL)
    for i in range(n_layers):
        out.update({f"model.layers.{i}.{k}": f"layers.{i}.{v}" for k, v in _LLAMA_LAYER.items() if "mlp." not in k})
        out[f"model.layers.{i}.mlp.gate.weight"] = f"layers.{i}.ffn.router.weight"
        for j in range(n_experts):
            for k, v in _EXPERT.items():
                out[f"model.layers.{i}.mlp.experts.{j}.{k}.weight"] = f"layers.{i}.ffn.experts.{j}.{v}.weight"
    return out


def backbone_renamed():
    """`backbone.*` -> `encoder.*`; `head.*` unchanged."""
    out = {}
    for stage in range(1, 5):
        for block in range(3):
            for leaf in ("conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"):
                out[f"backbone.layer{stage}.{block}.{leaf}"] = f"encoder.layer{stage}.{block}.{leaf}"
    out["backbone.conv1.weight"] = "encoder.conv1.weight"
    out.update({"head.fc.weight": "head.fc.weight", "head.fc.bias": "head.fc.bias"})
    return out


def blocks_regrouped(n_blocks=12, per_stage=3):
    """A flat `blocks.{i}` list regrouped as `stages.{i // 3}.{i % 3}`: numbers change."""
    out = {"stem.conv.weight": "stem.conv.weight", "head.weight": "classifier.weight"}
    for i in range(n_blocks):
        for leaf in ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight", "norm1.weight"):
            out[f"blocks.{i}.{leaf}"] = f"stages.{i // per_stage}.{i % per_stage}.{leaf}"
    return out


def _show(title, mapping, rules, seconds=None):
    timing = "" if seconds is None else f" in {seconds:.3f} s"
    print(f"\n{title}: {len(mapping)} entries -> {len(rules)} rules{timing}")
    for rule in rules[:6]:
        print(f"    {rule}")


def _n_groups(rule):
    return re.compile(rule.pattern).groups


# ---------------------------------------------------------------------------- the cases
def test_llama_60_layers_is_a_handful_of_rules():
    mapping = llama_hf_to_tune()
    rules = infer_rules(mapping)
    _show("HF Llama -> torchtune", mapping, rules)
    assert check_rules(rules, mapping) == []
    assert len(rules) <= 20
    assert RenameRule(r"^model\.layers\.(\d+)\.self_attn\.", r"layers.\1.attn.") in rules
    assert all(r.pattern.startswith("^") for r in rules)


def test_moe_12k_entries_is_tens_of_rules():
    mapping = moe_hf_to_tune()
    assert len(mapping) > 11_000
    start = time.perf_counter()
    rules = infer_rules(mapping)
    seconds = time.perf_counter() - start
    _show("MoE 60 layers x 64 experts", mapping, rules, seconds)
    assert check_rules(rules, mapping) == []
    assert len(rules) <= 30
    assert RenameRule(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.gate_proj\.", r"layers.\1.ffn.experts.\2.w1.") in rules


def test_whole_subtree_rename_is_one_rule_and_leaves_the_rest_alone():
    mapping = backbone_renamed()
    rules = infer_rules(mapping)
    _show("backbone -> encoder", mapping, rules)
    assert rules == [RenameRule(r"^backbone\.", "encoder.")]
    assert check_rules(rules, mapping) == []
    assert not any(rule.matches(k) for rule in rules for k in mapping if k.startswith("head."))


def test_digit_runs_inside_a_component_become_groups():
    # The example: `^backbone\.layer(\d+)\.` -> `encoder.block\1.`.
    mapping = {f"backbone.layer{s}.{b}.conv.weight": f"encoder.block{s}.{b}.conv.weight" for s in range(1, 5) for b in range(3)}
    assert infer_rules(mapping) == [RenameRule(r"^backbone\.layer(\d+)\.", r"encoder.block\1.")]


def test_shifted_numbering_is_exact_with_literal_rules():
    mapping = blocks_regrouped()
    rules = infer_rules(mapping)
    _show("blocks.{i} -> stages.{i//3}.{i%3}", mapping, rules)
    assert check_rules(rules, mapping) == []
    assert RenameRule(r"^blocks\.4\.", "stages.1.1.") in rules
    assert len(rules) <= 12  # one per block at most, plus the head


def test_one_based_numbering_is_exact():
    mapping = {f"h.{i}.attn.weight": f"layers.{i + 1}.attn.weight" for i in range(8)}
    rules = infer_rules(mapping)
    assert check_rules(rules, mapping) == []
    assert RenameRule(r"^h\.0\.", "layers.1.") in rules


def test_identity_keys_are_never_rewritten():
    # `backbone.fc.*` stays while the rest of `backbone.*` moves: no rule may touch it.
    mapping = {f"backbone.layer{s}.{b}.w": f"encoder.layer{s}.{b}.w" for s in range(1, 4) for b in range(4)}
    mapping.update({"backbone.fc.weight": "backbone.fc.weight", "backbone.fc.bias": "backbone.fc.bias"})
    rules = infer_rules(mapping)
    assert check_rules(rules, mapping) == []
    assert apply_rules(rules, "backbone.fc.weight") == "backbone.fc.weight"
    assert len(rules) <= 2


def test_an_added_prefix_is_one_rule():
    mapping = {k: "module." + k for k in backbone_renamed()}
    assert infer_rules(mapping) == [RenameRule("^", "module.")]


def test_regex_characters_in_keys_are_escaped():
    mapping = {"a+b.(x).0.w": "c.(x).0.w", "a+b.(x).1.w": "c.(x).1.w", "aab.x.0.w": "aab.x.0.w", "q\\d.w": "r\\1.w"}
    rules = infer_rules(mapping)
    assert check_rules(rules, mapping) == []
    assert apply_rules(rules, "aab.(x).0.w") == "aab.(x).0.w"


def test_max_groups_limits_backreferences():
    mapping = moe_hf_to_tune(n_layers=3, n_experts=4)
    rules = infer_rules(mapping, max_groups=1)
    assert check_rules(rules, mapping) == []
    assert max(_n_groups(r) for r in rules) == 1


def test_order_of_the_mapping_does_not_matter():
    items = list(moe_hf_to_tune(n_layers=4, n_experts=4).items()) + list(blocks_regrouped().items())
    expected = infer_rules(dict(items))
    random.Random(0).shuffle(items)
    assert infer_rules(dict(items)) == expected


def _mixed_mapping():
    return {**blocks_regrouped(), **{k: "x." + v for k, v in backbone_renamed().items()}}


def test_rules_do_not_depend_on_hash_seeds():
    # This process hashes with its own seed; a second process with another seed must agree.
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    code = (
        "import json, sys; sys.path.insert(0, 'tests'); from test_rules import _mixed_mapping;"
        "from weight_mapper.rules import infer_rules;"
        "print(json.dumps([[r.pattern, r.replacement] for r in infer_rules(_mixed_mapping())]))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300,
                         env={**os.environ, "PYTHONHASHSEED": seed})
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == [[r.pattern, r.replacement] for r in infer_rules(_mixed_mapping())]


def test_max_rules_is_enforced():
    with pytest.raises(MappingError, match=r"takes 11 rename rules, more than max_rules=5"):
        infer_rules(blocks_regrouped(), max_rules=5)


def test_bad_keys_are_refused():
    with pytest.raises(MappingError, match="newline"):
        infer_rules({"a\n.w": "b.w"})
    with pytest.raises(MappingError, match="string keys"):
        infer_rules({"a.w": 3})
    with pytest.raises(MappingError, match="not a valid regex"):
        RenameRule("^(a", "b")


def test_empty_mapping_needs_no_rules():
    assert infer_rules({}) == []


# ---------------------------------------------------------------------------- semantics
def test_first_matching_rule_wins_and_unmatched_keys_stay():
    rules = [RenameRule(r"^a\.(\d+)\.w$", r"b.\1.weight"), RenameRule(r"^a\.", "c."), RenameRule(r"^a\.0\.", "never.")]
    assert apply_rules(rules, "a.0.w") == "b.0.weight"
    assert apply_rules(rules, "a.0.v") == "c.0.v"
    assert apply_rules(rules, "z.0.w") == "z.0.w"
    assert check_rules(rules, {"a.0.w": "b.0.weight", "a.0.v": "never.v"}) == ["a.0.v"]


def test_chained_application_differs_for_a_swap():
    # Swapping two subtrees is exact when the first match wins, but cannot be written for
    # tools that apply every rule in turn.
    mapping = {**{f"a.{i}.w": f"b.{i}.w" for i in range(3)}, **{f"b.{i}.w": f"a.{i}.w" for i in range(3)}}
    rules = infer_rules(mapping)
    assert check_rules(rules, mapping) == []
    assert check_rules(rules, mapping, chained=True) != []


def test_rules_are_ordered_for_chained_application_when_possible():
    # a -> b and b -> c: `^b` must come first, or mmengine would rename a.* twice.
    mapping = {**{f"a.{i}.w": f"b.{i}.w" for i in range(3)}, **{f"b.{i}.w": f"c.{i}.w" for i in range(3)}}
    rules = infer_rules(mapping)
    assert rules == [RenameRule(r"^b\.", "c."), RenameRule(r"^a\.", "b.")]
    assert check_rules(rules, mapping, chained=True) == []


# ---------------------------------------------------------------------------- properties
_WORDS = ["encoder", "layers", "block", "attn", "mlp", "norm", "proj", "fc1", "fc2", "head", "stem", "weight", "bias"]
_NEW = ["zeta", "omega", "kappa", "sigma", "delta", "theta", "iota", "rho", "tau", "phi", "chi", "psi", "eta"]
_component = st.one_of(st.sampled_from(_WORDS), st.integers(0, 12).map(str))
_names = st.lists(_component, min_size=1, max_size=5).map(".".join)


@st.composite
def consistent_renamings(draw):
    """Random nested names, renamed word by word; numbers kept, shifted or regrouped."""
    names = draw(st.lists(_names, min_size=1, max_size=40, unique=True))
    word2new = {w: draw(st.sampled_from([w, *_NEW])) for w in _WORDS}
    numbers = draw(st.sampled_from(["keep", "shift", "regroup"]))
    prefix = draw(st.sampled_from(["", "model.", "module."]))
    kept = draw(st.sets(st.sampled_from(names)))

    def number(p):
        i = int(p)
        return {"keep": p, "shift": str(i + 1), "regroup": f"{i // 3}.{i % 3}"}[numbers]

    def rename(name):
        return prefix + ".".join(number(p) if p.isdecimal() else word2new[p] for p in name.split("."))

    # Distinct targets, as a real mapping has (a renaming may merge two names; drop those).
    mapping, seen = {}, set()
    for name in names:
        target = name if name in kept else rename(name)
        if target not in seen:
            mapping[name] = target
            seen.add(target)
    return mapping


@settings(max_examples=300, deadline=None)
@given(consistent_renamings())
def test_rules_reproduce_any_consistent_renaming(mapping):
    rules = infer_rules(mapping)
    assert check_rules(rules, mapping) == []
    assert len(rules) <= len(mapping)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_names, _names, min_size=1, max_size=30))
def test_rules_reproduce_even_an_unstructured_mapping(mapping):
    assert check_rules(infer_rules(mapping), mapping) == []


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text(min_size=0, max_size=8).filter(lambda s: "\n" not in s),
                       st.text(min_size=0, max_size=8).filter(lambda s: "\n" not in s), min_size=1, max_size=12))
def test_rules_reproduce_mappings_of_arbitrary_text(mapping):
    assert check_rules(infer_rules(mapping), mapping) == []


# ---------------------------------------------------------------------------- exports
def _transformers4_rename(key, key_mapping):
    """`PreTrainedModel._get_key_renaming_mapping` in transformers 4.x, for one key.

    (It first runs `_fix_state_dict_key_on_load`, which only touches `LayerNorm.gamma/beta`
    and `weight_g/weight_v` keys; none occur here.)
    """
    new_key = key
    for pattern, replacement in key_mapping.items():
        new_key, n_replace = re.subn(pattern, replacement, new_key)
        if n_replace > 0:
            break
    return new_key


def _mmengine_revise(key, revise_keys):
    """mmengine's `_load_checkpoint_to_model`: every pair in turn, `re.sub` on each key."""
    for p, r in revise_keys:
        key = re.sub(p, r, key)
    return key


@pytest.mark.parametrize("make", [llama_hf_to_tune, moe_hf_to_tune, blocks_regrouped, backbone_renamed])
def test_key_mapping_works_as_transformers_4_applies_it(make):
    mapping = make()
    key_mapping = rules_to_key_mapping(infer_rules(mapping))
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in key_mapping.items())
    assert {k: _transformers4_rename(k, key_mapping) for k in mapping} == mapping


@pytest.mark.parametrize("make", [llama_hf_to_tune, moe_hf_to_tune, blocks_regrouped, backbone_renamed])
def test_revise_keys_work_as_mmengine_applies_them(make):
    mapping = make()
    revise_keys = rules_to_revise_keys(infer_rules(mapping))
    assert all(isinstance(pair, tuple) and len(pair) == 2 for pair in revise_keys)
    assert {k: _mmengine_revise(k, revise_keys) for k in mapping} == mapping


def test_key_mapping_in_the_installed_transformers_5():
    loading = pytest.importorskip("transformers.core_model_loading")
    if not hasattr(loading, "rename_source_key") or not hasattr(loading, "WeightRenaming"):
        pytest.skip("transformers without core_model_loading.rename_source_key (4.x): covered above")

    def load_names(rules, keys):
        # What from_pretrained(key_mapping=...) does with each checkpoint key, before the
        # model's own conversions: one WeightRenaming per entry, every one applied in turn.
        renamings = [loading.WeightRenaming(source_patterns=k, target_patterns=v)
                     for k, v in rules_to_key_mapping(rules).items()]
        return {k: loading.rename_source_key(k, renamings, [])[0] for k in keys}

    llama = llama_hf_to_tune(n_layers=4)
    assert load_names(infer_rules(llama), llama) == llama
    # Transformers 5 substitutes only `\1`: two-group rules need max_groups=1 there.
    moe = moe_hf_to_tune(n_layers=3, n_experts=4)
    assert load_names(infer_rules(moe, max_groups=1), moe) == moe


def _torchtune_get_mapped_key(key, mapping_dict):
    """torchtune's `models/convert_weights.get_mapped_key` (one layer number per key)."""
    if any(k.isdigit() for k in key.split(".")):
        abstract_key = re.sub(r"(\.\d+)", ".{}", key)
        layer_num = re.search(r"\d+", key).group(0)
        return mapping_dict[abstract_key].format(layer_num)
    return mapping_dict[key]


def test_torchtune_table_round_trip():
    mapping = llama_hf_to_tune()
    table = rules_to_torchtune_table(infer_rules(mapping), mapping)
    assert len(table) == len(_LLAMA_LAYER) + len(_LLAMA_GLOBAL)
    assert table["model.layers.{}.self_attn.q_proj.weight"] == "layers.{}.attn.q_proj.weight"
    assert {k: _torchtune_get_mapped_key(k, table) for k in mapping} == mapping
    inverse = {v: k for k, v in table.items()}  # tune_to_hf, as torchtune writes it
    assert {v: _torchtune_get_mapped_key(v, inverse) for v in mapping.values()} == {v: k for k, v in mapping.items()}


def test_torchtune_table_with_two_numbers_per_key():
    mapping = moe_hf_to_tune(n_layers=3, n_experts=4)
    table = rules_to_torchtune_table(infer_rules(mapping), mapping)
    key = "model.layers.{}.mlp.experts.{}.up_proj.weight"
    assert table[key] == "layers.{}.ffn.experts.{}.w3.weight"
    assert table[key].format("2", "3") == mapping["model.layers.2.mlp.experts.3.up_proj.weight"]


def test_torchtune_table_refuses_changed_numbers():
    mapping = blocks_regrouped()
    with pytest.raises(MappingError, match=r"'blocks\.0\.attn\.qkv\.weight' -> 'stages\.0\.0\.attn\.qkv\.weight' cannot"):
        rules_to_torchtune_table(infer_rules(mapping), mapping)


def test_torchtune_table_refuses_rules_of_another_mapping():
    with pytest.raises(MappingError, match=r"do not rename 'a\.w' to 'b\.w'"):
        rules_to_torchtune_table([], {"a.w": "b.w"})


def test_torchtune_table_refuses_keys_only_the_numbers_tell_apart():
    mapping = {"layers.0.w": "layers.0.w", "layers.1.w": "layers.1.v"}
    with pytest.raises(MappingError, match=r"'layers\.0\.w' and 'layers\.1\.w' share the table key"):
        rules_to_torchtune_table(infer_rules(mapping), mapping)


def test_superscript_and_other_unicode_digits_are_not_numbers():
    """'¹'.isdigit() is True but int('¹') fails: only decimal digits are read as positions."""
    mapping = {"": "¹", "a.¹.b": "x.¹.y", "a.١.b": "x.١.y"}
    assert check_rules(infer_rules(mapping), mapping) == []


def test_rule_forms_of_a_plan_are_checked_and_serialised():
    from weight_mapper.plan import MappingPlan, PlanEntry
    from weight_mapper.rules import rule_forms

    mapping = blocks_regrouped()
    entries = tuple(PlanEntry((s,), t, None, 1.0, 1.0, "tensor", (2,), (2,)) for s, t in mapping.items())
    fused = PlanEntry(("q", "k"), "qk", "concat", 1.0, 1.0, "tensor", (2,), (4,), args={"dim": 0})
    forms = rule_forms(MappingPlan(entries + (fused,)))
    assert check_rules(list(forms.rules), mapping) == [] and not forms.refused
    data = forms.to_dict()
    assert data["key_mapping"] == {r.pattern: r.replacement for r in forms.rules} and "refused" not in data
    assert data["not_renames"] == [{"target": "qk", "source": ["q", "k"], "transform": "concat"}]
