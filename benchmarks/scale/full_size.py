"""Full-size models on the meta device, mapped from their original reference names.

The target is a transformers model built under ``with torch.device("meta"):``: no memory for
weights, exact shapes. The source is the same model under the names of its original reference
implementation, as a ``{name: shape}`` dict. It is derived from the target's meta state dict
through the *inverse* of the ground-truth rename table, so every shape is exactly right.

The tables are data in torchtune's style (``"layers.{}.attn.wq_a.weight": "model.layers.{}..."``):
one lookup function serves every table and the reverse direction is a dict comprehension.
Each table is written in the reference module's definition order, which also orders the
source, the way a ``state_dict()`` of the reference model would be.

DeepSeek-V3 (transformers >= 5): the routed experts of a MoE layer are one stacked parameter
per projection (``mlp.experts.gate_up_proj`` ``[E, 2I, H]``: gate then up, concatenated on
dim 1; ``mlp.experts.down_proj`` ``[E, H, I]``), while the reference checkpoint keeps one
tensor per expert and projection (``ffn.experts.M.w1/w2/w3``). Those have no 1:1 counterpart:
they are listed in :data:`DEEPSEEK_STACKED` (the inverse of what transformers' conversion
mapping does on load: ``MergeModulelist(dim=0)`` then ``Concatenate(dim=1)``) and are left
out of the 1:1 ground truth. ``deepseek_v3_hub`` maps onto the per-expert names of the Hub
checkpoint instead (``mlp.experts.M.gate_proj.weight``, what transformers reads before
stacking), where every tensor is 1:1.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = [
    "DEEPSEEK_REF_TO_HF",
    "DEEPSEEK_EXPERTS_REF_TO_HUB",
    "DEEPSEEK_STACKED",
    "LLAMA_META_TO_HF",
    "Case",
    "CASES",
    "abstract_key",
    "rename",
    "invert",
    "definition_order",
    "unstack",
    "sources_from_target",
    "build_case",
    "Built",
    "NotOneToOne",
]

# DeepSeek-V3 reference implementation (inference/model.py names, as inference/convert.py
# writes them from the Hub checkpoint) -> transformers DeepseekV3ForCausalLM. In the
# reference's definition order: Transformer(embed, layers, norm, head); Block(attn, ffn,
# attn_norm, ffn_norm); MLA(wq_a, q_norm, wq_b, wkv_a, kv_norm, wkv_b, wo); dense MLP(w1, w2,
# w3); MoE(gate(weight, bias), experts, shared_experts). convert.py renames
# e_score_correction_bias to gate.bias and drops the multi-token-prediction layer
# (model.layers.61), which transformers does not build either.
DEEPSEEK_REF_TO_HF: dict[str, str] = {
    "embed.weight": "model.embed_tokens.weight",
    "layers.{}.attn.wq_a.weight": "model.layers.{}.self_attn.q_a_proj.weight",
    "layers.{}.attn.q_norm.weight": "model.layers.{}.self_attn.q_a_layernorm.weight",
    "layers.{}.attn.wq_b.weight": "model.layers.{}.self_attn.q_b_proj.weight",
    "layers.{}.attn.wkv_a.weight": "model.layers.{}.self_attn.kv_a_proj_with_mqa.weight",
    "layers.{}.attn.kv_norm.weight": "model.layers.{}.self_attn.kv_a_layernorm.weight",
    "layers.{}.attn.wkv_b.weight": "model.layers.{}.self_attn.kv_b_proj.weight",
    "layers.{}.attn.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.ffn.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.ffn.w2.weight": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.ffn.w3.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.ffn.gate.weight": "model.layers.{}.mlp.gate.weight",
    "layers.{}.ffn.gate.bias": "model.layers.{}.mlp.gate.e_score_correction_bias",
    "layers.{}.ffn.experts.{}.w1.weight": "model.layers.{}.mlp.experts.{}.gate_proj.weight",  # hub layout only
    "layers.{}.ffn.experts.{}.w2.weight": "model.layers.{}.mlp.experts.{}.down_proj.weight",  # hub layout only
    "layers.{}.ffn.experts.{}.w3.weight": "model.layers.{}.mlp.experts.{}.up_proj.weight",  # hub layout only
    "layers.{}.ffn.shared_experts.w1.weight": "model.layers.{}.mlp.shared_experts.gate_proj.weight",
    "layers.{}.ffn.shared_experts.w2.weight": "model.layers.{}.mlp.shared_experts.down_proj.weight",
    "layers.{}.ffn.shared_experts.w3.weight": "model.layers.{}.mlp.shared_experts.up_proj.weight",
    "layers.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
}
DEEPSEEK_EXPERTS_REF_TO_HUB = {k: v for k, v in DEEPSEEK_REF_TO_HF.items() if ".experts.{}." in k}

# Stacked transformers parameter -> the per-expert tensors it is made of, in concatenation
# order along dim 1 (dim 0 is the expert). Not 1:1: a stack (and a concatenation).
DEEPSEEK_STACKED: dict[str, dict[str, tuple[str, ...]]] = {
    "ref": {
        "model.layers.{}.mlp.experts.gate_up_proj": ("layers.{}.ffn.experts.{}.w1.weight", "layers.{}.ffn.experts.{}.w3.weight"),
        "model.layers.{}.mlp.experts.down_proj": ("layers.{}.ffn.experts.{}.w2.weight",),
    },
    "hub": {
        "model.layers.{}.mlp.experts.gate_up_proj": (
            "model.layers.{}.mlp.experts.{}.gate_proj.weight", "model.layers.{}.mlp.experts.{}.up_proj.weight",
        ),
        "model.layers.{}.mlp.experts.down_proj": ("model.layers.{}.mlp.experts.{}.down_proj.weight",),
    },
}

# Meta's Llama reference implementation (llama/model.py) -> transformers LlamaForCausalLM, in
# the reference's definition order: Transformer(tok_embeddings, layers, norm, output);
# TransformerBlock(attention(wq, wk, wv, wo), feed_forward(w1, w2, w3), attention_norm,
# ffn_norm). transformers' conversion script also permutes the rows of wq and wk for its
# rotary layout (convert_llama_weights_to_hf.py, ``permute``): same shape, 1:1 as a naming
# problem, and the plan must carry that permutation (weight_mapper.conventions): the transform
# each of these sources needs is in LLAMA_META_TO_HF_TRANSFORMS.
LLAMA_META_TO_HF: dict[str, str] = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.feed_forward.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.feed_forward.w2.weight": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.feed_forward.w3.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LLAMA_META_TO_HF_TRANSFORMS: dict[str, str] = {
    "layers.{}.attention.wq.weight": "rotary_half",
    "layers.{}.attention.wk.weight": "rotary_half",
}

_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")


# ---------------------------------------------------------------------------- tables
def abstract_key(key: str) -> tuple[str, tuple[int, ...]]:
    """``("layers.{}.attn.wo.weight", (3,))`` for ``"layers.3.attn.wo.weight"``.

    >>> abstract_key("layers.3.ffn.experts.7.w1.weight")
    ('layers.{}.ffn.experts.{}.w1.weight', (3, 7))
    """
    return _INDEX.sub("{}", key), tuple(int(m) for m in _INDEX.findall(key))


def rename(key: str, table: Mapping[str, str]) -> str | None:
    """The key under the table's other names, or None when no entry covers it.

    >>> rename("layers.3.attn.wo.weight", DEEPSEEK_REF_TO_HF)
    'model.layers.3.self_attn.o_proj.weight'
    """
    abstract, ix = abstract_key(key)
    return table[abstract].format(*ix) if abstract in table else None


def invert(table: Mapping[str, str]) -> dict[str, str]:
    """The table read the other way round."""
    return {v: k for k, v in table.items()}


def definition_order(keys: Iterable[str], templates: Iterable[str]) -> list[str]:
    """Sort keys like a ``state_dict()`` of the module the templates describe, in their order.

    A key sorts by its path: each component by where the templates first define it, and
    ModuleList positions by number, so ``experts.0.w1, experts.0.w2, ..., experts.1.w1``.

    >>> definition_order(["b.1.x", "a", "b.0.y", "b.0.x"], ["a", "b.{}.x", "b.{}.y"])
    ['a', 'b.0.x', 'b.0.y', 'b.1.x']
    """
    rank: dict[tuple[str, ...], int] = {}
    for t in templates:
        parts = tuple(t.split("."))
        for d in range(1, len(parts) + 1):
            rank.setdefault(parts[:d], len(rank))

    def sort_key(key: str) -> tuple:
        parts = key.split(".")
        abstract = tuple("{}" if p.isdigit() else p for p in parts)
        return tuple((rank[abstract[: d + 1]], int(p) if p.isdigit() else 0) for d, p in enumerate(parts))

    return sorted(keys, key=sort_key)


def unstack(name: str, shape: tuple[int, ...], stacked: Mapping[str, tuple[str, ...]]) -> dict[str, tuple[int, ...]] | None:
    """The per-expert tensors one stacked parameter is made of, with their shapes, or None.

    >>> unstack("m.layers.3.experts.up", (2, 8, 5), {"m.layers.{}.experts.up": ("l.{}.e.{}.a", "l.{}.e.{}.b")})
    {'l.3.e.0.a': (4, 5), 'l.3.e.0.b': (4, 5), 'l.3.e.1.a': (4, 5), 'l.3.e.1.b': (4, 5)}
    """
    abstract, ix = abstract_key(name)
    if abstract not in stacked:
        return None
    parts = stacked[abstract]
    n_experts, rows, rest = shape[0], shape[1], tuple(shape[2:])
    per_expert = (rows // len(parts), *rest)
    return {p.format(*ix, m): per_expert for m in range(n_experts) for p in parts}


# ---------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One full-size mapping problem: how to build the meta target and its reference source."""

    name: str
    description: str
    build_target: Callable[[], Any]  # -> meta nn.Module
    table: Mapping[str, str]  # ground truth, reference name -> transformers name (templates)
    stacked: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # target -> source parts
    hub_experts: bool = False  # map onto the Hub checkpoint's per-expert names instead
    time_target_s: float | None = None
    transforms: Mapping[str, str] = field(default_factory=dict)  # source template -> transform its entry needs


