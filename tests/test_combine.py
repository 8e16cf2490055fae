"""Conversions that are not renames: fused q/k/v, transposed Conv1D, stacked experts, reshapes."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from reference_encoders import ExpertList, FusedExperts, LinearGPT2, StackedExperts, TorchBert
from weight_mapper import MappingPlan, WeightMapper, apply_plan

transformers = pytest.importorskip("transformers")


def round_trip(mapper, source_sd):
    """plan -> apply -> inverse -> apply gives the source back exactly; JSON keeps the plan."""
    plan = mapper.get_plan()
    plan = MappingPlan.from_json(plan.to_json())
    converted = apply_plan(plan, source_sd)
    back = apply_plan(plan.inverse(), converted)
    assert back.keys() == source_sd.keys()
    assert all(torch.equal(back[k], v) for k, v in source_sd.items())
    return converted


def test_bert_separate_qkv_fuse_into_in_proj():
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16)
    hf = transformers.BertModel(config, add_pooling_layer=False).eval()
    tb = TorchBert(50, 32, 4, 64, 3, 16).eval()
    mapper = WeightMapper(hf, tb)
    mapper.suggest_mapping()
    plan = mapper.get_plan()
    fused = {e.target: e for e in plan.entries if e.transform == "concat"}
    assert set(fused) == {f"layers.{i}.self_attn.in_proj_{k}" for i in range(3) for k in ("weight", "bias")}
    assert fused["layers.2.self_attn.in_proj_weight"].source == tuple(
        f"encoder.layer.2.attention.self.{p}.weight" for p in ("query", "key", "value"))
    assert mapper.get_unmatched() == {"source": [], "target": []}
    tb.load_state_dict(round_trip(mapper, hf.state_dict()), strict=True)
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert torch.allclose(hf(ids).last_hidden_state, tb(ids), atol=1e-5)


def test_gpt2_conv1d_weights_are_transposed_into_linear():
    config = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16)
    hf = transformers.GPT2Model(config).eval()
    ours = LinearGPT2(50, 32, 4, 2, 16).eval()
    mapper = WeightMapper(hf, ours)
    mapping = mapper.suggest_mapping()
    assert mapping["h.1.attn.c_attn.weight"] == "blocks.1.qkv.weight"
    transforms = {e.target: e.transform for e in mapper.get_plan().entries}
    # c_proj is square: only the module types (Conv1D vs Linear) say it must be transposed.
    assert transforms["blocks.0.proj.weight"] == "transpose"
    assert transforms["blocks.0.qkv.weight"] == "transpose"
    assert transforms["blocks.0.qkv.bias"] is None
    ours.load_state_dict(round_trip(mapper, hf.state_dict()), strict=True)
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert torch.allclose(hf(ids).last_hidden_state, ours(ids), atol=1e-5)


def test_module_list_of_experts_stacks_into_3d_tensors():
    src, tgt = ExpertList(8, 16, 4).eval(), StackedExperts(8, 16, 4).eval()
    mapper = WeightMapper(src, tgt)
    mapping = mapper.suggest_mapping()
    assert mapping["gate.weight"] == "router.weight"
    stacked = {e.target: e.source for e in mapper.get_plan().entries if e.transform == "stack"}
    assert stacked == {f"w{k}": tuple(f"experts.{e}.w{k}.weight" for e in range(4)) for k in (1, 2, 3)}
    tgt.load_state_dict(round_trip(mapper, src.state_dict()), strict=True)
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.allclose(src(x), tgt(x), atol=1e-6)


def test_experts_stack_and_fuse_into_gate_up_proj():
    """transformers 5's MoE layout: per-expert w1 and w3 -> one [E, 2H, D] gate_up_proj."""
    src, tgt = ExpertList(8, 16, 4).eval(), FusedExperts(8, 16, 4).eval()
    mapper = WeightMapper(src, tgt)
    mapper.suggest_mapping()
    entries = {e.target: e for e in mapper.get_plan().entries}
    gate_up = entries["gate_up_proj"]
    assert gate_up.transform == "stack_concat" and gate_up.args["parts"] == 2 and gate_up.args["concat_dim"] == 1
    assert gate_up.source == tuple(f"experts.{e}.w{k}.weight" for k in (1, 3) for e in range(4))
    assert entries["down_proj"].transform == "stack"
    tgt.load_state_dict(round_trip(mapper, src.state_dict()), strict=True)
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.allclose(src(x), tgt(x), atol=1e-6)


