"""The layer-wise proof, its repair, on-disk names, and its errors."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from weight_mapper import ConversionError, MappingPlan, PlanEntry, WeightMapper
from weight_mapper.verify import verify_conversion

_TESTS = Path(__file__).parent


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class Chain(nn.Module):
    """Three square layers in a row: a wrong entry shows at its own layer first."""

    def __init__(self):
        super().__init__()
        self.first, self.middle, self.last = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.last(torch.tanh(self.middle(torch.tanh(self.first(x)))))


class RenamedChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return {"logits": self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))}  # a dict output


_CHAIN = {"first": "a", "middle": "b", "last": "c"}


def _chain_plan(**changes) -> MappingPlan:
    src = Chain()
    entries = []
    for s, t in _CHAIN.items():
        for leaf in ("weight", "bias"):
            shape = tuple(getattr(src, s).state_dict()[leaf].shape)
            entries.append(PlanEntry((f"{s}.{leaf}",), f"{t}.{leaf}", None, 0.9, 0.5, "group", shape, shape))
    plan = MappingPlan(tuple(entries))
    return replace(plan, entries=tuple(changes.get(e.target, lambda e: e)(e) for e in plan.entries))


def test_an_exact_conversion_is_proved_entry_by_entry():
    src, x = Chain(), torch.randn(3, 4)
    report = verify_conversion(_chain_plan(), src, RenamedChain(), x)
    assert report.ok and report.first_divergence is None
    assert set(report.entry_status.values()) == {"proved"} and len(report.entry_status) == 6
    assert {e.provenance for e in report.plan.entries} == {"proved"}
    assert report.n_forward == 2 and "6 entries proved, 0 diverge, 0 not reached" in report.message()


def test_the_first_divergence_names_the_module_and_the_entries_feeding_it():
    transposed = {"b.weight": lambda e: replace(e, transform="transpose")}
    report = verify_conversion(_chain_plan(**transposed), Chain(), RenamedChain(), torch.randn(3, 4))
    assert not report.ok
    assert (report.first_divergence.source, report.first_divergence.target) == ("middle", "b")
    assert report.entry_status == {"a.weight": "proved", "a.bias": "proved", "b.weight": "diverges",
                                   "b.bias": "diverges", "c.weight": "not reached", "c.bias": "not reached"}
    assert "first divergence: middle -> b" in report.message() and "b.weight, b.bias" in report.message()
    statuses = {c.target: c.status for c in report.modules}
    assert statuses == {"a": "match", "b": "diverges", "c": "inherits", "": "diverges"}


def test_repair_undoes_a_wrong_transpose_of_a_square_weight():
    transposed = {"b.weight": lambda e: replace(e, transform="transpose")}
    report = verify_conversion(_chain_plan(**transposed), Chain(), RenamedChain(), torch.randn(3, 4), repair=True)
    assert report.ok and report.repairs == ("b: b.weight not transposed",)
    by_target = {e.target: e for e in report.plan.entries}
    assert by_target["b.weight"].transform is None and by_target["b.weight"].provenance == "repaired"
    assert by_target["c.weight"].provenance == "proved"
    assert report.n_forward == 3  # the source once, the target once, one trial


def test_repair_exchanges_the_sources_of_two_modules_matched_the_wrong_way_round():
    swap = {"a.weight": lambda e: replace(e, source=("middle.weight",)),
            "a.bias": lambda e: replace(e, source=("middle.bias",)),
            "b.weight": lambda e: replace(e, source=("first.weight",)),
            "b.bias": lambda e: replace(e, source=("first.bias",))}
    report = verify_conversion(_chain_plan(**swap), Chain(), RenamedChain(), torch.randn(3, 4), repair=True)
    assert report.ok, report.message()
    mapping = report.plan.mapping
    assert mapping["first.weight"] == "a.weight" and mapping["middle.bias"] == "b.bias"
    assert {e.provenance for e in report.plan.entries if e.target.startswith(("a.", "b."))} == {"repaired"}


class Separate(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.q(x) + 2 * self.k(x) + 3 * self.v(x)


class Fused(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12)

    def forward(self, x):
        q, k, v = self.qkv(x).split(4, dim=-1)
        return q + 2 * k + 3 * v


def test_repair_finds_the_order_of_a_concatenation():
    shapes = [[4, 4]] * 3
    entries = (
        PlanEntry(("k.weight", "q.weight", "v.weight"), "qkv.weight", "concat", 0.9, 0.5, "combined", (4, 4), (12, 4),
                  args={"dim": 0, "sizes": [4, 4, 4], "source_shapes": shapes}),
        PlanEntry(("k.bias", "q.bias", "v.bias"), "qkv.bias", "concat", 0.9, 0.5, "combined", (4,), (12,),
                  args={"dim": 0, "sizes": [4, 4, 4], "source_shapes": [[4]] * 3}),
    )
    report = verify_conversion(MappingPlan(entries), Separate(), Fused(), torch.randn(3, 4), repair=True)
    assert report.ok, report.message()
    assert [e.source for e in report.plan.entries] == [("q.weight", "k.weight", "v.weight"),
                                                      ("q.bias", "k.bias", "v.bias")]


class Branches(nn.Module):
    """Two parallel branches: names and shapes cannot tell them apart, call order decides."""

    def __init__(self):
        super().__init__()
        self.p, self.q = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.p(x) - 2 * self.q(x)


class FlippedBranches(nn.Module):
    """The same computation; u is p, w is q, but w runs first."""

    def __init__(self):
        super().__init__()
        self.u, self.w = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return -2 * self.w(x) + self.u(x)


def test_suggest_mapping_repairs_what_the_matcher_got_wrong_when_it_can_run_both_models():
    src, x = Branches(), torch.randn(3, 4)
    wrong = WeightMapper(src, FlippedBranches(), dummy_input=x).suggest_mapping(repair=False)
    assert wrong["p.weight"] == "w.weight"  # call order decided, and the flipped model calls w first
    repaired = WeightMapper(src, FlippedBranches(), dummy_input=x)
    assert repaired.suggest_mapping() == {"p.weight": "u.weight", "p.bias": "u.bias", "q.weight": "w.weight",
                                          "q.bias": "w.bias"}
    assert repaired.verification.ok and any("repaired" in n for n in repaired.notes)
    assert {e.provenance for e in repaired.get_plan().entries} == {"repaired"}
    assert json.loads(repaired.get_plan().to_json())["entries"][0]["provenance"] == "repaired"


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)

    def forward(self, x):
        return self.body(x)


class EncoderWithPooler(nn.Module):
    def __init__(self, pooled_output_first=False):
        super().__init__()
        self.body, self.pooler = nn.Linear(4, 4), nn.Linear(4, 4)
        self.pooled_output_first = pooled_output_first

    def forward(self, x):
        h = self.body(x)
        pooled = torch.tanh(self.pooler(h[:, :1]))
        return (pooled, h) if self.pooled_output_first else (h, pooled)


def test_a_target_only_pooler_that_feeds_nothing_compared_is_a_warning_not_a_failure():
    src = Encoder()
    mapper = WeightMapper(src, EncoderWithPooler(), dummy_input=torch.randn(2, 3, 4))
    mapper.suggest_mapping()
    report = mapper.verify()
    assert report.ok and report.max_abs_diff == 0
    assert set(report.untouched) == set(report.idle) == {"pooler.weight", "pooler.bias"}
    assert "do not feed the compared outputs" in report.message()


class EncoderWithBias(nn.Module):
    """Encoder plus a target-only learned offset that feeds the output."""

    def __init__(self):
        super().__init__()
        self.body, self.offset = nn.Linear(4, 4), nn.Parameter(torch.randn(4))

    def forward(self, x):
        return self.body(x) + self.offset


def test_an_unfilled_tensor_that_feeds_the_compared_output_fails():
    mapper = WeightMapper(Encoder(), EncoderWithBias(), dummy_input=torch.randn(2, 3, 4))
    mapper.suggest_mapping(repair=False)
    report = mapper.verify()
    assert not report.ok and report.unfilled == ("offset",) and report.idle == ()
    assert "1 target tensor(s) left at their initial values: offset" in report.message()


def test_hf_bert_with_a_pooler_the_source_lacks_is_verified():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16)
    src, tgt = transformers.BertModel(config, add_pooling_layer=False), transformers.BertModel(config)
    ids = torch.randint(0, 50, (2, 7))
    mapper = WeightMapper(src, tgt, dummy_input=ids)
    mapper.suggest_mapping(repair=False)
    report = mapper.verify()
    assert report.ok, report.message()
    assert set(report.idle) == {"pooler.dense.weight", "pooler.dense.bias"}
    assert report.counts()["diverges"] == 0


def test_a_size_mismatch_is_our_error_naming_the_tensor():
    entry = PlanEntry(("body.weight",), "body.weight", None, 1, 1, "group", (4, 4), (4, 4))

    class Narrow(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 3)

        def forward(self, x):
            return self.body(x)

    with pytest.raises(ConversionError, match=r"size mismatch for body\.weight.*\[4, 4\].*\[3, 4\]"):
        verify_conversion(MappingPlan((entry,)), Encoder(), Narrow(), torch.randn(2, 4))


def test_a_failing_model_is_our_error():
    with pytest.raises(ConversionError, match="running source Chain on dummy_input failed"):
        verify_conversion(_chain_plan(), Chain(), RenamedChain(), torch.randn(3, 5))


class LegacyNorm(nn.Module):
    """A checkpoint saved with LayerNorm's old names: ``gamma`` / ``beta``."""

    def __init__(self):
        super().__init__()
        self.fc, self.norm = nn.Linear(4, 6), nn.LayerNorm(6)

    def forward(self, x):
        return self.norm(self.fc(x))


