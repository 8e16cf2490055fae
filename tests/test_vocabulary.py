"""Issue 11: names a person reads at a glance, identical keys, sorted headers, partial targets.

Each tiny model pair is one failure the issue lists. Every pair is converted end to end
(plan -> ``apply_plan`` -> ``load_state_dict(strict=True)`` where the target is covered) and
compared by outputs, from the model, from the state dict and from a sorted safetensors file.
The target always *defines* its layers in an order that contradicts the names, so a test
passes only if the names (not registration order) decide.
"""

from __future__ import annotations

import itertools
import json
from importlib import resources

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from weight_mapper import WeightMapper, apply_plan
from weight_mapper.names import COMPONENT_SYNONYMS, ORDINALS, TOKEN_SYNONYMS, component_ordinal, name_tokens
from weight_mapper.table import TensorTable, looks_sorted

D = 16


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _sorted_sd(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as it comes back from a safetensors file: keys sorted by name."""
    sd = model.state_dict()
    return {k: sd[k] for k in sorted(sd)}


def _convert(plan, source: nn.Module, target: nn.Module, *, strict: bool = True) -> nn.Module:
    converted = apply_plan(plan, source.state_dict())
    target.load_state_dict(converted, strict=strict)
    return target


def _ways(source: nn.Module, target: nn.Module, tmp_path):
    """The three ways a user meets a source: the model, its state dict, a sorted safetensors file."""
    yield "model", WeightMapper(source, target)
    yield "sorted state dict", WeightMapper.from_state_dict(_sorted_sd(source), target)
    path = tmp_path / "source.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    yield "safetensors", WeightMapper.from_checkpoint(path, target)


def _assert_same_outputs(source, target_cls, x, tmp_path, expected: dict[str, str] | None = None):
    source.eval()
    for way, mapper in _ways(source, target_cls(), tmp_path):
        plan = mapper.get_plan()
        if expected is not None:
            got = {k: v for k, v in plan.mapping.items() if k in expected}
            assert got == expected, way
        target = _convert(plan, source, target_cls()).eval()
        with torch.no_grad():
            assert torch.allclose(source(x), target(x), atol=1e-6), way
        wrong_unflagged = [e for e in plan.entries if expected and e.source[0] in expected
                           and expected[e.source[0]] != e.target and not e.flagged]
        assert not wrong_unflagged, way


# ----------------------------------------------------------------------------- the vocabulary
def test_vocabulary_ships_as_package_data_with_sources():
    data = json.loads(resources.files("weight_mapper").joinpath("data/vocabulary.json").read_text())
    assert data["format"] == "weight_mapper.vocabulary"
    assert all(entry["source"] for entry in data["token_synonyms"] + data["ordinals"])
    assert data["mined_components"] and all(e["sources"] for e in data["mined_components"])
    assert any("torchtune" in s for e in data["mined_components"] for s in e["sources"])
    assert TOKEN_SYNONYMS["q"] == "query" and TOKEN_SYNONYMS["downsample"] == "shortcut"
    assert ORDINALS["b"][1] == 1 and ORDINALS["after"][1] == 1


def test_mined_classes_keep_siblings_apart():
    assert COMPONENT_SYNONYMS["attentionnorm"] == COMPONENT_SYNONYMS["inputlayernorm"]
    assert COMPONENT_SYNONYMS["ffnnorm"] == COMPONENT_SYNONYMS["postattentionlayernorm"]
    assert COMPONENT_SYNONYMS["attentionnorm"] != COMPONENT_SYNONYMS["ffnnorm"]
    assert COMPONENT_SYNONYMS.get("qproj") != COMPONENT_SYNONYMS.get("kproj")
    assert name_tokens("wq") == name_tokens("q_proj") != name_tokens("k_proj")


def test_ordinals_of_every_family():
    assert component_ordinal("conv_a")[::2] == component_ordinal("conv1")[::2][:1] + (0,)
    assert component_ordinal("layernorm_after")[2] == 1
    assert component_ordinal("3") is None and component_ordinal("a") is None


def test_sorted_keys_are_detected_as_having_no_order():
    assert looks_sorted(["a.bias", "a.weight", "b.bias", "b.weight"])
    assert looks_sorted(["layers.0.w", "layers.10.w", "layers.2.w"])
    assert not looks_sorted(["a.weight", "a.bias", "b.weight"])
    table = TensorTable.from_state_dict({"fc.bias": (2,), "fc.weight": (2, 2), "head.bias": (2,), "head.weight": (2, 2)})
    assert not table.ordered


# ----------------------------------------------------------------------------- identical names
class _Attn(nn.Module):
    def __init__(self, order: str):
        super().__init__()
        for name in order.split():
            setattr(self, name, nn.Linear(D, D, bias=False) if name.endswith("proj") else nn.LayerNorm(D))

    def forward(self, x):
        q, k = self.q_norm(self.q_proj(x)), self.k_norm(self.k_proj(x))
        a = torch.softmax(q @ k.transpose(-1, -2) / D ** 0.5, -1)
        return self.o_proj(a @ self.v_proj(x))


class _Layers(nn.Module):
    order = "q_proj k_proj v_proj o_proj q_norm k_norm"

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(nn.Module() for _ in range(2))
        for layer in self.model.layers:
            layer.self_attn = _Attn(self.order)

    def forward(self, x):
        for layer in self.model.layers:
            x = x + layer.self_attn(x)
        return x


class _LayersReordered(_Layers):
    order = "o_proj k_norm v_proj q_norm k_proj q_proj"


def test_identical_names_are_never_swapped(tmp_path):
    source = _Layers()
    expected = {k: k for k in source.state_dict()}
    _assert_same_outputs(source, _LayersReordered, torch.randn(3, D), tmp_path, expected)
    plan = WeightMapper(source, _LayersReordered()).get_plan()
    assert not any(e.flagged for e in plan.entries)  # identical names are sure


class _LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(32, D)
        self.model.norm = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, 32, bias=False)

    def forward(self, ids):
        return self.lm_head(self.model.norm(self.model.embed_tokens(ids)))


class _Reference(nn.Module):
    """DeepSeek's reference naming, in its order: a sorted header puts ``lm_head`` first."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, D)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 32, bias=False)

    def forward(self, ids):
        return self.head(self.norm(self.embed(ids)))


def test_embed_and_head_follow_their_names(tmp_path):
    expected = {"model.embed_tokens.weight": "embed.weight", "lm_head.weight": "head.weight"}
    _assert_same_outputs(_LM(), _Reference, torch.arange(6)[None], tmp_path, expected)


# ----------------------------------------------------------------------------- synonyms and ordinals
class _BertAttn(nn.Module):
    def __init__(self):
        super().__init__()
        self.query, self.key, self.value, self.out = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):
        a = torch.softmax(self.query(x) @ self.key(x).transpose(-1, -2), -1)
        return self.out(a @ self.value(x))