class LayerScaleConv(nn.Module):
    """ConvNeXt-style layer scale kept as [C, 1, 1] and a 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(8, 8, 1)
        self.gamma = nn.Parameter(torch.randn(8, 1, 1))

    def forward(self, x):  # x: [B, C, H, W]
        return x + self.gamma * self.pw(x)


class LayerScaleLinear(nn.Module):
    """The same block channels-last: layer scale [C] and a Linear."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.ls = nn.Parameter(torch.ones(8))

    def forward(self, x):
        y = x.permute(0, 2, 3, 1)
        return x + (self.ls * self.fc(y)).permute(0, 3, 1, 2)


def test_layer_scale_and_pointwise_conv_are_reshaped():
    src, tgt = LayerScaleConv(), LayerScaleLinear()
    mapper = WeightMapper(src, tgt)
    assert mapper.suggest_mapping() == {"pw.weight": "fc.weight", "pw.bias": "fc.bias", "gamma": "ls"}
    transforms = {e.target: (e.transform, dict(e.args)) for e in mapper.get_plan().entries}
    assert transforms["ls"] == ("reshape", {"shape": [8]})
    assert transforms["fc.weight"] == ("reshape", {"shape": [8, 8]})
    tgt.load_state_dict(round_trip(mapper, src.state_dict()), strict=True)
    x = torch.randn(2, 8, 3, 3)
    with torch.no_grad():
        assert torch.allclose(src(x), tgt(x), atol=1e-6)


def test_grouped_query_attention_unequal_parts_concat():
    class Separate(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.ModuleDict({"q_proj": nn.Linear(16, 16, bias=False), "k_proj": nn.Linear(16, 4, bias=False),
                                       "v_proj": nn.Linear(16, 4, bias=False)})

    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.ModuleDict({"qkv": nn.Linear(16, 24, bias=False)})

    src = Separate()
    mapper = WeightMapper(src, Fused())
    mapper.suggest_mapping()
    (entry,) = mapper.get_plan().entries
    assert entry.transform == "concat" and entry.args["sizes"] == [16, 4, 4]
    round_trip(mapper, src.state_dict())


def test_verify_reports_the_output_difference_and_untouched_tensors():
    src, tgt = ExpertList(8, 16, 4), StackedExperts(8, 16, 4)
    x = torch.randn(5, 8)
    mapper = WeightMapper(src, tgt, dummy_input=x)
    mapper.suggest_mapping()
    report = mapper.verify()
    assert report.ok and report.max_abs_diff < 1e-6 and report.untouched == ()
    assert "conversion verified" in report.message()
    partial = WeightMapper(src, StackedExperts(8, 16, 4))
    partial.suggest_mapping(strategy="shape_only")  # no combinations: the experts stay unfilled
    bad = partial.verify(src, StackedExperts(8, 16, 4), x)
    assert not bad.ok and set(bad.untouched) == {"w1", "w2", "w3"}
    assert "left at their initial values" in bad.message()


@pytest.mark.parametrize("pair", ["bert", "gpt2", "experts", "layer_scale"])
def test_rules_reproduce_the_renames(pair):
    from weight_mapper.rules import check_rules

    if pair == "bert":
        config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=16)
        src, tgt = transformers.BertModel(config, add_pooling_layer=False), TorchBert(50, 32, 4, 64, 3, 16)
    elif pair == "gpt2":
        config = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16)
        src, tgt = transformers.GPT2Model(config), LinearGPT2(50, 32, 4, 2, 16)
    elif pair == "experts":
        src, tgt = ExpertList(8, 16, 4), StackedExperts(8, 16, 4)
    else:
        src, tgt = LayerScaleConv(), LayerScaleLinear()
    mapper = WeightMapper(src, tgt)
    mapper.suggest_mapping()
    renames = {e.source[0]: e.target for e in mapper.get_plan().entries if len(e.source) == 1}
    rules = mapper.export_rules()
    assert check_rules(rules, renames) == []
    assert len(rules) <= max(len(renames), 1)


