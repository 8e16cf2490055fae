import warnings

import pytest
import torch
from torch import nn

from fixture_models import SHORTCUT_TRUTH, BatchNormed, ShortcutFirst, ShortcutLast, Tied
from weight_mapper import WeightMapper
from weight_mapper.flow import (
    REAL_RUN_MAX_PARAMS,
    auto_execution_order,
    flow_positions,
    record_execution_order,
    synthesize_input,
    trace_execution_order,
)
from weight_mapper.plan import MappingPlan
from weight_mapper.table import TensorTable

X = torch.randn(1, 3, 8, 8)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def shortcut_truth(source: nn.Module) -> dict[str, str]:
    """Every ShortcutFirst tensor -> its ShortcutLast name."""
    out = {}
    for name in source.state_dict():
        if not name.startswith("trunk."):
            out[name] = name
            continue
        _, stage, block, rest = name.split(".", 3)
        module = next(m for m in SHORTCUT_TRUTH if rest.startswith(m + "."))
        out[name] = f"stages.{int(stage.removeprefix('block')) - 1}.{block}.{SHORTCUT_TRUTH[module]}{rest[len(module):]}"
    return out


def test_execution_order_is_recorded_and_the_model_left_as_it_was():
    model = BatchNormed().train()
    order = record_execution_order(model, X)
    assert order["conv1"] < order["bn1"] < order["conv2"] < order["fc"]
    assert order["conv1.weight"] == order["conv1"]
    assert model.training
    table = TensorTable.from_module(model, exec_order=order)
    assert table.exec_pos[table.name2row["bn1.num_batches_tracked"]] == order["bn1"]  # unused in eval: its module's


@pytest.mark.parametrize("order_of", [lambda m: record_execution_order(m, X), trace_execution_order],
                         ids=["dummy_input", "trace"])
def test_a_shortcut_sits_mid_branch_however_the_code_orders_it(order_of):
    first, last = order_of(ShortcutFirst()), order_of(ShortcutLast())
    # torchvision-style: proj defined and run before f.a; timm-style: downsample after conv3.
    assert first["trunk.block1.0.f.a"] < first["trunk.block1.0.proj"] < first["trunk.block1.0.f.c"]
    assert last["stages.0.0.conv1"] < last["stages.0.0.downsample"] < last["stages.0.0.conv3"]
    for src, tgt in shortcut_truth(ShortcutFirst()).items():
        if src.endswith("num_batches_tracked"):  # eval-mode BatchNorm does not read it
            continue
        assert first[src] == pytest.approx(last[tgt], abs=0.01), src


@pytest.mark.parametrize("options", [{"dummy_input": X}, {}], ids=["dummy_input", "trace"])
def test_shortcut_defined_first_maps_onto_shortcut_defined_last(options):
    source, target = ShortcutFirst().eval(), ShortcutLast().eval()
    mapper = WeightMapper(source, target, **options)
    assert mapper.suggest_mapping() == shortcut_truth(source)
    assert mapper.verify(source, target, X).ok


def test_without_the_data_flow_the_shortcut_is_swapped():
    """What the flow fixes: definition order alone pairs proj with conv1 (RegNet, issue 4)."""
    mapping = WeightMapper(ShortcutFirst(), ShortcutLast(), trace=False).suggest_mapping()
    assert mapping["trunk.block1.0.proj.0.weight"] == "stages.0.0.conv1.0.weight"


class Untraceable(nn.Module):
    """Branches on a tensor value: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) if x.sum() > 0 else self.b(x)


def test_untraceable_models_get_no_trace_and_no_warning():
    assert trace_execution_order(Untraceable()) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mapper = WeightMapper(Untraceable(), Untraceable())
    # It branches on a value, so it cannot run on meta either; small, it runs for real.
    assert mapper.flow_sources == ("real-synthetic", "real-synthetic")
    assert mapper.suggest_mapping()["a.weight"] == "a.weight"
    assert mapper.get_plan().flow_sources == ("real-synthetic", "real-synthetic")


def test_without_any_flow_the_plan_says_none():
    mapper = WeightMapper(Untraceable(), Untraceable(), trace=False)
    assert torch.isnan(torch.from_numpy(mapper.source_table.exec_pos)).all()
    assert mapper.get_plan().flow_sources == ("none", "none")


class DerivedWeight(nn.Module):
    """Reads its parameter through ``.t()`` and keyword arguments, inside one forward."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.randn(4, 4))
        self.last = nn.Linear(4, 2)

    def forward(self, x, *, scale=1.0):
        return self.last(torch.matmul(self.first(x), self.w.t()) * scale)


