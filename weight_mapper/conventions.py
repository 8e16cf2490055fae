"""Known layout conventions: transforms a plan needs that the shapes cannot show.

Some conversions are not renames. Meta's reference Llama and torchtune keep the rows of each
head's query and key projections in *interleaved* rotary order (``x0 y0 x1 y1 ...``, rotated as
complex pairs); Hugging Face keeps them *half-split* (``x0 x1 ... y0 y1 ...``, ``rotate_half``).
A checkpoint copied across loads strictly, every shape fits, and the model is wrong.

Each convention is data in :data:`CONVENTIONS`: its name, the transforms that convert one
layout into the other (registered with their inverses in :mod:`weight_mapper.transforms`), the
rule that tells a side's layout, and where the convention is documented. :func:`apply_conventions`
applies a convention to the plan's entries when both sides' layouts are known and differ, and
*flags* the entries (``"convention:rotary"``) when one side may follow it but nothing short of a
forward pass can tell (then ``verify(..., repair=True)`` settles it).

| side's evidence | layout |
|---|---|
| a ``transformers`` model of a Llama-family ``config.model_type`` (rotary module ``rotary_emb``) | half-split |
| a module of type ``RotaryPositionalEmbeddings`` or ``Llama3ScaledRoPE`` from ``torchtune`` | interleaved |
| a module of type ``Qwen2RotaryPositionalEmbeddings`` or ``Phi3RotaryPositionalEmbeddings`` from ``torchtune`` | half-split |
| a complex ``freqs_cis`` attribute (Meta's reference ``Transformer``) | interleaved |
| checkpoint names ``model.layers.N.self_attn.q_proj`` + ``model.embed_tokens`` (no model) | half-split |
| checkpoint names ``layers.N.attention.wq`` + ``tok_embeddings`` (Meta reference) | interleaved |
| checkpoint names ``layers.N.attn.q_proj`` + ``tok_embeddings`` (torchtune, no model) | interleaved |
| any of these names on a model whose code is none of the above | unknown: flag |

q / k under a torchtune attention module with ``pos_embeddings=None`` (no rotary) are never
candidates.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from weight_mapper.plan import MappingPlan, PlanEntry

__all__ = ["Convention", "CONVENTIONS", "Layout", "rotary_layout", "apply_conventions", "convention_candidates",
           "ROTARY_FLAG"]

ROTARY_FLAG = "convention:rotary"

#: ``config.model_type`` of transformers models whose rotary embedding is ``rotate_half``.
HALF_SPLIT_MODEL_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
    "phi3", "olmo", "olmo2", "granite", "starcoder2", "deepseek_v3", "smollm3", "ministral",
})

# Query / key projections by their tensor names (weight or bias), and the names that tell a format.
_ROLE = re.compile(r"(?:^|\.)(?P<role>wq|wk|q_proj|k_proj)\.(?:weight|bias)$")
_NAME_RULES: tuple[tuple[str, re.Pattern, re.Pattern, str], ...] = (
    ("interleaved", re.compile(r"(?:^|\.)layers\.\d+\.attention\.wq\.weight$"), re.compile(r"(?:^|\.)tok_embeddings\."),
     "Meta reference names (layers.N.attention.wq, tok_embeddings)"),
    ("interleaved", re.compile(r"(?:^|\.)layers\.\d+\.attn\.q_proj\.weight$"), re.compile(r"(?:^|\.)tok_embeddings\."),
     "torchtune names (layers.N.attn.q_proj, tok_embeddings)"),
    ("half", re.compile(r"(?:^|\.)model\.layers\.\d+\.self_attn\.q_proj\.weight$"), re.compile(r"(?:^|\.)embed_tokens\."),
     "Hugging Face Llama-family names (model.layers.N.self_attn.q_proj, model.embed_tokens)"),
)
# torchtune's rotary modules by class name -> the q/k row layout their forward rotates
# (torchtune 0.6.1: modules/position_embeddings.py and models/llama3_1/_position_embeddings.py
# pair adjacent features, ``x.reshape(..., -1, 2)``; the Phi-3 and Qwen2 classes rotate halves as
# Hugging Face does, "not numerically equivalent to the RoPE Embedding module").
_TORCHTUNE_ROTARY: dict[str, str] = {
    "RotaryPositionalEmbeddings": "interleaved",
    "Llama3ScaledRoPE": "interleaved",
    "Phi3RotaryPositionalEmbeddings": "half",
    "Qwen2RotaryPositionalEmbeddings": "half",
}
_HEAD_ATTRS = ("num_attention_heads", "n_heads", "num_heads", "n_local_heads", "n_head")
_KV_HEAD_ATTRS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "n_local_kv_heads")


@dataclass(frozen=True)
class Layout:
    """What one side says about a convention.

    Attributes:
        kind: ``"interleaved"``, ``"half"``, ``"unknown"`` (the names look like a rotary model
            but its code is not one we know) or ``None`` (no sign of the convention).
        evidence: Why, in words (shown in the flag's explanation and in the docs).
        n_heads, n_kv_heads: Head counts, when the side's config or modules give them.
    """

    kind: str | None
    evidence: str = ""
    n_heads: int | None = None
    n_kv_heads: int | None = None


@dataclass(frozen=True)
class Convention:
    """One layout convention of the catalogue.

    Attributes:
        name: Short name; entries it may concern are flagged ``"convention:<name>"``.
        transforms: ``(from layout, to layout) -> transform name`` in :mod:`weight_mapper.transforms`.
        detect: ``(tensor names, module or None) -> Layout`` of one side.
        source: Where the convention is documented.
    """

    name: str
    transforms: Mapping[tuple[str, str], str]
    detect: Any
    source: str

    @property
    def flag(self) -> str:
        return f"convention:{self.name}"


def rotary_layout(names: Iterable[str], module: nn.Module | None = None) -> Layout:
    """The rotary q/k row layout one side uses, and the evidence.

    >>> rotary_layout(["tok_embeddings.weight", "layers.0.attention.wq.weight"]).kind
    'interleaved'
    >>> rotary_layout(["encoder.layer.0.attention.self.query.weight"]).kind is None
    True
    """
    names = list(names)
    by_names = next(((kind, why) for kind, q, other, why in _NAME_RULES
                     if any(q.search(n) for n in names) and any(other.search(n) for n in names)), None)
    n_heads, n_kv = _head_counts(module)
    if module is not None:
        config = getattr(module, "config", None)
        model_type = getattr(config, "model_type", None)
        if type(module).__module__.startswith("transformers.") and model_type in HALF_SPLIT_MODEL_TYPES:
            return Layout("half", f"transformers {type(module).__name__} (model_type {model_type!r}, rotate_half)",
                          n_heads, n_kv)
        for _, sub in module.named_modules():
            known = _TORCHTUNE_ROTARY.get(type(sub).__name__)
            if known is not None and type(sub).__module__.startswith("torchtune"):
                return Layout(known, f"torchtune {type(sub).__name__}", n_heads, n_kv)
            freqs = getattr(sub, "freqs_cis", None)
            if getattr(freqs, "is_complex", lambda: False)():
                return Layout("interleaved", f"complex freqs_cis of {type(sub).__name__} (Meta reference rotary)",
                              n_heads, n_kv)
        if by_names is not None:
            return Layout("unknown", f"{by_names[1]} on {type(module).__name__}, whose rotary code is not a "
                                     "known implementation", n_heads, n_kv)
        return Layout(None, "", n_heads, n_kv)
    if by_names is not None:
        return Layout(by_names[0], by_names[1])
    return Layout(None)


def _head_counts(module: nn.Module | None) -> tuple[int | None, int | None]:
    """Head counts from a config (transformers) or the attention modules' attributes."""
    if module is None:
        return None, None
    # The first holder that names a head count gives it; the key/value head count may live
    # elsewhere (torchtune's decoder has ``num_heads``, its attention modules ``num_kv_heads``).
    # Without one, the caller reads it from the k shapes rather than assuming n_heads.
    heads = kv = None
    for holder in (getattr(module, "config", None), *(m for _, m in module.named_modules())):
        if holder is None:
            continue
        heads = heads or next((getattr(holder, a) for a in _HEAD_ATTRS if isinstance(getattr(holder, a, None), int)),
                              None)
        kv = kv or next((getattr(holder, a) for a in _KV_HEAD_ATTRS if isinstance(getattr(holder, a, None), int)),
                        None)
        if heads and kv:
            break
    return (int(heads) if heads else None), (int(kv) if kv else None)


#: The catalogue. A new convention is one entry (and its transforms in ``transforms.TRANSFORMS``).
CONVENTIONS: tuple[Convention, ...] = (
    Convention(
        name="rotary",
        transforms={("interleaved", "half"): "rotary_half", ("half", "interleaved"): "rotary_interleave"},
        detect=rotary_layout,
        source="transformers convert_llama_weights_to_hf.py (permute); torchtune models/convert_weights.py "
               "(_permute in meta_to_tune / hf_to_tune and back)",
    ),
)


def _role(name: str) -> str | None:
    m = _ROLE.search(name)
    return None if m is None else m.group("role")[-1 if m.group("role").startswith("w") else 0]


def convention_candidates(plan: MappingPlan) -> list[int]:
    """Indices of the plan's entries a rotary convention may concern: q -> q and k -> k copies."""
    out = []
    for i, e in enumerate(plan.entries):
        if len(e.source) != 1 or e.transform not in (None, "rotary_half", "rotary_interleave"):
            continue
        role = _role(e.source[0])
        if role is not None and role == _role(e.target):
            out.append(i)
    return out


def _attention_of(name: str) -> str:
    """The module a q / k projection's tensor belongs under (``layers.0.attn`` for
    ``layers.0.attn.q_proj.weight``)."""
    return name.rsplit(".", 2)[0] if name.count(".") >= 2 else ""


def _no_rotary(module: nn.Module | None, prefix: str) -> set[str]:
    """Attention modules that rotate nothing: torchtune's ``MultiHeadAttention`` built with
    ``pos_embeddings=None`` (cross-attention, CLIP's vision layers). Their q / k are copied as
    they are whatever the model's other attention does (Llama 3.2 Vision's fusion layers)."""
    if module is None:
        return set()
    return {prefix + path for path, sub in module.named_modules()
            if type(sub).__module__.startswith("torchtune") and hasattr(sub, "pos_embeddings")
            and sub.pos_embeddings is None}


def rotary_entry(entry: PlanEntry, transform: str | None, n_heads: int | None, n_kv_heads: int | None) -> PlanEntry:
    """``entry`` with the rotary reordering ``transform`` (None: a plain copy) for its q or k rows."""
    if transform is None:
        args = {k: v for k, v in entry.args.items() if k != "n_heads"}
        return replace(entry, transform=None, args=args)
    heads = n_heads if _role(entry.target) == "q" else n_kv_heads
    return replace(entry, transform=transform, args={**entry.args, "n_heads": int(heads)})


def kv_heads_from_shapes(entries: list[PlanEntry], n_heads: int | None) -> int | None:
    """The key/value head count the q and k shapes imply when no config says it.

    The head size is a q projection's rows over ``n_heads``; a k projection has that many rows
    per key/value head (fewer heads than q under grouped-query attention). None when the shapes
    disagree or do not divide: the entries are then flagged rather than permuted with a guess.

    >>> e = lambda t, rows: PlanEntry(("s",), t, None, 1.0, 1.0, "tensor", (rows, 8), (rows, 8))
    >>> kv_heads_from_shapes([e("l.0.q_proj.weight", 64), e("l.0.k_proj.weight", 32)], 4)
    2
    """
    if not n_heads:
        return None
    q_rows = {e.target_shape[0] for e in entries if e.target_shape and _role(e.target) == "q"}
    k_rows = {e.target_shape[0] for e in entries if e.target_shape and _role(e.target) == "k"}
    if len(q_rows) != 1 or len(k_rows) > 1 or next(iter(q_rows)) % n_heads:
        return None
    head_dim = next(iter(q_rows)) // n_heads
    if not k_rows:
        return n_heads
    k = next(iter(k_rows))
    return k // head_dim if k % head_dim == 0 and n_heads % (k // head_dim or 1) == 0 else None


def rotary_heads_fit(entry: PlanEntry, n_heads: int | None, n_kv_heads: int | None) -> bool:
    heads = n_heads if _role(entry.target) == "q" else n_kv_heads
    rows = entry.target_shape[0] if entry.target_shape else 0
    return bool(heads) and rows % heads == 0 and (rows // heads) % 2 == 0


def apply_conventions(
    plan: MappingPlan, *, source_module: nn.Module | None = None, target_module: nn.Module | None = None
) -> tuple[MappingPlan, list[str]]:
    """Apply (or flag) the catalogue's conventions in ``plan``.

    Args:
        plan: A plan fresh from matching.
        source_module, target_module: The models, when known (their code and config are the
            best evidence; without them the checkpoint names decide).

    Returns:
        ``(plan, notes)``: the plan with the convention's transform on the entries it concerns
        (when both layouts are known and differ) or with those entries flagged
        ``"convention:<name>"`` (when one side may follow it but nothing confirms it); the
        notes say what was done and why. A ``conservative`` plan withholds flagged entries.
    """
    without = _no_rotary(source_module, plan.source_prefix) | _no_rotary(target_module, "")
    candidates = [i for i in convention_candidates(plan)
                  if not ({_attention_of(n) for n in plan.entries[i].source} | {_attention_of(plan.entries[i].target)})
                  & without]
    if not candidates:
        return plan, []
    # The source's own names, wrapper prefix included: the name rules allow any prefix, and the
    # prefix the matcher stripped can be part of the format's names (a tied Hugging Face
    # checkpoint has no lm_head.weight, so every key starts with "model.", read as a wrapper).
    src_names = [n for e in plan.entries for n in e.source] + list(plan.unmatched_source)
    tgt_names = [e.target for e in plan.entries] + list(plan.unmatched_target)
    entries = list(plan.entries)
    notes: list[str] = []
    for conv in CONVENTIONS:
        src, tgt = conv.detect(src_names, source_module), conv.detect(tgt_names, target_module)
        kinds = {src.kind, tgt.kind}
        if None in kinds or src.kind == tgt.kind:
            continue
        n_heads = src.n_heads or tgt.n_heads
        n_kv = src.n_kv_heads or tgt.n_kv_heads or kv_heads_from_shapes([entries[i] for i in candidates], n_heads)
        transform = conv.transforms.get((src.kind, tgt.kind))
        fits = all(rotary_heads_fit(entries[i], n_heads, n_kv) for i in candidates)
        if transform is not None and fits:
            for i in candidates:
                entries[i] = rotary_entry(entries[i], transform, n_heads, n_kv)
            notes.append(f"{conv.name}: {transform} on {len(candidates)} q/k entries ({n_heads} heads, {n_kv} "
                         f"key/value heads): source {src.kind} ({src.evidence}), target {tgt.kind} ({tgt.evidence})")
            continue
        why = "the head counts are unknown" if transform is not None else \
            f"source {src.kind} ({src.evidence or 'no evidence'}), target {tgt.kind} ({tgt.evidence or 'no evidence'})"
        for i in candidates:
            e = entries[i]
            if conv.flag not in e.flags:
                entries[i] = replace(e, flags=(*e.flags, conv.flag))
        notes.append(f"{conv.name}: {len(candidates)} q/k entries flagged {conv.flag!r}: {why}; a forward pass "
                     "settles it (verify(..., repair=True), or suggest_mapping with both models and dummy_input)")
    plan = replace(plan, entries=tuple(entries))
    if plan.strategy == "conservative":
        keep = tuple(e for e in plan.entries if not e.flagged)
        withheld = tuple(e for e in plan.entries if e.flagged)
        plan = replace(plan, entries=keep, ambiguous=plan.ambiguous + withheld,
                       unmatched_source=plan.unmatched_source + tuple(s for e in withheld for s in e.source),
                       unmatched_target=plan.unmatched_target + tuple(e.target for e in withheld))
    return plan, notes
