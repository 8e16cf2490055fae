"""The pairs of issue 6: conversions that are not renames, with their ground truth as data.

- ``bert``: Hugging Face ``BertModel`` (separate ``query``/``key``/``value``) -> ``TorchBert`` of
  ``tests/reference_encoders.py`` (``nn.TransformerEncoderLayer``: one ``in_proj_weight`` /
  ``in_proj_bias`` per layer, the concatenation of q, k, v on dim 0).
- ``gpt2``: Hugging Face ``GPT2Model`` (``Conv1D``, weights ``[in, out]``) -> ``LinearGPT2``
  (``nn.Linear``, ``[out, in]``): every 2-D weight but the embeddings is transposed, including
  the square ``attn.c_proj`` whose shape alone does not say so.
- ``moe_experts``: ``ExpertList`` (Mixtral-style ModuleList of SwiGLU experts) ->
  ``StackedExperts`` (one ``[n_experts, out, in]`` tensor per projection, stacked on dim 0).
- ``layer_scale``: :class:`LayerScaleConv` (``[C, 1, 1]`` layer scale, 1x1 conv) ->
  :class:`LayerScaleLinear` (``[C]``, ``nn.Linear``): two reshapes and a copy. The two classes are
  copied from ``tests/test_combine.py`` (a test module, which imports pytest).

The reference models are imported from ``tests/reference_encoders.py`` by path, as the llama pair
does with ``tests/reference_llama.py``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

from benchmarks.accuracy.rules import Rules, Truth, build_truth

__all__ = [
    "BERT", "GPT2", "MOE", "LAYER_SCALE_CHANNELS",
    "build_bert", "bert_truth", "build_gpt2", "gpt2_truth", "build_moe", "moe_truth",
    "LayerScaleConv", "LayerScaleLinear", "layer_scale_truth",
]

_REPO_ROOT = Path(__file__).resolve().parents[2]

# Small configs, the size of the llama pair.
BERT = dict(vocab=128, dim=64, heads=4, ffn=128, layers=4, max_pos=32, eps=1e-12)
GPT2 = dict(vocab=128, dim=64, heads=4, layers=4, max_pos=32, eps=1e-5)
MOE = dict(dim=32, hidden=64, experts=8, top_k=2)
LAYER_SCALE_CHANNELS = 8


def tests_module(name: str):
    """``tests/<name>.py``, imported by path (the tests folder is not a package)."""
    path = _REPO_ROOT / "tests" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reference_encoders():
    return tests_module("reference_encoders")


# ---------------------------------------------------------------------------- BERT
def build_bert() -> tuple[nn.Module, nn.Module]:
    import transformers

    c = BERT
    config = transformers.BertConfig(
        vocab_size=c["vocab"], hidden_size=c["dim"], num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
        intermediate_size=c["ffn"], max_position_embeddings=c["max_pos"], layer_norm_eps=c["eps"],
    )
    hf = transformers.BertModel(config, add_pooling_layer=False)
    ours = _reference_encoders().TorchBert(
        c["vocab"], c["dim"], c["heads"], c["ffn"], c["layers"], c["max_pos"], eps=c["eps"])
    return hf, ours


_BERT_LAYER = r"encoder\.layer\.(\d+)\."
BERT_RULES: Rules = (
    (r"embeddings\.word_embeddings\.weight", "word.weight"),
    (r"embeddings\.position_embeddings\.weight", "position.weight"),
    (r"embeddings\.token_type_embeddings\.weight", "token_type.weight"),
    (r"embeddings\.LayerNorm\.(weight|bias)", r"embed_norm.\1"),
    (_BERT_LAYER + r"attention\.output\.dense\.(weight|bias)", r"layers.\1.self_attn.out_proj.\2"),
    (_BERT_LAYER + r"attention\.output\.LayerNorm\.(weight|bias)", r"layers.\1.norm1.\2"),
    (_BERT_LAYER + r"intermediate\.dense\.(weight|bias)", r"layers.\1.linear1.\2"),
    (_BERT_LAYER + r"output\.dense\.(weight|bias)", r"layers.\1.linear2.\2"),
    (_BERT_LAYER + r"output\.LayerNorm\.(weight|bias)", r"layers.\1.norm2.\2"),
)


def bert_truth(keys: list[str]) -> Truth:
    """Renames, plus ``in_proj_{weight,bias}`` = concat(query, key, value) on dim 0, per layer."""
    combined = {
        f"layers.{i}.self_attn.in_proj_{leaf}": (
            tuple(f"encoder.layer.{i}.attention.self.{p}.{leaf}" for p in ("query", "key", "value")), "concat")
        for i in range(BERT["layers"])
        for leaf in ("weight", "bias")
    }
    return build_truth(keys, BERT_RULES, combined)


# ---------------------------------------------------------------------------- GPT-2
def build_gpt2() -> tuple[nn.Module, nn.Module]:
    import transformers

    c = GPT2
    config = transformers.GPT2Config(
        vocab_size=c["vocab"], n_embd=c["dim"], n_layer=c["layers"], n_head=c["heads"], n_positions=c["max_pos"],
        layer_norm_epsilon=c["eps"], bos_token_id=0, eos_token_id=0,
    )
    ours = _reference_encoders().LinearGPT2(c["vocab"], c["dim"], c["heads"], c["layers"], c["max_pos"], eps=c["eps"])
    return transformers.GPT2Model(config), ours


_GPT2_LAYER = r"h\.(\d+)\."
# Conv1D keeps its weight as [in, out], nn.Linear as [out, in]: every Conv1D weight is transposed.
GPT2_RULES: Rules = (
    (r"wte\.weight", "tok.weight"),
    (r"wpe\.weight", "pos.weight"),
    (_GPT2_LAYER + r"ln_1\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (_GPT2_LAYER + r"attn\.c_attn\.weight", r"blocks.\1.qkv.weight", "transpose"),
    (_GPT2_LAYER + r"attn\.c_attn\.bias", r"blocks.\1.qkv.bias"),
    (_GPT2_LAYER + r"attn\.c_proj\.weight", r"blocks.\1.proj.weight", "transpose"),  # square [d, d]
    (_GPT2_LAYER + r"attn\.c_proj\.bias", r"blocks.\1.proj.bias"),
    (_GPT2_LAYER + r"ln_2\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (_GPT2_LAYER + r"mlp\.c_fc\.weight", r"blocks.\1.fc_in.weight", "transpose"),
    (_GPT2_LAYER + r"mlp\.c_fc\.bias", r"blocks.\1.fc_in.bias"),
    (_GPT2_LAYER + r"mlp\.c_proj\.weight", r"blocks.\1.fc_out.weight", "transpose"),
    (_GPT2_LAYER + r"mlp\.c_proj\.bias", r"blocks.\1.fc_out.bias"),
    (r"ln_f\.(weight|bias)", r"norm.\1"),
)


def gpt2_truth(keys: list[str]) -> Truth:
    return build_truth(keys, GPT2_RULES)


# ---------------------------------------------------------------------------- MoE experts
def build_moe() -> tuple[nn.Module, nn.Module]:
    ref, c = _reference_encoders(), MOE
    return (ref.ExpertList(c["dim"], c["hidden"], c["experts"], c["top_k"]),
            ref.StackedExperts(c["dim"], c["hidden"], c["experts"], c["top_k"]))


def moe_truth(keys: list[str]) -> Truth:
    """The router is renamed; ``w1``/``w2``/``w3`` stack the experts' weights in expert order."""
    combined = {
        f"w{k}": (tuple(f"experts.{e}.w{k}.weight" for e in range(MOE["experts"])), "stack") for k in (1, 2, 3)
    }
    return build_truth(keys, ((r"gate\.weight", "router.weight"),), combined)


