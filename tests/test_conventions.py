"""Layout conventions the shapes cannot show: the rotary q/k rows of Meta / torchtune vs Hugging Face."""

import pytest
import torch
from safetensors.torch import save_file

from reference_llama import MetaTransformer, TransformerDecoder, hf_to_meta_truth, hf_to_tune_truth
from weight_mapper import WeightMapper, apply_plan
from weight_mapper.conventions import ROTARY_FLAG, apply_conventions, rotary_layout
from weight_mapper.plan import FLAG_DESCRIPTIONS, MappingPlan, PlanEntry
from weight_mapper.transforms import get_transform

transformers = pytest.importorskip("transformers")

_LAYERS, _VOCAB, _DIM, _HIDDEN, _HEADS, _KV_HEADS = 2, 96, 64, 160, 4, 2


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _hf(tied=False):
    config = transformers.LlamaConfig(
        vocab_size=_VOCAB, hidden_size=_DIM, intermediate_size=_HIDDEN, num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS, num_key_value_heads=_KV_HEADS, max_position_embeddings=64,
        rms_norm_eps=1e-6, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config).eval()


def _meta():
    return MetaTransformer(_VOCAB, _DIM, _HIDDEN, _LAYERS, _HEADS, _KV_HEADS).eval()


def _tune(interleaved=True):
    return TransformerDecoder(_VOCAB, _DIM, _HIDDEN, _LAYERS, _HEADS, _KV_HEADS, interleaved=interleaved).eval()