def test_verify_maps_on_disk_names_the_model_does_not_use():
    src, tgt = LegacyNorm(), LegacyNorm()
    with torch.no_grad():
        src.norm.weight.uniform_(0.5, 1.5)
        src.norm.bias.uniform_(-1, 1)
    on_disk = {"fc.weight": src.fc.weight, "fc.bias": src.fc.bias, "norm.gamma": src.norm.weight,
               "norm.beta": src.norm.bias}
    mapper = WeightMapper.from_state_dict(on_disk, tgt)
    mapper.suggest_mapping()
    report = mapper.verify(src, tgt, torch.randn(2, 4))
    assert report.ok, report.message()
    assert "mapped onto them by weight_mapper" in report.source_weights


def test_verify_reads_a_transformers_model_through_its_own_saving_path(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
                                        max_position_embeddings=32)
    src = transformers.MixtralForCausalLM(config).eval()
    src.save_pretrained(tmp_path)  # transformers 5 writes the hub names: block_sparse_moe.experts.N.w1 ...
    tgt = transformers.MixtralForCausalLM(config).eval()
    mapper = WeightMapper.from_checkpoint(tmp_path / "model.safetensors", tgt)
    mapper.suggest_mapping()
    assert any("block_sparse_moe" in s for e in mapper.get_plan().entries for s in e.source)
    report = mapper.verify(src, tgt, torch.randint(0, 32, (1, 6)))
    assert report.ok, report.message()
    assert "save_pretrained" in report.source_weights