def test_a_parameter_is_placed_where_it_meets_the_data_not_where_it_is_transposed():
    x = torch.randn(2, 4)
    for order in (record_execution_order(DerivedWeight(), {"x": x, "scale": 2.0}), trace_execution_order(DerivedWeight())):
        assert order["first.weight"] < order["w"] < order["last.weight"]


def test_tied_weights_are_placed_at_their_first_use():
    order = record_execution_order(Tied(), torch.tensor([[1, 2]]))
    assert order["embed.weight"] == 0.0


def test_flow_positions_of_nothing_is_empty():
    assert flow_positions([], [""]) == {}



# ------------------------------------------------------------------ zero-config flow (meta device)
transformers = pytest.importorskip("transformers")


def _tiny_llama(device="cpu"):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    with torch.device(device):
        return transformers.LlamaForCausalLM(config)


def _tiny_bert():
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64)
    return transformers.BertModel(config)


def test_hugging_face_models_get_a_meta_flow_without_dummy_input():
    llama = _tiny_llama()
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    mapper = WeightMapper(llama, _tiny_llama())
    assert mapper.flow_sources == ("meta-synthetic", "meta-synthetic")
    assert not torch.isnan(torch.from_numpy(mapper.source_table.exec_pos)).any()
    # The model is untouched: same device, same values, same training flag.
    after = llama.state_dict()
    assert all(after[k].device.type == "cpu" and torch.equal(after[k], v) for k, v in before.items())
    plan = MappingPlan.from_json(mapper.get_plan().to_json())
    assert plan.flow_sources == ("meta-synthetic", "meta-synthetic")
    assert plan.inverse().flow_sources == ("meta-synthetic", "meta-synthetic")


@pytest.mark.parametrize("build", [_tiny_llama, _tiny_bert], ids=["llama", "bert"])
def test_the_meta_flow_is_the_real_flow(build):
    model = build().eval()
    order, how = auto_execution_order(model)
    assert how == "meta-synthetic"
    assert order == record_execution_order(model, synthesize_input(model))


def test_a_model_built_on_meta_gets_a_flow():
    order, how = auto_execution_order(_tiny_llama("meta"))
    assert how == "meta-synthetic"
    assert order["model.embed_tokens.weight"] < order["model.layers.0.self_attn.q_proj.weight"] < order["lm_head.weight"]


def test_synthesized_inputs_follow_the_first_input_layer():
    assert synthesize_input(nn.Sequential(nn.Conv1d(2, 4, 3))).shape == (1, 2, 1024)
    assert synthesize_input(nn.Sequential(nn.Linear(7, 2), nn.Linear(2, 1))).shape == (1, 7)
    assert synthesize_input(nn.Sequential(nn.ReLU())) is None
    vit = transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                       intermediate_size=64, image_size=32, patch_size=8))
    assert synthesize_input(vit)["pixel_values"].shape == (1, 3, 32, 32)
    assert auto_execution_order(vit)[1] == "meta-synthetic"


def test_a_large_model_that_fails_on_meta_gets_no_flow(monkeypatch):
    monkeypatch.setattr("weight_mapper.flow.REAL_RUN_MAX_PARAMS", 10)
    assert REAL_RUN_MAX_PARAMS == 50_000_000  # the default
    assert auto_execution_order(Untraceable()) == (None, "none")


def test_operation_arguments_give_their_tensors_in_order():
    from collections import namedtuple

    from weight_mapper.flow import _tensors

    a, b, c = torch.ones(1), torch.zeros(2), torch.ones(3)
    pair = namedtuple("Pair", "x y")(b, 3)
    found = _tensors(((a, [None, 2.0, torch.float32, (b,)]), {"weight": c, "dim": 0, "pair": pair}))
    assert [id(t) for t in found] == [id(a), id(b), id(c), id(b)]
    assert _tensors(torch.Size([2])) == [] and _tensors(c) == [c]