class _LlamaAttn(nn.Module):
    def __init__(self):
        super().__init__()
        self.o_proj, self.v_proj, self.k_proj, self.q_proj = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x):
        a = torch.softmax(self.q_proj(x) @ self.k_proj(x).transpose(-1, -2), -1)
        return self.o_proj(a @ self.v_proj(x))


def test_query_key_value_out_find_q_k_v_o_proj(tmp_path):
    expected = {f"{a}.{leaf}": f"{b}.{leaf}" for a, b in
                (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "o_proj")) for leaf in ("weight", "bias")}
    _assert_same_outputs(_BertAttn(), _LlamaAttn, torch.randn(3, D), tmp_path, expected)


class _PyclsBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(D, D, 3, padding=1, bias=False), nn.BatchNorm2d(D)
        self.conv_b, self.bn_b = nn.Conv2d(D, D, 3, padding=1, bias=False), nn.BatchNorm2d(D)

    def forward(self, x):
        return self.bn_b(self.conv_b(torch.relu(self.bn_a(self.conv_a(x)))))


class _TimmBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm2, self.conv2 = nn.BatchNorm2d(D), nn.Conv2d(D, D, 3, padding=1, bias=False)
        self.norm1, self.conv1 = nn.BatchNorm2d(D), nn.Conv2d(D, D, 3, padding=1, bias=False)

    def forward(self, x):
        return self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x)))))


def _stats(model: nn.Module) -> nn.Module:
    model.train()
    with torch.no_grad():
        model(torch.randn(4, D, 5, 5))
    return model.eval()


def test_conv_a_bn_b_follow_their_ordinals(tmp_path):
    expected = {"conv_a.weight": "conv1.weight", "conv_b.weight": "conv2.weight",
                "bn_a.running_mean": "norm1.running_mean", "bn_b.running_mean": "norm2.running_mean"}
    _assert_same_outputs(_stats(_PyclsBlock()), _TimmBlock, torch.randn(2, D, 5, 5), tmp_path, expected)


class _HFViTLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.layernorm_before, self.layernorm_after = nn.LayerNorm(D), nn.LayerNorm(D)
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        return self.layernorm_after(self.fc(self.layernorm_before(x)))