# ------------------------------------------------------------------------------------ CLI
def test_apply_verify_strict_failure_writes_nothing(tmp_path, monkeypatch, capsys):
    import cli_factories
    from weight_mapper.cli import main

    monkeypatch.syspath_prepend(str(_TESTS))
    old = cli_factories.OldNet()
    with torch.no_grad():
        old.train()(torch.randn(8, 3, 8, 8))
    ckpt = tmp_path / "old.pt"
    torch.save(old.state_dict(), ckpt)
    plan_path = tmp_path / "plan.json"
    assert main(["map", str(ckpt), "cli_factories:new_net", "-o", str(plan_path), "--json"]) == 0
    capsys.readouterr()
    plan = MappingPlan.from_json(plan_path)
    swapped = {"stem.norm.running_mean": "backbone.1.running_var", "stem.norm.running_var": "backbone.1.running_mean"}
    plan = replace(plan, entries=tuple(replace(e, source=(swapped[e.target],)) if e.target in swapped else e
                                       for e in plan.entries))
    bad = tmp_path / "bad.json"
    plan.to_json(bad)
    out = tmp_path / "new.safetensors"
    argv = ["apply", str(ckpt), str(bad), "-o", str(out), "--validate", "cli_factories:new_net",
            "--verify", "cli_factories:old_net", "--input", "cli_factories:example_input"]
    assert main([*argv, "--strict"]) == 1
    captured = capsys.readouterr()
    assert "conversion NOT verified" in captured.out and "first divergence" in captured.out
    assert "nothing was written" in captured.err and not out.exists()
    assert not list(tmp_path.glob(".new*"))  # no temporary file left either
    assert main([*argv, "--strict", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["output"] is None and data["verification"]["ok"] is False and not out.exists()
    assert data["verification"]["first_divergence"]["target"] == "stem.norm"
    assert main(argv) == 0 and out.is_file()  # without --strict the file is written and the verdict printed


def test_the_analysis_and_the_json_report_show_provenance_and_flags():
    from rich.console import Console

    from weight_mapper.report import analysis_renderable, report_dict

    src, x = Branches(), torch.randn(3, 4)
    mapper = WeightMapper(src, FlippedBranches(), dummy_input=x)
    mapper.suggest_mapping()
    console = Console(color_system=None, width=200, record=True)
    console.print(analysis_renderable(mapper.get_plan()))
    text = console.export_text()
    assert "layer-wise proof: 0 proved, 4 repaired, 0 unproved" in text and "repaired" in text
    assert report_dict(mapper.get_plan())["summary"]["provenance"] == {"matched": 0, "repaired": 4, "proved": 0}
    flagged = replace(mapper.get_plan().entries[0], flags=("convention:rotary",))
    console = Console(color_system=None, width=200, record=True)
    console.print(analysis_renderable(replace(mapper.get_plan(), entries=(flagged,))))
    assert "1 entries flagged convention:rotary: one side may keep its rotary" in console.export_text()


def test_apply_verify_loads_a_checkpoint_whose_names_the_source_model_does_not_use(tmp_path, monkeypatch, capsys):
    from cli_factories import NormNet
    from weight_mapper.cli import main

    monkeypatch.syspath_prepend(str(_TESTS))
    net = NormNet()
    with torch.no_grad():
        net.norm.weight.uniform_(0.5, 1.5)
        net.norm.bias.uniform_(-1, 1)
    ckpt = tmp_path / "legacy.pt"
    torch.save({"fc.weight": net.fc.weight.detach(), "fc.bias": net.fc.bias.detach(),
                "norm.gamma": net.norm.weight.detach(), "norm.beta": net.norm.bias.detach()}, ckpt)
    plan = tmp_path / "plan.json"
    assert main(["map", str(ckpt), "cli_factories:renamed_norm_net", "-o", str(plan), "--json"]) == 0
    capsys.readouterr()
    out = tmp_path / "new.safetensors"
    assert main(["apply", str(ckpt), str(plan), "-o", str(out), "--validate", "cli_factories:renamed_norm_net",
                 "--verify", "cli_factories:norm_net", "--input", "cli_factories:norm_input", "--strict"]) == 0
    text = capsys.readouterr().out
    assert "conversion verified" in text and "mapped onto them by weight_mapper" in text and out.is_file()


def test_repair_gives_an_entry_the_tensor_its_siblings_source_module_holds():
    # the weights of a and b exchanged, their biases not: no module pair forms, the whole output differs
    swap = {"a.weight": lambda e: replace(e, source=("middle.weight",)),
            "b.weight": lambda e: replace(e, source=("first.weight",))}
    report = verify_conversion(_chain_plan(**swap), Chain(), RenamedChain(), torch.randn(3, 4), repair=True)
    assert report.ok and report.n_forward == 4, report.message()  # source, target, a transpose, the exchange
    assert report.repairs == ("(root): a.weight <- first.weight and b.weight <- middle.weight (exchanged)",)
