"""Flags that make a doubtful entry visible: ``swap_partner`` (assign) and ``contested_name`` (planner)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from weight_mapper import WeightMapper, names
from weight_mapper.assign import AMBIGUITY_MARGIN, SWAP_PARTNER_MARGIN, _swap_partners
from weight_mapper.matching import MatchOptions, match
from weight_mapper.plan import FLAG_DESCRIPTIONS
from weight_mapper.table import TensorTable


def _level(total: np.ndarray):
    """A dense 3 x 3 bucket (sources a, b, c; targets x, y, z), as much of a Level as the flag reads."""
    n = total.shape[0]
    si, ti = np.repeat(np.arange(n), n), np.tile(np.arange(n), n)
    return SimpleNamespace(si=si, ti=ti, src=[0] * n, tgt=[0] * n, offsets=np.array([0, n * n])), total.ravel()


def _flags(b_to_x: float) -> list[tuple[str, ...]]:
    # a -> x is doubtful (margin 0.015); b -> y is sure enough alone (margin >= 0.02).
    total = np.array([[0.900, 0.885, 0.10],
                      [b_to_x, 0.930, 0.10],
                      [0.10, 0.10, 0.950]])
    level, flat = _level(total)
    edges = np.array([0, 4, 8])
    margin = np.array([0.015, 0.930 - max(b_to_x, 0.885), 0.85])
    assert margin[0] < AMBIGUITY_MARGIN <= margin[1]
    flags = np.empty(3, dtype=object)
    flags[:] = [()] * 3
    out = _swap_partners(level, edges, margin, flat, np.ones(9, bool), np.zeros(9, bool), flags)
    return list(out)


def test_a_cheap_exchange_with_a_doubtful_pair_flags_the_partner():
    # exchanging a->x, b->y for a->y, b->x loses 0.900 + 0.930 - 0.885 - 0.900 = 0.045
    assert 0.045 < SWAP_PARTNER_MARGIN
    assert _flags(b_to_x=0.900) == [(), ("swap_partner",), ()]


def test_a_costly_exchange_flags_nothing():
    # the same exchange loses 0.075 when b -> x scores 0.87
    assert _flags(b_to_x=0.870) == [(), (), ()]


def _gemma_like(post_attention_sibling: bool = True) -> tuple[TensorTable, TensorTable]:
    """Hugging Face Gemma-2 layer names -> torchtune's (state dicts, names and shapes only)."""
    d, src, tgt = 16, {}, {}
    for i in range(2):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            src[p + f"self_attn.{n}.weight"] = (d, d)
        for n in ("q_proj", "k_proj", "v_proj", "output_proj"):
            tgt[q + f"attn.{n}.weight"] = (d, d)
        norms = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"]
        if not post_attention_sibling:  # Llama's two norms
            norms = norms[:2]
        for n in norms:
            src[p + n + ".weight"] = (d,)
        for n in ("sa_norm", "mlp_norm", "sa_scale", "mlp_scale")[:len(norms)]:
            tgt[q + n + ".scale"] = (d,)
    return tuple(TensorTable.from_state_dict({k: torch.empty(v, device="meta") for k, v in side.items()})
                 for side in (src, tgt))


def test_contested_post_attention_layernorm_is_flagged_beside_a_pre_feedforward_norm():
    src, tgt = _gemma_like()
    plan = match(src, tgt)
    contested = {e.target: e.source for e in plan.entries if "contested_name" in e.flags}
    # Wherever Gemma's post_attention_layernorm went, the entry says its name is not to be trusted.
    assert {e.target for e in plan.entries if e.source[0].endswith("post_attention_layernorm.weight")} <= set(contested)
    assert len(contested) == 2
    assert "contested_name" in FLAG_DESCRIPTIONS
    withheld = match(src, tgt, options=MatchOptions(strategy="conservative"))
    assert set(contested) <= {e.target for e in withheld.ambiguous}


def test_the_flag_comes_from_the_vocabulary(monkeypatch):
    monkeypatch.setattr(names, "CONTESTED", {})
    src, tgt = _gemma_like()
    assert not [e for e in match(src, tgt).entries if "contested_name" in e.flags]


