"""The architecture pairs: how to build each side with random weights, feed it, and the ground truth.

Every pair is data in :data:`PAIRS`. A builder returns ``(source, target)`` freshly initialised
(never downloaded); ``truth`` turns the source's keys into the ground truth
``{target_key: (source_keys, transform)}`` through a rule table of
:mod:`benchmarks.accuracy.rules`, :mod:`benchmarks.accuracy.synthetic` or
:mod:`benchmarks.accuracy.conversions` (:func:`benchmarks.accuracy.rules.build_truth`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.accuracy import conversions, rules, synthetic
from benchmarks.accuracy.rules import Truth

__all__ = ["Pair", "PAIRS", "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parents[2]

Builder = Callable[[], tuple[nn.Module, nn.Module]]
InputMaker = Callable[[int, torch.Generator], Any]


@dataclass(frozen=True)
class Pair:
    """One source architecture, one target architecture, and what maps to what.

    Attributes:
        name: Short id used on the command line and in the table.
        source, target: Human-readable descriptions.
        build: Returns fresh ``(source_model, target_model)`` with random weights.
        make_input: ``(batch, generator) -> input`` accepted by both models.
        truth: Source keys -> the ground truth ``{target_key: (source_keys, transform)}``.
        output: Picks the output tensor out of what either model returns (HF returns an object).
        requires: Modules that must import for this pair to run.
        note: One line for the README.
    """

    name: str
    source: str
    target: str
    build: Builder
    make_input: InputMaker
    truth: Callable[[list[str]], Truth]
    output: Callable[[Any], torch.Tensor] = lambda out: _main_output(out)
    requires: tuple[str, ...] = ()
    note: str = ""


def _main_output(out: Any) -> torch.Tensor:
    """A tensor as is; of a Hugging Face output, ``logits`` or else ``last_hidden_state``."""
    for name in ("logits", "last_hidden_state"):
        if hasattr(out, name):
            return getattr(out, name)
    return out


def _image(size: int) -> InputMaker:
    return lambda batch, gen: torch.randn(batch, 3, size, size, generator=gen)


def _tokens(vocab: int, length: int) -> InputMaker:
    return lambda batch, gen: torch.randint(0, vocab, (batch, length), generator=gen)


def _by_rules(
    table: rules.Rules, combined: Mapping[str, rules.TruthEntry] | None = None
) -> Callable[[list[str]], Truth]:
    return lambda keys: rules.build_truth(keys, table, combined)


def _tv_timm(tv_name: str, timm_name: str) -> Builder:
    def build():
        import timm
        import torchvision

        return getattr(torchvision.models, tv_name)(weights=None), timm.create_model(timm_name, pretrained=False)

    return build


# ---------------------------------------------------------------------------- Llama
_LLAMA = dict(vocab=128, dim=64, hidden=160, layers=4, heads=4, kv_heads=2, eps=1e-6, theta=10000.0)


def _reference_llama():
    return conversions.tests_module("reference_llama")


def _build_llama():
    import transformers

    c = _LLAMA
    config = transformers.LlamaConfig(
        vocab_size=c["vocab"], hidden_size=c["dim"], intermediate_size=c["hidden"],
        num_hidden_layers=c["layers"], num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"],
        max_position_embeddings=64, rms_norm_eps=c["eps"], rope_theta=c["theta"], tie_word_embeddings=False,
    )
    ref = _reference_llama()
    tune = ref.TransformerDecoder(c["vocab"], c["dim"], c["hidden"], c["layers"], c["heads"], c["kv_heads"], c["eps"], c["theta"])
    return transformers.LlamaForCausalLM(config), tune


def _llama_truth(keys: list[str]) -> Truth:
    """``hf_to_tune_truth`` (``{hf_key: tune_key}``, all plain copies) keyed by target."""
    truth = _reference_llama().hf_to_tune_truth(_LLAMA["layers"])
    missing = sorted(set(keys) - set(truth))
    if missing:
        raise KeyError(f"hf_to_tune_truth does not cover source keys {missing[:5]}")
    return {truth[k]: ((k,), None) for k in keys}


# ---------------------------------------------------------------------------- the table
PAIRS: tuple[Pair, ...] = (
    Pair(
        "resnet50", "torchvision resnet50", "timm resnet50",
        _tv_timm("resnet50", "resnet50"), _image(224), _by_rules(rules.IDENTITY),
        requires=("torchvision", "timm"), note="identical names on both sides: a sanity check",
    ),
    Pair(
        "mobilenet_v2", "torchvision mobilenet_v2", "timm mobilenetv2_100",
        _tv_timm("mobilenet_v2", "mobilenetv2_100"), _image(224), _by_rules(rules.tv_mobilenet_v2_to_timm()),
        requires=("torchvision", "timm"), note="flat features.N -> nested blocks.S.B; stem/head renamed",
    ),
    Pair(
        "vit_b_16", "torchvision vit_b_16", "timm vit_base_patch16_224",
        _tv_timm("vit_b_16", "vit_base_patch16_224"), _image(224), _by_rules(rules.TV_VIT_TO_TIMM),
        requires=("torchvision", "timm"), note="both fuse q/k/v as one [3d, d] tensor, so all 1:1",
    ),
    Pair(
        "efficientnet_b0", "torchvision efficientnet_b0", "timm efficientnet_b0",
        _tv_timm("efficientnet_b0", "efficientnet_b0"), _image(224), _by_rules(rules.TV_EFFICIENTNET_TO_TIMM),
        requires=("torchvision", "timm"),
        note="flat features.N.B.block.K -> blocks.S.B.<named>; each MBConv's two BatchNorms of the expanded "
             "width tell apart only by place",
    ),
    Pair(
        "convnext_tiny", "torchvision convnext_tiny", "timm convnext_tiny",
        _tv_timm("convnext_tiny", "convnext_tiny"), _image(224), _by_rules(rules.TV_CONVNEXT_TO_TIMM),
        requires=("torchvision", "timm"),
        note="flat features.N -> stem/stages.S.downsample/blocks; layers one Sequential deeper; "
             "layer scale [C, 1, 1] -> gamma [C]: 18 reshapes",
    ),
    Pair(
        "vgg16_bn", "torchvision vgg16_bn", "timm vgg16_bn",
        _tv_timm("vgg16_bn", "vgg16_bn"), _image(224), _by_rules(rules.TV_VGG_TO_TIMM),
        requires=("torchvision", "timm"),
        note="Linear classifier over the flattened map -> ConvMlp: a [4096, 25088] -> [4096, 512, 7, 7] "
             "flatten and a 1x1 conv",
    ),
    Pair(
        "regnet_y_400mf", "torchvision regnet_y_400mf", "timm regnety_004",
        _tv_timm("regnet_y_400mf", "regnety_004"), _image(224), _by_rules(rules.TV_REGNET_TO_TIMM),
        requires=("torchvision", "timm"),
        note="blockS-B -> sS.b(B+1); shortcut defined first vs last, same shape as conv1 in stage 1",
    ),
    Pair(
        "llama", "HF LlamaForCausalLM (4 layers, d=64, GQA)", "torchtune-style decoder (tests/reference_llama.py)",
        _build_llama, _tokens(_LLAMA["vocab"], 16), _llama_truth,
        requires=("transformers",), note="the proven pair of tests/test_real_models.py, 4 layers",
    ),
    Pair(
        "syn_renamed", "OldResNet (synthetic)", "NewResNet (synthetic)",
        lambda: (synthetic.OldResNet(), synthetic.NewResNet()), _image(32), _by_rules(synthetic.RENAMED_RULES),
        note="every module renamed; stage1..3 -> layers.0..2",
    ),
    Pair(
        "syn_regrouped", "FlatVGG (synthetic)", "NestedVGG (synthetic)",
        lambda: (synthetic.FlatVGG(), synthetic.NestedVGG()), _image(32), _by_rules(synthetic.regrouped_rules()),
        note="flat features.N (counting ReLU/pool) -> stages.S.blocks.B",
    ),
    Pair(
        "syn_reordered", "StackedMLP (synthetic)", "ShuffledMLP (synthetic)",
        lambda: (synthetic.StackedMLP(), synthetic.ShuffledMLP()),
        lambda batch, gen: torch.randn(batch, *synthetic.MLP_INPUT_SHAPE, generator=gen),
        _by_rules(synthetic.REORDERED_RULES),
        note="6 identical blocks under position-free keys, defined in another order than run: needs dummy_input",
    ),
    Pair(
        "syn_fused_qkv", "SplitQKVTransformer (synthetic)", "FusedQKVTransformer (synthetic)",
        lambda: (synthetic.SplitQKVTransformer(), synthetic.FusedQKVTransformer()), _tokens(synthetic.ATT_VOCAB, 12),
        _by_rules(synthetic.FUSED_QKV_RULES, synthetic.fused_qkv_combined()),
        note="separate q/k/v -> one fused qkv: a concatenation (dim 0)",
    ),
    # ------------------------------------------------------------------------ issue 6: transforms
    Pair(
        "bert", "HF BertModel (4 layers, d=64, no pooler)", "TorchBert (nn.TransformerEncoderLayer, tests/reference_encoders.py)",
        conversions.build_bert, _tokens(conversions.BERT["vocab"], 16), conversions.bert_truth,
        requires=("transformers",), note="query/key/value -> fused in_proj_weight / in_proj_bias: 8 concatenations",
    ),
    Pair(
        "gpt2", "HF GPT2Model (4 layers, d=64)", "LinearGPT2 (nn.Linear, tests/reference_encoders.py)",
        conversions.build_gpt2, _tokens(conversions.GPT2["vocab"], 16), conversions.gpt2_truth,
        requires=("transformers",), note="Conv1D [in, out] -> Linear [out, in]: 16 transposes, 4 of them square (c_proj)",
    ),
    Pair(
        "moe_experts", "ExpertList (8 SwiGLU experts, ModuleList)", "StackedExperts (3-D, tests/reference_encoders.py)",
        conversions.build_moe,
        lambda batch, gen: torch.randn(batch, 16, conversions.MOE["dim"], generator=gen),
        conversions.moe_truth,
        note="experts.E.w{1,2,3}.weight -> w{1,2,3}[E]: 3 stacks of 8",
    ),
    Pair(
        "layer_scale", "LayerScaleConv ([C,1,1] scale, 1x1 conv)", "LayerScaleLinear ([C] scale, Linear)",
        lambda: (conversions.LayerScaleConv(), conversions.LayerScaleLinear()),
        lambda batch, gen: torch.randn(batch, conversions.LAYER_SCALE_CHANNELS, 5, 5, generator=gen),
        conversions.layer_scale_truth,
        note="[C,1,1] -> [C] and [O,I,1,1] -> [O,I]: 2 reshapes and 1 copy",
    ),
)


def missing_requirements(pair: Pair) -> list[str]:
    """Modules this pair needs that do not import here (torchvision beside torch 2.13 does not)."""
    missing = []
    for name in pair.requires:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a broken install fails in many ways; all mean "skip"
            missing.append(name)
    return missing