def _deepseek_v3(**overrides) -> Callable[[], Any]:
    def build():
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

        with torch.device("meta"):
            return DeepseekV3ForCausalLM(DeepseekV3Config(**overrides))

    return build


def _llama(**config) -> Callable[[], Any]:
    def build():
        from transformers import LlamaConfig, LlamaForCausalLM

        with torch.device("meta"):
            return LlamaForCausalLM(LlamaConfig(**config))

    return build


LLAMA_405B = dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
                  num_key_value_heads=8, vocab_size=128256)
# Small configurations of the same code paths, for --quick and tests/test_scale.py.
DEEPSEEK_V3_SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                         num_hidden_layers=3, first_k_dense_replace=2, n_routed_experts=8, num_experts_per_tok=2,
                         n_group=2, topk_group=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48,
                         kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, head_dim=8)
LLAMA_SMALL = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=128)

CASES: dict[str, Case] = {
    "deepseek_v3": Case(
        "deepseek_v3", "DeepSeek-V3 671B, reference names -> transformers DeepseekV3ForCausalLM(DeepseekV3Config()) on meta",
        _deepseek_v3(), DEEPSEEK_REF_TO_HF, DEEPSEEK_STACKED["ref"], time_target_s=60.0),
    "deepseek_v3_hub": Case(
        "deepseek_v3_hub", "DeepSeek-V3 671B, reference names -> Hub checkpoint names (per-expert), shapes from the meta model",
        _deepseek_v3(), DEEPSEEK_REF_TO_HF, DEEPSEEK_STACKED["hub"], hub_experts=True, time_target_s=60.0),
    "llama_405b": Case(
        "llama_405b", "Llama 405B size, Meta names -> transformers LlamaForCausalLM on meta",
        _llama(**LLAMA_405B), LLAMA_META_TO_HF, time_target_s=5.0, transforms=LLAMA_META_TO_HF_TRANSFORMS),
    "deepseek_v3_small": Case(
        "deepseek_v3_small", "DeepSeek-V3, 3 layers (2 dense, 1 MoE of 8 experts), tiny dims",
        _deepseek_v3(**DEEPSEEK_V3_SMALL), DEEPSEEK_REF_TO_HF, DEEPSEEK_STACKED["ref"]),
    "deepseek_v3_hub_small": Case(
        "deepseek_v3_hub_small", "as deepseek_v3_small, onto the Hub's per-expert names",
        _deepseek_v3(**DEEPSEEK_V3_SMALL), DEEPSEEK_REF_TO_HF, DEEPSEEK_STACKED["hub"], hub_experts=True),
    "llama_small": Case("llama_small", "Llama, 4 layers, tiny dims", _llama(**LLAMA_SMALL), LLAMA_META_TO_HF,
                        transforms=LLAMA_META_TO_HF_TRANSFORMS),
}