def test_layer_scale_one_level_shallower_than_its_layers_is_reshaped_into_place():
    """ConvNeXt, torchvision -> timm: the context must see through a Sequential of difference."""
    from fixture_models import FlatLayerScale, NestedLayerScale

    src, tgt = NestedLayerScale().eval(), FlatLayerScale().eval()
    mapper = WeightMapper(src, tgt)
    mapper.suggest_mapping()
    scales = {e.target: e.source[0] for e in mapper.get_plan().entries if e.transform == "reshape"}
    assert scales == {f"stages.{s}.blocks.{b}.gamma": f"features.{2 * s}.{b}.layer_scale" for s in (0, 1) for b in (0, 1)}
    tgt.load_state_dict(round_trip(mapper, src.state_dict()), strict=True)
    assert mapper.verify(src, tgt, torch.randn(2, 4, 6, 6)).ok


class FlatHead(nn.Module):
    """A Linear classifier over the flattened [C, H, W] map (torchvision's VGG)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 4, 3, padding=1)
        self.classifier = nn.Linear(4 * 5 * 5, 6)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class ConvHead(nn.Module):
    """The same head as a conv whose kernel covers the whole map (timm's ConvMlp)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Conv2d(4, 6, 5)

    def forward(self, x):
        return self.fc(self.features(x)).flatten(1)


def test_a_linear_over_a_flattened_map_is_reshaped_into_a_full_kernel_conv():
    src, tgt = FlatHead().eval(), ConvHead().eval()
    mapper = WeightMapper(src, tgt)
    assert mapper.suggest_mapping()["classifier.weight"] == "fc.weight"
    entry = next(e for e in mapper.get_plan().entries if e.target == "fc.weight")
    assert entry.transform == "reshape" and entry.args["shape"] == [6, 4, 5, 5]
    tgt.load_state_dict(round_trip(mapper, src.state_dict()), strict=True)
    assert mapper.verify(src, tgt, torch.randn(2, 3, 5, 5)).ok


# ---------------------------------------------------------------- target order and splits
_LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False, rms_norm_eps=1e-5,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _phi3_and_llama():
    """Phi-3 fuses q/k/v (GQA: 32 + 16 + 16 rows) and gate/up; Llama keeps them apart. Same math."""
    phi = transformers.Phi3ForCausalLM(transformers.Phi3Config(**_LLAMA)).eval()
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_LLAMA)).eval()
    return phi, llama


def _fused_to_separate(sd):
    """The conversion by hand: what every plan below must reproduce exactly."""
    out = {}
    for k, v in sd.items():
        if "qkv_proj" in k:
            for part, piece in zip(("q_proj", "k_proj", "v_proj"), v.split([32, 16, 16])):
                out[k.replace("qkv_proj", part)] = piece
        elif "gate_up_proj" in k:
            for part, piece in zip(("gate_proj", "up_proj"), v.chunk(2)):
                out[k.replace("gate_up_proj", part)] = piece
        else:
            out[k] = v
    return out


def _sorted_table(sd):
    from weight_mapper.table import TensorTable

    return TensorTable.from_state_dict(sd, natural_order=True)  # as from a safetensors header


@pytest.mark.parametrize("source_kind", ["model", "state_dict", "sorted"])
def test_fused_qkv_and_gate_up_split_into_separate_targets(source_kind):
    phi, llama = _phi3_and_llama()
    sd = phi.state_dict()
    source = {"model": phi, "state_dict": sd, "sorted": _sorted_table(sd)}[source_kind]
    mapper = WeightMapper(source, llama)
    plan = mapper.get_plan()
    pieces = [e for e in plan.entries if e.source == ("model.layers.1.self_attn.qkv_proj.weight",)]
    assert [(e.target.split(".")[-2], e.transform, e.args["start"], e.args["length"]) for e in pieces] == [
        ("q_proj", "slice", 0, 32), ("k_proj", "slice", 32, 16), ("v_proj", "slice", 48, 16)]
    assert {e.level for e in pieces} == {"split"}
    assert plan.unmatched_source == () and plan.unmatched_target == ()
    converted = round_trip(mapper, sd)
    truth = _fused_to_separate(sd)
    assert converted.keys() == truth.keys() and all(torch.equal(converted[k], truth[k]) for k in truth)
    llama.load_state_dict(converted, strict=True)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.allclose(phi(ids).logits, llama(ids).logits, atol=1e-5)
    # The inverse of the split pieces is the concat, sources in the fused tensor's order.
    merged = {e.target: e for e in plan.inverse().entries}["model.layers.1.mlp.gate_up_proj.weight"]
    assert merged.transform == "concat" and [s.split(".")[-2] for s in merged.source] == ["gate_proj", "up_proj"]