# ---------------------------------------------------------------------------- layer scale
class LayerScaleConv(nn.Module):
    """ConvNeXt-style layer scale kept as [C, 1, 1] and a 1x1 conv (copied from tests/test_combine.py)."""

    def __init__(self, channels: int = LAYER_SCALE_CHANNELS):
        super().__init__()
        self.pw = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.randn(channels, 1, 1))

    def forward(self, x):  # x: [B, C, H, W]
        return x + self.gamma * self.pw(x)


class LayerScaleLinear(nn.Module):
    """The same block channels-last: layer scale [C] and a Linear (copied from tests/test_combine.py)."""

    def __init__(self, channels: int = LAYER_SCALE_CHANNELS):
        super().__init__()
        self.fc = nn.Linear(channels, channels)
        self.ls = nn.Parameter(torch.ones(channels))

    def forward(self, x):
        y = x.permute(0, 2, 3, 1)
        return x + (self.ls * self.fc(y)).permute(0, 3, 1, 2)


LAYER_SCALE_RULES: Rules = (
    (r"pw\.weight", "fc.weight", "reshape"),  # [C, C, 1, 1] -> [C, C]
    (r"pw\.bias", "fc.bias"),
    (r"gamma", "ls", "reshape"),  # [C, 1, 1] -> [C]
)


def layer_scale_truth(keys: list[str]) -> Truth:
    return build_truth(keys, LAYER_SCALE_RULES)
