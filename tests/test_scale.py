"""Small versions of the scale benchmark's code paths (benchmarks/scale/): meta-device targets,
shape-only sources, header-only safetensors reading, and decomposition along repeated blocks.

The ground truth is data: rename tables from the reference implementations' names to
transformers' names, with ``{}`` standing for layer and expert positions. Sources are derived
from the meta target through the inverse table, so their shapes are exactly right.
"""

import re

import pytest
import torch

from benchmarks.scale.full_size import (
    DEEPSEEK_REF_TO_HF, DEEPSEEK_STACKED, LLAMA_META_TO_HF, abstract_key, invert, rename, unstack,
)
from weight_mapper import WeightMapper

transformers = pytest.importorskip("transformers")

_DIM, _HIDDEN, _HEADS, _KV_HEADS, _VOCAB = 64, 160, 4, 2, 128

# The rename tables and helpers are the scale benchmark's own (benchmarks/scale/full_size.py):
# these tests run its code paths at small size, so its ground truth cannot rot either.
_LLAMA_FROM_META = LLAMA_META_TO_HF
_DEEPSEEK_FROM_REF = DEEPSEEK_REF_TO_HF
_DEEPSEEK_STACKED = DEEPSEEK_STACKED["hub"]  # transformers' stacked experts, from the Hub's per-expert names


def _from_target(target_shapes: dict, table: dict[str, str]) -> tuple[dict, dict]:
    """``({source name: shape}, truth)`` through the inverse of ``table``, in the target's order."""
    back = invert(table)
    source = {rename(name, back): tuple(shape) for name, shape in target_shapes.items()}
    return source, {s: rename(s, table) for s in source}


def _unstacked(shapes: dict) -> dict:
    """Stacked expert parameters split back into per-expert tensors (the Hub checkpoint's names)."""
    out = {}
    for name, shape in shapes.items():
        out.update(unstack(name, tuple(shape), _DEEPSEEK_STACKED) or {name: tuple(shape)})
    return out


def _meta_llama(n_layers: int = 4):
    config = transformers.LlamaConfig(hidden_size=_DIM, intermediate_size=_HIDDEN, num_hidden_layers=n_layers,
                                      num_attention_heads=_HEADS, num_key_value_heads=_KV_HEADS, vocab_size=_VOCAB)
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


def _meta_deepseek(n_layers: int, n_dense: int, n_experts: int = 8):
    config = transformers.DeepseekV3Config(
        vocab_size=_VOCAB, hidden_size=_DIM, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=n_layers, first_k_dense_replace=n_dense, n_routed_experts=n_experts,
        num_experts_per_tok=2, n_group=2, topk_group=1, num_attention_heads=_HEADS, num_key_value_heads=_HEADS,
        q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, head_dim=8,
    )
    with torch.device("meta"):
        return transformers.DeepseekV3ForCausalLM(config)


def _shapes(model) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _moe_stack(n_layers: int, n_experts: int = 16, dim: int = 32) -> tuple[dict, dict, dict]:
    """Reference-style MoE names -> HF-style names, every expert of one shape (benchmarks/scale/families.py)."""
    src, tgt, truth = {}, {}, {}
    for i in range(n_layers):
        a, z = f"layers.{i}.", f"model.layers.{i}."
        pairs = [(f"{a}attn.wq.weight", f"{z}self_attn.q_proj.weight", (dim, dim)),
                 (f"{a}attn.wo.weight", f"{z}self_attn.o_proj.weight", (dim, dim)),
                 (f"{a}attn_norm.weight", f"{z}input_layernorm.weight", (dim,)),
                 (f"{a}ffn_norm.weight", f"{z}post_attention_layernorm.weight", (dim,)),
                 (f"{a}ffn.gate.weight", f"{z}mlp.gate.weight", (n_experts, dim))]
        for m in range(n_experts):
            e, f = f"{a}ffn.experts.{m}.", f"{z}mlp.experts.{m}."
            pairs += [(f"{e}w1.weight", f"{f}gate_proj.weight", (2 * dim, dim)),
                      (f"{e}w2.weight", f"{f}down_proj.weight", (dim, 2 * dim)),
                      (f"{e}w3.weight", f"{f}up_proj.weight", (2 * dim, dim))]
        for sn, tn, shape in pairs:
            src[sn], tgt[tn], truth[sn] = shape, shape, tn
    return src, tgt, truth


# ------------------------------------------------------------------------------------ meta targets


@pytest.mark.parametrize("strategy", ["greedy", "best_match"])
def test_meta_llama_target_from_meta_names_as_shapes(strategy):
    target = _meta_llama()
    source, truth = _from_target(_shapes(target), _LLAMA_FROM_META)
    assert WeightMapper(source, target).suggest_mapping(strategy=strategy) == truth
    assert all(p.is_meta for p in target.parameters())


def test_meta_tensor_state_dict_source():
    target = _meta_llama(n_layers=2)
    back = invert(_LLAMA_FROM_META)
    source = {rename(k, back): v for k, v in target.state_dict().items()}  # meta tensors, no data
    truth = {s: rename(s, _LLAMA_FROM_META) for s in source}
    assert WeightMapper(source, _meta_llama(n_layers=2)).suggest_mapping() == truth