@dataclass
class Built:
    """A case's two sides and its ground truth."""

    target: Any  # meta nn.Module, or {name: shape} (hub layout)
    source: dict[str, tuple[int, ...]]
    truth: dict[str, str]  # 1:1 part: source name -> target name
    not_1to1: dict[str, NotOneToOne]  # target name -> how it is made of source tensors
    n_target: int


@dataclass(frozen=True)
class NotOneToOne:
    """A target tensor made of several source tensors: ``op`` over ``sources``, in order.

    ``op`` is ``"stack"`` (``torch.stack(sources, dim=0)``, the registry's ``stack``) or
    ``"stack_concat"`` (one stack per part, concatenated on dim 1: the registry's
    ``stack_concat`` with ``concat_dim=1``).
    """

    sources: tuple[str, ...]
    op: str


def sources_from_target(target_shapes: Mapping[str, tuple[int, ...]], table: Mapping[str, str],
                        stacked: Mapping[str, tuple[str, ...]]) -> tuple[dict, dict, dict]:
    """``(source {name: shape}, 1:1 truth, not-1:1 groups)`` through the inverse of ``table``.

    Raises:
        KeyError: If a target tensor is covered neither by the table nor by ``stacked``.
    """
    back = invert(table)
    source: dict[str, tuple[int, ...]] = {}
    truth: dict[str, str] = {}
    not_1to1: dict[str, NotOneToOne] = {}
    for name, shape in target_shapes.items():
        src_name = rename(name, back)
        if src_name is not None:
            source[src_name], truth[src_name] = tuple(shape), name
            continue
        parts = unstack(name, tuple(shape), stacked)
        if parts is None:
            raise KeyError(f"no ground-truth rule covers target tensor {name!r} {tuple(shape)}")
        source.update(parts)
        n_parts = len(stacked[abstract_key(name)[0]])
        if n_parts == 1:
            not_1to1[name] = NotOneToOne(tuple(parts), "stack")
        else:  # per part, the experts in order: (e0.w1, e1.w1, ..., e0.w3, e1.w3, ...)
            by_part = tuple(k for j in range(n_parts) for i, k in enumerate(parts) if i % n_parts == j)
            not_1to1[name] = NotOneToOne(by_part, "stack_concat")
    order = definition_order(source, table)
    return {k: source[k] for k in order}, truth, not_1to1


def build_case(case: Case, *, model: Any = None) -> Built:
    """Build the meta target (unless given), then the source under the reference names."""
    model = case.build_target() if model is None else model
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if not case.hub_experts:
        source, truth, not_1to1 = sources_from_target(shapes, case.table, case.stacked)
        return Built(model, source, truth, not_1to1, len(shapes))
    # Hub layout: the target is the meta model's shapes with every stacked parameter split
    # back into per-expert tensors, in the model's order (experts where the stack was).
    hub: dict[str, tuple[int, ...]] = {}
    templates: dict[str, None] = {}  # the model's own order, per-expert parts where a stack was
    for name, shape in shapes.items():
        hub.update(unstack(name, shape, case.stacked) or {name: shape})
        abstract, _ = abstract_key(name)
        templates.update(dict.fromkeys(case.stacked.get(abstract, (abstract,))))
    hub = {k: hub[k] for k in definition_order(hub, templates)}
    source, truth, not_1to1 = sources_from_target(hub, case.table, {})
    return Built(hub, source, truth, not_1to1, len(hub))
