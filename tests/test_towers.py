"""Twin towers (weight_mapper/towers.py) and combined matches that must not steal held tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from weight_mapper import matching
from weight_mapper.matching import MatchOptions, match
from weight_mapper.table import TensorTable
from weight_mapper.towers import source_towers, tower_exclusions


def _table(shapes: dict[str, tuple[int, ...]]) -> TensorTable:
    return TensorTable.from_state_dict({k: torch.empty(v, device="meta") for k, v in shapes.items()})


class _Attn(nn.Module):
    def __init__(self, d: int, inner: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, inner, bias=False) for _ in range(3))
        self.output_proj = nn.Linear(inner, d, bias=False)


class _Mlp(nn.Module):
    def __init__(self, d: int, ff: int):
        super().__init__()
        self.w1, self.w3 = nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False)
        self.w2 = nn.Linear(ff, d, bias=False)


class _Norm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))


class _Layer(nn.Module):
    def __init__(self, d: int, inner: int, ff: int):
        super().__init__()
        self.attn, self.mlp = _Attn(d, inner), _Mlp(d, ff)
        self.sa_norm, self.mlp_norm = _Norm(d), _Norm(d)


class T5EncoderLike(nn.Module):
    """A T5 encoder laid out as torchtune lays it out (names only: it is never run)."""

    def __init__(self, vocab=96, d=32, inner=32, ff=64, layers=2, buckets=8, heads=4):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, d)
        self.relative_position_bias = nn.Module()
        self.relative_position_bias.embedding = nn.Embedding(buckets, heads)
        self.layers = nn.ModuleList(_Layer(d, inner, ff) for _ in range(layers))
        self.final_norm = _Norm(d)


@pytest.fixture(scope="module")
def t5():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(cfg)


def _sources(plan) -> list[str]:
    return [s for e in plan.entries for s in e.source]


def _filled(plan) -> dict[str, str]:
    """Target -> its (single) source."""
    return {e.target: e.source[0] for e in plan.entries if len(e.source) == 1}


def test_source_towers_descend_through_a_shared_wrapper():
    assert source_towers(["model.text.a.w", "model.vision.a.w", "model.scale"]) == [
        "model.text.", "model.vision.", "model.scale"]


@pytest.mark.parametrize("way", ["model", "state_dict"])
def test_an_encoder_target_draws_from_the_encoder_only(t5, way):
    target = T5EncoderLike()
    source = t5 if way == "model" else {k: v.detach() for k, v in t5.state_dict().items()}
    src = TensorTable.from_module(source) if way == "model" else TensorTable.from_state_dict(source)
    plan = match(src, TensorTable.from_module(target))
    used = _sources(plan)
    assert not [s for s in used if s.startswith("decoder.")]
    mapping = _filled(plan)
    assert mapping["final_norm.scale"] == "encoder.final_layer_norm.weight"
    assert mapping["relative_position_bias.embedding.weight"] == (
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    for n in range(2):
        assert mapping[f"layers.{n}.attn.q_proj.weight"] == f"encoder.block.{n}.layer.0.SelfAttention.q.weight"
        assert mapping[f"layers.{n}.mlp.w2.weight"] == f"encoder.block.{n}.layer.1.DenseReluDense.wo.weight"
        assert mapping[f"layers.{n}.mlp_norm.scale"] == f"encoder.block.{n}.layer.1.layer_norm.weight"
    assert all(s in plan.unmatched_source for s in (
        "decoder.final_layer_norm.weight", "decoder.block.0.layer.1.EncDecAttention.q.weight"))


def test_without_the_tower_rule_the_decoder_leaks_in(t5, monkeypatch):
    """The rule is what keeps the decoder out: the same pair without it mixes the towers."""
    monkeypatch.setattr(matching, "tower_exclusions", lambda *a, **k: None)
    plan = match(TensorTable.from_module(t5), TensorTable.from_module(T5EncoderLike()))
    assert [s for s in _sources(plan) if s.startswith("decoder.")]


def test_a_whole_encoder_decoder_target_keeps_both_towers(t5):
    table = TensorTable.from_module(t5)
    assert tower_exclusions(table, table, np.flatnonzero(table.is_canonical)) is None
    plan = match(table, table)
    assert not plan.unmatched_source and not plan.unmatched_target
    assert all(e.source == (e.target,) for e in plan.entries)


def test_two_halves_of_one_stack_are_no_rival_towers():
    """Blocks 0-1 under one top-level module and 2-3 under another: each supplies half the target."""
    block = {"attn.weight": (16, 16), "mlp.weight": (32, 16), "norm.weight": (16,)}
    src = _table({f"{half}.{b}.{k}": v for half, blocks in (("first", (0, 1)), ("second", (2, 3)))
                  for b in blocks for k, v in block.items()})
    tgt = _table({f"layers.{b}.{k}": v for b in range(4) for k, v in block.items()})
    assert tower_exclusions(src, tgt, np.arange(len(src))) is None
    plan = match(src, tgt)
    assert len(plan.entries) == 12 and not plan.unmatched_source


def test_a_tower_choice_needs_evidence():
    """Two identical towers and a first assignment split evenly between them: no decision."""
    layer = {"q.weight": (8, 8), "k.weight": (8, 8), "v.weight": (8, 8), "o.weight": (8, 8)}
    src = _table({f"{t}.{k}": v for t in ("left", "right") for k, v in layer.items()})
    tgt = _table(dict(layer))
    rows = np.array([0, 1, 4, 5])  # two targets from each tower
    assert tower_exclusions(src, tgt, rows) is None
    decided = tower_exclusions(src, tgt, np.array([0, 1, 2, 4]))
    assert decided is not None and decided.chosen == "left." and decided.excluded == ("right.",)
    assert sorted(decided.rows.tolist()) == [4, 5, 6, 7]
    assert "right left out" in decided.describe()


def test_a_split_does_not_take_targets_held_by_better_one_to_one_matches():
    """An embedding whose row count equals q + k + v is no fused qkv when q, k and v match by name."""
    shapes = {"emb.weight": (96, 32), "layers.0.attn.q.weight": (32, 32), "layers.0.attn.k.weight": (32, 32),
              "layers.0.attn.v.weight": (32, 32), "layers.0.attn.o.weight": (32, 32)}
    target = {"layers.0.attn.q_proj.weight": (32, 32), "layers.0.attn.k_proj.weight": (32, 32),
              "layers.0.attn.v_proj.weight": (32, 32), "layers.0.attn.output_proj.weight": (32, 32)}
    plan = match(_table(shapes), _table(target))
    assert _filled(plan) == {t: t.replace("output_proj", "o").replace("_proj", "") for t in target}
    assert "emb.weight" in plan.unmatched_source


def test_a_fused_source_still_splits_into_unheld_targets():
    """The rule leaves real splits alone: a fused qkv whose parts have no 1:1 partner."""
    plan = match(_table({"blk.attn.qkv.weight": (96, 32), "blk.attn.proj.weight": (32, 32)}),
                 _table({"blk.attn.q_proj.weight": (32, 32), "blk.attn.k_proj.weight": (32, 32),
                         "blk.attn.v_proj.weight": (32, 32), "blk.attn.o_proj.weight": (32, 32)}),
                 options=MatchOptions(threshold=0.5))
    fused = [e for e in plan.entries if e.source == ("blk.attn.qkv.weight",)]
    assert sorted(e.target for e in fused) == ["blk.attn.k_proj.weight", "blk.attn.q_proj.weight",
                                               "blk.attn.v_proj.weight"]