def _ids():
    return torch.randint(0, _VOCAB, (2, 12))


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def _independent_hf_to_interleaved(hf_sd, truth):
    """transformers' convert_llama_weights_to_hf permute, undone, written out independently."""
    out = {}
    for k, v in hf_sd.items():
        heads = _HEADS if "q_proj" in k else _KV_HEADS if "k_proj" in k else None
        if heads is not None:
            hd = v.shape[0] // heads
            v = v.view(heads, 2, hd // 2, -1).transpose(1, 2).reshape(v.shape)
        out[truth[k]] = v
    return out


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_rotary_transforms_are_inverses_and_match_the_reference_permutation(heads):
    w = torch.randn(heads * 8, 5)
    half = get_transform("rotary_half").apply([w], {"n_heads": heads})
    hd = 8
    expected = w.view(heads, hd // 2, 2, 5).transpose(1, 2).reshape(heads * hd, 5)  # HF's permute
    assert torch.equal(half, expected)
    assert torch.equal(get_transform("rotary_interleave").apply([half], {"n_heads": heads}), w)
    bias = torch.arange(heads * 8.0)
    assert torch.equal(get_transform("rotary_interleave").apply([get_transform("rotary_half").apply(
        [bias], {"n_heads": heads})], {"n_heads": heads}), bias)


def test_rotary_transform_refuses_rows_that_are_not_heads_of_even_size():
    e = PlanEntry(("a",), "b", "rotary_half", 1.0, 1.0, "tensor", (6, 2), (6, 2), args={"n_heads": 2})
    with pytest.raises(Exception, match="cannot rotary_half .*'a'.*even size"):
        apply_plan(MappingPlan((e,)), {"a": torch.zeros(6, 2)})


def test_layouts_are_told_by_code_config_and_names():
    assert rotary_layout(hf_sd_names := list(_hf().state_dict())).kind == "half"
    assert rotary_layout(hf_sd_names, _hf()).n_heads == _HEADS
    assert rotary_layout(list(_meta().state_dict())).kind == "interleaved"
    meta = rotary_layout(list(_meta().state_dict()), _meta())
    assert meta.kind == "interleaved" and "freqs_cis" in meta.evidence and meta.n_kv_heads == _KV_HEADS
    assert rotary_layout(list(_tune().state_dict())).kind == "interleaved"  # torchtune checkpoint names
    assert rotary_layout(list(_tune().state_dict()), _tune()).kind == "unknown"  # its code is not torchtune's
    assert rotary_layout(["encoder.layer.0.attention.self.query.weight"]).kind is None
    assert ROTARY_FLAG in FLAG_DESCRIPTIONS


def test_hf_to_meta_reference_converts_exactly_from_the_models():
    hf, meta, ids = _hf(), _meta(), _ids()
    mapper = WeightMapper(hf, meta)
    assert mapper.suggest_mapping() == hf_to_meta_truth(_LAYERS)
    qk = [e for e in mapper.get_plan().entries if e.target.endswith(("wq.weight", "wk.weight"))]
    assert len(qk) == 2 * _LAYERS and all(e.transform == "rotary_interleave" and not e.flags for e in qk)
    assert {e.args["n_heads"] for e in qk if "wk" in e.target} == {_KV_HEADS}
    converted = apply_plan(mapper.get_plan(), hf.state_dict())
    assert all(torch.equal(converted[k], v) for k, v in _independent_hf_to_interleaved(
        hf.state_dict(), hf_to_meta_truth(_LAYERS)).items())
    meta.load_state_dict(converted, strict=True)
    assert torch.allclose(_logits(hf, ids), _logits(meta, ids), atol=1e-5)


def test_meta_checkpoint_alone_converts_to_hf_and_back(tmp_path):
    meta, ids = _meta(), _ids()
    path = tmp_path / "consolidated.safetensors"
    save_file({k: v.contiguous() for k, v in meta.state_dict().items()}, path)
    hf = _hf()
    mapper = WeightMapper.from_checkpoint(path, hf)  # the source is names and shapes only
    mapper.suggest_mapping()
    plan = mapper.get_plan()
    assert {e.transform for e in plan.entries if "_proj" in e.target and e.target.endswith(("q_proj.weight",
                                                                                            "k_proj.weight"))} == {"rotary_half"}
    assert not any(ROTARY_FLAG in e.flags for e in plan.entries)  # detected, so applied, not flagged
    hf.load_state_dict(apply_plan(plan, meta.state_dict()), strict=True)
    assert torch.allclose(_logits(hf, ids), _logits(meta, ids), atol=1e-5)
    back = apply_plan(plan.inverse(), hf.state_dict())  # and back: the inverse keeps the head counts
    assert all(torch.equal(back[k], v) for k, v in meta.state_dict().items())


def test_torchtune_checkpoint_alone_converts_to_hf(tmp_path):
    tune, ids = _tune(), _ids()
    hf = _hf()
    mapper = WeightMapper.from_state_dict(dict(tune.state_dict()), hf)
    mapper.suggest_mapping()
    hf.load_state_dict(apply_plan(mapper.get_plan(), tune.state_dict()), strict=True)
    assert torch.allclose(_logits(hf, ids), _logits(tune, ids), atol=1e-5)


@pytest.mark.parametrize("interleaved", [True, False])
def test_undetectable_layout_is_flagged_and_settled_by_a_forward_pass(interleaved):
    hf, ids = _hf(), _ids()
    tune = _tune(interleaved)  # torchtune names; its rotary code is nothing weight_mapper knows
    flagged = WeightMapper(hf, tune)
    assert flagged.suggest_mapping() == hf_to_tune_truth(_LAYERS)
    qk = [e for e in flagged.get_plan().entries if e.target.endswith(("q_proj.weight", "k_proj.weight"))]
    assert all(ROTARY_FLAG in e.flags and e.transform is None for e in qk)
    assert any(ROTARY_FLAG in n for n in flagged.notes)
    conservative = WeightMapper(hf, tune).suggest_mapping(strategy="conservative")
    assert not any(k.endswith(("q_proj.weight", "k_proj.weight")) for k in conservative)

    proved = WeightMapper(hf, tune, dummy_input=ids)
    assert proved.suggest_mapping() == hf_to_tune_truth(_LAYERS)
    plan = proved.get_plan()
    qk = [e for e in plan.entries if e.target.endswith(("q_proj.weight", "k_proj.weight"))]
    assert all(not e.flags for e in qk)
    if interleaved:
        assert all(e.transform == "rotary_interleave" and e.provenance == "repaired" for e in qk)
    else:
        assert all(e.transform is None and e.provenance == "proved" for e in qk)
    assert proved.verification.ok and proved.verification.n_forward <= 4
    tune.load_state_dict(apply_plan(plan, hf.state_dict()), strict=True)
    assert torch.allclose(_logits(hf, ids), _logits(tune, ids), atol=1e-5)


def test_apply_conventions_leaves_unrelated_plans_alone():
    e = PlanEntry(("a.q_proj.weight",), "b.q_proj.weight", None, 1.0, 1.0, "tensor", (4, 4), (4, 4))
    plan = MappingPlan((e,))
    assert apply_conventions(plan) == (plan, [])


def test_head_counts_look_past_a_holder_without_the_key_value_count():
    """torchtune's decoder names ``num_heads``; only its attention modules name ``num_kv_heads``.
    The key/value count must come from them (or from the k shapes), never be assumed equal."""
    from torch import nn

    from weight_mapper.conventions import _head_counts

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads, self.num_kv_heads = 4, 2

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads = 4
            self.attn = Attention()

    class NoKv(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads = 4

    assert _head_counts(Decoder()) == (4, 2)
    assert _head_counts(NoKv()) == (4, None)  # then kv_heads_from_shapes decides, or the entries are flagged


def test_a_tied_hf_checkpoint_without_lm_head_still_reads_as_hugging_face(tmp_path):
    """Llama 3.2 / Gemma checkpoints tie the head to the embedding and save no lm_head.weight, so
    every key starts with "model.", which the matcher strips as a wrapper; the rotary rule must
    still read the names as Hugging Face's (the zoo's tt_gemma_hf_to_tune, tt_llama3_2_hf_to_tune)."""
    from weight_mapper.matching import match
    from weight_mapper.table import TensorTable

    hf = _hf(tied=True)
    sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    assert all(k.startswith("model.") for k in sd)
    # both sides as checkpoints (names and shapes): the names alone must tell the two layouts
    plan = match(TensorTable.from_state_dict(sd), TensorTable.from_state_dict(_tune().state_dict()))
    assert plan.source_prefix == "model."
    qk_rows = [i for i, e in enumerate(plan.entries) if e.target.endswith(("q_proj.weight", "k_proj.weight"))]
    # read as two layouts (half-split -> interleaved): with no module to count the heads, flagged,
    # where before the stripped "model." hid the source's layout and the copies went unflagged
    flagged, notes = apply_conventions(plan)
    assert len(qk_rows) == 2 * _LAYERS and all(ROTARY_FLAG in flagged.entries[i].flags for i in qk_rows), notes
    assert "head counts are unknown" in notes[0]


def test_a_tied_checkpoint_saved_under_one_name_accepts_its_model(tmp_path):
    """safetensors keeps one name of a tied group; source_model= must not refuse the file for the other."""
    from safetensors.torch import save_model

    hf = _hf(tied=True)
    path = tmp_path / "model.safetensors"
    save_model(hf, str(path))
    mapper = WeightMapper.from_checkpoint(path, _tune(), source_model=hf)  # refused before: "missing"
    mapper.suggest_mapping()
    plan = mapper.get_plan()
    assert set(plan.unmatched_target) <= {"output.weight"}  # untied in the target: one tensor fills one
    qk = [e for e in plan.entries if e.target.endswith(("q_proj.weight", "k_proj.weight"))]
    # the source's code is Hugging Face's (half-split); the reference decoder's is not one we know
    assert len(qk) == 2 * _LAYERS and all(ROTARY_FLAG in e.flags for e in qk)



@pytest.mark.parametrize(("cls", "where", "kind"), [
    ("RotaryPositionalEmbeddings", "torchtune.modules.position_embeddings", "interleaved"),
    ("Llama3ScaledRoPE", "torchtune.models.llama3_1._position_embeddings", "interleaved"),
    ("Qwen2RotaryPositionalEmbeddings", "torchtune.models.qwen2._positional_embeddings", "half"),
    ("Phi3RotaryPositionalEmbeddings", "torchtune.models.phi3._position_embeddings", "half"),
    ("Llama3ScaledRoPE", "somewhere_else", "unknown"),  # a look-alike outside torchtune is not trusted
])
def test_torchtune_rotary_modules_say_their_layout(cls, where, kind):
    rope = type(cls, (torch.nn.Module,), {"__module__": where})
    model = torch.nn.Module()
    model.rope = rope()
    names = ["tok_embeddings.weight", "layers.0.attn.q_proj.weight"]
    assert rotary_layout(names, model).kind == kind


def test_attention_without_rotary_keeps_its_q_and_k_as_they_are():
    """torchtune's MultiHeadAttention(pos_embeddings=None) (cross-attention, CLIP's vision layers)
    rotates nothing: of Llama 3.2 Vision's q / k only the self-attention ones are permuted."""
    tt = "torchtune.modules.attention"
    rope_cls = type("RotaryPositionalEmbeddings", (torch.nn.Module,), {"__module__": "torchtune.modules.position_embeddings"})
    attn_cls = type("MultiHeadAttention", (torch.nn.Module,), {"__module__": tt})

    def attention(rope):
        a = attn_cls()
        a.pos_embeddings = rope
        a.num_heads, a.num_kv_heads = 2, 2
        a.q_proj, a.k_proj = torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False)
        return a

    target = torch.nn.Module()
    target.tok_embeddings = torch.nn.Embedding(4, 8)
    target.layers = torch.nn.ModuleList([torch.nn.Module(), torch.nn.Module()])
    target.layers[0].attn = attention(rope_cls())
    target.layers[1].attn = attention(None)  # a cross-attention layer
    entries = tuple(PlanEntry((f"model.layers.{i}.self_attn.{r}_proj.weight",), f"layers.{i}.attn.{r}_proj.weight",
                              None, 1.0, 1.0, "tensor", (8, 8), (8, 8)) for i in (0, 1) for r in "qk")
    plan = MappingPlan(entries, unmatched_source=("model.embed_tokens.weight",))
    converted, _ = apply_conventions(plan, target_module=target)
    by_target = {e.target: e.transform for e in converted.entries}
    assert by_target["layers.0.attn.q_proj.weight"] == by_target["layers.0.attn.k_proj.weight"] == "rotary_interleave"
    assert by_target["layers.1.attn.q_proj.weight"] is None and by_target["layers.1.attn.k_proj.weight"] is None
    assert not any(e.flags for e in converted.entries)