def test_deepseek_v3_reference_names_onto_hub_layout_all_correct():
    """2 dense + 1 MoE layer of 8 experts: every tensor, routed and shared experts included, 1:1."""
    hub = _unstacked(_shapes(_meta_deepseek(n_layers=3, n_dense=2)))
    source, truth = _from_target(hub, _DEEPSEEK_FROM_REF)
    assert len(source) == 65
    for strategy in ("greedy", "best_match"):
        assert WeightMapper(source, hub).suggest_mapping(strategy=strategy) == truth


def _deepseek_onto_meta_module(n_layers: int, n_dense: int) -> tuple[dict, dict]:
    """Reference names onto the meta module itself; the stacked experts have no 1:1 truth."""
    target = _meta_deepseek(n_layers, n_dense)
    one_to_one = {k: v for k, v in _shapes(target).items() if abstract_key(k)[0] not in _DEEPSEEK_STACKED}
    _, truth = _from_target(one_to_one, _DEEPSEEK_FROM_REF)
    source, _ = _from_target(_unstacked(_shapes(target)), _DEEPSEEK_FROM_REF)
    mapping = WeightMapper(source, target).suggest_mapping(strategy="best_match")
    return {s: mapping.get(s) for s in truth}, truth


def test_deepseek_v3_meta_module_every_1to1_tensor_correct():
    """3 dense + 3 MoE layers: the per-expert sources have no 1:1 target and must not take one."""
    got, truth = _deepseek_onto_meta_module(n_layers=6, n_dense=3)
    assert got == truth


def test_deepseek_v3_meta_module_one_moe_layer_every_1to1_tensor_correct():
    got, truth = _deepseek_onto_meta_module(n_layers=3, n_dense=2)
    assert got == truth


def test_deepseek_v3_stacked_experts_are_built_by_stack_and_stack_concat():
    """transformers 5 stacks each MoE layer's experts: gate_up_proj from every w1 then every w3."""
    target = _meta_deepseek(n_layers=3, n_dense=2)
    source, _ = _from_target(_unstacked(_shapes(target)), _DEEPSEEK_FROM_REF)
    mapper = WeightMapper(source, target)
    mapper.suggest_mapping()
    entries = {e.target: e for e in mapper.get_plan().entries}
    n_experts = target.config.n_routed_experts
    gate_up, down = entries["model.layers.2.mlp.experts.gate_up_proj"], entries["model.layers.2.mlp.experts.down_proj"]
    assert gate_up.transform == "stack_concat" and gate_up.args["concat_dim"] == 1
    assert gate_up.source == tuple(f"layers.2.ffn.experts.{e}.w{k}.weight" for k in (1, 3) for e in range(n_experts))
    assert down.transform == "stack"
    assert down.source == tuple(f"layers.2.ffn.experts.{e}.w2.weight" for e in range(n_experts))


# ------------------------------------------------------------------------------------ header only


_NORMS = re.compile(r"layers\.\d+\.(attention_norm|ffn_norm)\.weight")


@pytest.fixture
def llama_safetensors(tmp_path, monkeypatch):
    """``(path, source shapes, meta target, truth)``: Meta-named Llama weights in a safetensors
    file whose data must not be opened once written."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    import safetensors

    import weight_mapper.checkpoint

    target = _meta_llama(n_layers=2)
    source, truth = _from_target(_shapes(target), _LLAMA_FROM_META)
    path = tmp_path / "consolidated.safetensors"
    safetensors_torch.save_file({k: torch.zeros(shape) for k, shape in source.items()}, path)

    def no_data(*args, **kwargs):
        raise AssertionError("tensor data was opened while matching")

    for module, name in ((safetensors, "safe_open"), (safetensors_torch, "load_file"),
                         (safetensors_torch, "safe_open"), (weight_mapper.checkpoint, "safe_open")):
        monkeypatch.setattr(module, name, no_data, raising=False)
    return path, source, target, truth


def test_safetensors_source_is_matched_from_its_header_only(llama_safetensors):
    path, source, target, truth = llama_safetensors
    mapper = WeightMapper.from_checkpoint(path, target)
    assert dict(zip(mapper.source_table.names, mapper.source_table.shapes)) == source
    mapping = mapper.suggest_mapping(strategy="best_match")
    # Without definition order (a header is sorted by name) the norms rest on the vocabulary,
    # see the test below; everything else must be right.
    assert {s: t for s, t in mapping.items() if not _NORMS.fullmatch(s)} == {
        s: t for s, t in truth.items() if not _NORMS.fullmatch(s)}


def test_safetensors_source_norms_from_header_only(llama_safetensors):
    """Once a known failure (the shared 'attention' token sent attention_norm to
    post_attention_layernorm): the vocabulary knows both as the norm before attention."""
    path, _, target, truth = llama_safetensors
    assert WeightMapper.from_checkpoint(path, target).suggest_mapping(strategy="best_match") == truth


# ------------------------------------------------------------------------------------ decomposition


def test_repeated_blocks_split_into_tiny_problems():
    """~1,000 tensors of one MoE stack: every expert right, no assignment problem over 3 x 3."""
    src, tgt, truth = _moe_stack(n_layers=19)
    assert 900 < len(src) < 1_100
    for strategy in ("greedy", "best_match"):
        mapper = WeightMapper(src, tgt)
        assert mapper.suggest_mapping(strategy=strategy) == truth
        n_src, n_tgt = mapper._assignment.largest_bucket
        assert n_src <= 3 and n_tgt <= 3