class _TimmViTLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm2, self.fc, self.norm1 = nn.LayerNorm(D), nn.Linear(D, D), nn.LayerNorm(D)

    def forward(self, x):
        return self.norm2(self.fc(self.norm1(x)))


def _perturbed(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def test_layernorm_before_after_find_norm1_norm2(tmp_path):
    expected = {"layernorm_before.weight": "norm1.weight", "layernorm_after.weight": "norm2.weight"}
    _assert_same_outputs(_perturbed(_HFViTLayer()), _TimmViTLayer, torch.randn(3, D), tmp_path, expected)


class _MetaBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention_norm, self.ffn_norm = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attention, self.feed_forward = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class _HFBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn, self.mlp = nn.Linear(D, D), nn.Linear(D, D)
        self.post_attention_layernorm, self.input_layernorm = nn.LayerNorm(D), nn.LayerNorm(D)

    def forward(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


def test_attention_norm_ffn_norm_find_input_and_post_attention_layernorm(tmp_path):
    expected = {"attention_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
                "attention.weight": "self_attn.weight", "feed_forward.weight": "mlp.weight"}
    _assert_same_outputs(_perturbed(_MetaBlock()), _HFBlock, torch.randn(3, D), tmp_path, expected)


class _ShortcutBlock(nn.Module):
    """pycls naming: the block's last conv and its shortcut have one shape."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(D, D, 1, bias=False), nn.BatchNorm2d(D)
        self.conv_b, self.bn_b = nn.Conv2d(D, 2 * D, 1, bias=False), nn.BatchNorm2d(2 * D)
        self.shortcut = nn.Sequential(nn.Conv2d(D, 2 * D, 1, bias=False), nn.BatchNorm2d(2 * D))

    def forward(self, x):
        return self.bn_b(self.conv_b(torch.relu(self.bn_a(self.conv_a(x))))) + self.shortcut(x)


class _DownsampleBlock(nn.Module):
    """timm naming, the shortcut defined first."""

    def __init__(self):
        super().__init__()
        self.downsample = nn.Module()
        self.downsample.conv, self.downsample.bn = nn.Conv2d(D, 2 * D, 1, bias=False), nn.BatchNorm2d(2 * D)
        self.conv1, self.bn1 = nn.Conv2d(D, D, 1, bias=False), nn.BatchNorm2d(D)
        self.conv2, self.bn2 = nn.Conv2d(D, 2 * D, 1, bias=False), nn.BatchNorm2d(2 * D)

    def forward(self, x):
        short = self.downsample.bn(self.downsample.conv(x))
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + short


def test_shortcut_finds_downsample_not_the_last_conv(tmp_path):
    expected = {"shortcut.0.weight": "downsample.conv.weight", "conv_b.weight": "conv2.weight",
                "shortcut.1.running_var": "downsample.bn.running_var", "bn_b.running_var": "bn2.running_var"}
    _assert_same_outputs(_stats(_ShortcutBlock()), _DownsampleBlock, torch.randn(2, D, 5, 5), tmp_path, expected)


# ----------------------------------------------------------------------------- partial targets
class _Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, D, 3, bias=False), nn.BatchNorm2d(D)
        self.layer1 = nn.Sequential(nn.Conv2d(D, D, 3, bias=False), nn.BatchNorm2d(D))
        self.layer2 = nn.Sequential(nn.Conv2d(D, D, 3, bias=False), nn.BatchNorm2d(D))
        self.fc = nn.Linear(D, 10)

    def forward(self, x):
        return self.layer2(self.layer1(torch.relu(self.bn1(self.conv1(x)))))


class _Detector(nn.Module):
    """The backbone under ``backbone.body`` without its classifier, plus detector-only heads of
    the backbone's width (biases of [D] that a BatchNorm vector fits by shape)."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.body = _Backbone()
        del self.backbone.body.fc
        self.backbone.fpn = nn.ModuleList(nn.Conv2d(D, D, 1) for _ in range(3))
        self.head = nn.Conv2d(D, 4, 1)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        f = self.backbone.body(x)
        for conv in self.backbone.fpn:
            f = conv(f)
        return self.head(f)


def test_backbone_into_detector_leaves_the_heads_unmatched():
    source = _stats_3(_Backbone())
    target = _Detector()
    for mapper in (WeightMapper(source, target), WeightMapper.from_state_dict(_sorted_sd(source), target)):
        plan = mapper.get_plan()  # never crashes, never stacks 0-d counters into a head
        filled = {e.target for e in plan.entries}
        assert not any(t.startswith(("backbone.fpn", "head")) or t == "scale" for t in filled)
        body = {k for k in target.state_dict() if k.startswith("backbone.body.")}
        assert body <= filled
        assert all(plan.mapping[k] == "backbone.body." + k for k in source.state_dict() if not k.startswith("fc."))


def _stats_3(model: nn.Module) -> nn.Module:
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 9, 9))
    return model.eval()