def test_sorted_separate_qkv_fuse_in_the_targets_order():
    phi, llama = _phi3_and_llama()
    sd = llama.state_dict()
    mapper = WeightMapper(_sorted_table(sd), phi)  # sorted keys: k_proj < o_proj < q_proj < v_proj
    fused = {e.target: e for e in mapper.get_plan().entries}["model.layers.0.self_attn.qkv_proj.weight"]
    assert fused.transform == "concat"
    assert [s.split(".")[-2] for s in fused.source] == ["q_proj", "k_proj", "v_proj"]
    assert fused.args["sizes"] == [32, 16, 16]
    phi.load_state_dict(round_trip(mapper, sd), strict=True)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.allclose(phi(ids).logits, llama(ids).logits, atol=1e-5)


@pytest.mark.parametrize("sorted_source", [False, True])
def test_torch_in_proj_splits_into_hf_query_key_value(sorted_source):
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16)
    hf = transformers.BertModel(config, add_pooling_layer=False).eval()
    tb = TorchBert(50, 32, 4, 64, 3, 16).eval()
    sd = tb.state_dict()
    mapper = WeightMapper(_sorted_table(sd) if sorted_source else tb, hf)
    plan = mapper.get_plan()
    pieces = {e.target: e for e in plan.entries if e.source == ("layers.2.self_attn.in_proj_weight",)}
    assert {t: e.args["start"] for t, e in pieces.items()} == {
        f"encoder.layer.2.attention.self.{p}.weight": 32 * i for i, p in enumerate(("query", "key", "value"))}
    hf.load_state_dict(round_trip(mapper, sd), strict=True)
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert torch.allclose(hf(ids).last_hidden_state, tb(ids), atol=1e-5)


def test_a_split_source_is_read_once():
    from weight_mapper.plan import MappingPlan, PlanEntry
    from weight_mapper.transforms import invert_entries

    merged = PlanEntry(("q", "k", "v"), "qkv", "concat", 1.0, 1.0, "combined", (2, 3), (6, 3),
                       args={"dim": 0, "sizes": [2, 2, 2]})
    plan = MappingPlan(tuple(invert_entries([merged])))

    class Counting(dict):
        reads = 0

        def __getitem__(self, key):
            Counting.reads += 1
            return super().__getitem__(key)

    qkv = torch.arange(18.0).reshape(6, 3)
    out = apply_plan(plan, Counting(qkv=qkv))
    assert Counting.reads == 1
    assert torch.equal(torch.cat([out["q"], out["k"], out["v"]]), qkv)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)


class _Detector(nn.Module):
    """The classifier's block under ``backbone.body.``, and a new head whose bias (8) is the size of
    ``bn1.weight`` and ``bn2.weight`` together."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.body = _Block()
        self.head = nn.Conv2d(4, 8, 1)


def test_a_combination_never_takes_a_tensor_matched_to_its_own_name():
    source = _Block()
    mapper = WeightMapper(source.state_dict(), _Detector())
    mapper.suggest_mapping()
    plan = mapper.get_plan()
    mapping = plan.mapping
    for key in source.state_dict():
        assert mapping.get(key) == f"backbone.body.{key}", key
    assert "head.bias" in plan.unmatched_target


@given(st.lists(st.sampled_from(["0", "7", "12", "experts", "w1", "layers", "a", ""]), min_size=1, max_size=6).map(".".join))
def test_item_key_stars_the_last_numeric_component(name):
    from weight_mapper.combine import _item_key

    parts = name.split(".")
    numeric = [i for i, p in enumerate(parts) if p.isdecimal()]
    want = None if not numeric else (".".join(parts[:numeric[-1]] + ["*"] + parts[numeric[-1] + 1:]), int(parts[numeric[-1]]))
    assert _item_key(name) == want