@pytest.mark.parametrize("case", ["llama", "same_names"])
def test_no_contest_without_the_sibling_or_between_equal_names(case):
    src, tgt = _gemma_like(post_attention_sibling=case != "llama")
    if case == "same_names":
        tgt = src
    assert not [e for e in match(src, tgt).entries if "contested_name" in e.flags]


class _Norm(nn.Module):
    def __init__(self, d: int, leaf: str):
        super().__init__()
        self.leaf = leaf
        self.register_parameter(leaf, nn.Parameter(torch.ones(d)))

    def forward(self, x):
        return x * getattr(self, self.leaf)


class _Attn(nn.Module):
    def __init__(self, d: int, out: str):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d, bias=False) for _ in range(3))
        setattr(self, out, nn.Linear(d, d, bias=False))
        self.out = out

    def forward(self, x):
        return getattr(self, self.out)(self.q_proj(x) * self.k_proj(x) + self.v_proj(x))


class _GemmaLayer(nn.Module):
    """Hugging Face's names, Gemma's sandwich norms (defined in Hugging Face's order)."""

    def __init__(self, d: int):
        super().__init__()
        self.self_attn, self.mlp = _Attn(d, "o_proj"), nn.Sequential(nn.Linear(d, 2 * d), nn.Linear(2 * d, d))
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm"):
            setattr(self, n, _Norm(d, "weight"))

    def forward(self, x):
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x)))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class _TuneLayer(nn.Module):
    """torchtune's names and definition order (sa_norm, mlp_norm, sa_scale, mlp_scale)."""

    def __init__(self, d: int):
        super().__init__()
        self.attn, self.mlp = _Attn(d, "output_proj"), nn.Sequential(nn.Linear(d, 2 * d), nn.Linear(2 * d, d))
        for n in ("sa_norm", "mlp_norm", "sa_scale", "mlp_scale"):
            setattr(self, n, _Norm(d, "scale"))

    def forward(self, x):
        h = x + self.sa_scale(self.attn(self.sa_norm(x)))
        return h + self.mlp_scale(self.mlp(self.mlp_norm(h)))


class _Decoder(nn.Module):
    def __init__(self, layer, d: int = 16, n: int = 2):
        super().__init__()
        self.embed = nn.Embedding(50, d)
        self.layers = nn.ModuleList(layer(d) for _ in range(n))

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_contested_name_leaves_the_decision_to_the_data_flow():
    """Both models at hand: the flow places Gemma's post_attention_layernorm on the attention output."""
    plan = WeightMapper(_Decoder(_GemmaLayer), _Decoder(_TuneLayer)).suggest_mapping().plan
    filled = {e.target: e.source[0] for e in plan.entries}
    for i in range(2):
        p = f"layers.{i}."
        assert filled[p + "sa_norm.scale"] == p + "input_layernorm.weight"
        assert filled[p + "sa_scale.scale"] == p + "post_attention_layernorm.weight"
        assert filled[p + "mlp_norm.scale"] == p + "pre_feedforward_layernorm.weight"
        assert filled[p + "mlp_scale.scale"] == p + "post_feedforward_layernorm.weight"


def test_without_the_contested_entry_the_vocabulary_swaps_the_norms(monkeypatch):
    monkeypatch.setattr(names, "CONTESTED", {})
    plan = WeightMapper(_Decoder(_GemmaLayer), _Decoder(_TuneLayer)).suggest_mapping().plan
    filled = {e.target: e.source[0] for e in plan.entries}
    assert filled["layers.0.mlp_norm.scale"] == "layers.0.post_attention_layernorm.weight"


def test_names_that_differ_only_by_spelling_noise_leave_the_decision_to_order():
    """Position-free block names (``oak``, ``ash``) against numbered ones: the name scores differ by
    a few thousandths of edit distance, which is no evidence; the match is order's and says so."""
    shape = (4, 4)
    src = TensorTable.from_state_dict({f"layers.{i}.fc.weight": torch.empty(shape, device="meta") for i in range(3)})
    tgt = TensorTable.from_state_dict({f"blocks.{n}.proj.weight": torch.empty(shape, device="meta")
                                       for n in ("oak", "ash", "fir")})
    plan = match(src, tgt)
    assert len(plan.entries) == 3 and all("order_only" in e.flags for e in plan.entries)