def _conv_bn(prefix: str, c_in: int, c_out: int, k: int, conv: str, bn: str) -> dict[str, tuple[int, ...]]:
    out = {f"{prefix}.{conv}.weight": (c_out, c_in, k, k)}
    out.update({f"{prefix}.{bn}.{leaf}": (c_out,) for leaf in ("weight", "bias", "running_mean", "running_var")})
    return {**out, f"{prefix}.{bn}.num_batches_tracked": ()}


def _regnets(widths=(4, 8, 12, 16)) -> tuple[dict, dict, dict[str, str]]:
    """torchvision's RegNet layout (``trunk_output.block1.block1-0.f.a.0``, ``proj``) and timm's
    (``s1.b1.conv1.conv``, ``downsample``) as ``{name: shape}``, and the truth between them."""
    tv, timm, truth = {}, {}, {}
    for s, (c_in, c_out) in enumerate(itertools.pairwise(widths), start=1):
        for b in range(2):
            width_in = c_in if b == 0 else c_out
            layers = [("f.a", "conv1", width_in, 1), ("f.b", "conv2", c_out, 3), ("f.c", "conv3", c_out, 1)]
            if b == 0:
                layers.append(("proj", "downsample", width_in, 1))
            for ours, theirs, w_in, k in layers:
                src = _conv_bn(f"trunk_output.block{s}.block{s}-{b}.{ours}", w_in, c_out, k, "0", "1")
                tgt = _conv_bn(f"s{s}.b{b + 1}.{theirs}", w_in, c_out, k, "conv", "bn")
                tv.update(src)
                timm.update(tgt)
                truth.update(zip(src, tgt))
    return tv, timm, truth


def test_sorted_regnet_keeps_f_a_and_f_c_apart():
    """A sorted checkpoint has no order: pycls' ``f.a`` / ``f.c`` (same shape in every block but a
    stage's first) are told apart from ``conv1`` / ``conv3`` by their ordinals alone."""
    tv, timm, truth = _regnets()
    mapper = WeightMapper({k: tv[k] for k in sorted(tv)}, timm)
    mapper.suggest_mapping()
    plan = mapper.get_plan()
    wrong = {e.source[0]: e.target for e in plan.entries if truth[e.source[0]] != e.target}
    assert not [k for k in wrong if ".f." in k], wrong
    # what no name shows (proj vs f.a) is at least flagged
    assert all(e.flagged for e in plan.entries if e.source[0] in wrong)


def test_a_sorted_sequential_keeps_its_numeric_order():
    """A sorted header has no definition order, but ``block.0.1`` / ``block.1.1`` (two norms of one
    shape, an MBConv's) still say which comes first: their names differ only in digits."""
    src, tgt = {}, {}
    for b in range(2):
        p, q = f"features.{b}.block.", f"blocks.{b}."
        src[p + "0.0.weight"], tgt[q + "conv_pw.weight"] = (24, 8, 1, 1), (24, 8, 1, 1)
        src[p + "1.0.weight"], tgt[q + "conv_dw.weight"] = (24, 1, 3, 3), (24, 1, 3, 3)
        for leaf in ("weight", "bias"):
            src[p + f"0.1.{leaf}"], tgt[q + f"bn1.{leaf}"] = (24,), (24,)
            src[p + f"1.1.{leaf}"], tgt[q + f"bn2.{leaf}"] = (24,), (24,)
    table = TensorTable.from_state_dict({k: torch.empty(src[k], device="meta") for k in sorted(src)})
    assert not table.ordered
    mapper = WeightMapper(table, _Meta(tgt))
    mapper.suggest_mapping()
    filled = {e.target: e.source[0] for e in mapper.get_plan().entries}
    for b in range(2):
        assert filled[f"blocks.{b}.bn1.weight"] == f"features.{b}.block.0.1.weight"
        assert filled[f"blocks.{b}.bn2.weight"] == f"features.{b}.block.1.1.weight"


class _Meta(nn.Module):
    """A module holding the given {name: shape} as meta parameters, in the given order."""

    def __init__(self, shapes):
        super().__init__()
        for name, shape in shapes.items():
            owner = self
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            owner.register_parameter(leaf, nn.Parameter(torch.empty(shape, device="meta")))
