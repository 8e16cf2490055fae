r"""Rename rules: a mapping compressed into a short, ordered list of regex substitutions.

A :class:`RenameRule` is a ``^``-anchored Python regex and its ``re.sub`` replacement. A list
of rules is read the way transformers 4.x reads ``from_pretrained(key_mapping=...)``: the
first rule whose pattern matches a key rewrites it (``re.sub(..., count=1)``) and no other
rule is tried; a key that no rule matches is kept. :func:`infer_rules` finds a short list that
reproduces a ``{source_key: target_key}`` mapping exactly, numbered blocks included
(``^model\.layers\.(\d+)\.self_attn\.`` -> ``layers.\1.attn.``); the ``rules_to_*`` functions
write it in the formats transformers, mmengine and torchtune read. See ``docs/rules.md``.

How :func:`infer_rules` works, in data-flow order:

1. Each key is cut into dot components and each component into digit runs and the rest.
   A digit run that reaches the target unchanged is *carried* and becomes a ``(\d+)`` group;
   the others stay literal. Keys with the same templates form a class.
2. Every class offers candidate rules, one per split point where source and target share a
   suffix: ``^P\.`` -> ``Q.`` rewrites the prefix and keeps the rest, ``^S$`` -> ``T``
   rewrites the whole key. Candidates with the same pattern compete; the one valid for most
   keys wins. Each key starts with its most general winning candidate.
3. Rules are ordered most specific first (more components, then fewer groups), so a general
   rule only sees the keys no exception claimed. Keys that are still wrong get a more
   specific candidate (their own full literal rule at worst), rules that serve no key alone
   are dropped, and the final list is checked against every key.
"""

from __future__ import annotations

import functools
import heapq
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from weight_mapper.errors import MappingError
from weight_mapper.names import natural_key

if TYPE_CHECKING:
    from weight_mapper.plan import MappingPlan

__all__ = [
    "RenameRule",
    "infer_rules",
    "apply_rules",
    "check_rules",
    "rules_to_key_mapping",
    "rules_to_revise_keys",
    "rules_to_torchtune_table",
    "RuleForms",
    "rule_forms",
]

# Repair rounds before the remaining wrong keys get literal rules outright.
_MAX_REPAIR_ROUNDS = 20
# Attempts at a list that is exact under chained application too (see _Inference.run).
_MAX_BAN_ROUNDS = 8

_DIGIT_RUNS = re.compile(r"\d+|\D+")


@dataclass(frozen=True)
class RenameRule:
    r"""One regex rename: ``re.sub(pattern, replacement, key, count=1)``.

    Attributes:
        pattern: A Python regex anchored with ``^`` (and ``$`` for a whole-key rule),
            e.g. ``^backbone\.layer(\d+)\.``.
        replacement: Its ``re.sub`` replacement, with backreferences ``\1``,
            e.g. ``encoder.block\1.``.

    >>> print(RenameRule(r"^backbone\.", "encoder.").apply("backbone.conv.weight"))
    encoder.conv.weight
    """

    pattern: str
    replacement: str

    def __post_init__(self) -> None:
        _compile(self.pattern)  # fail early, naming the pattern

    def matches(self, name: str) -> bool:
        """Whether the pattern matches ``name`` (``re.search``, as transformers tests it)."""
        return _compile(self.pattern).search(name) is not None

    def apply(self, name: str) -> str:
        """``name`` rewritten by this rule alone; unchanged when the pattern does not match."""
        return _compile(self.pattern).sub(self.replacement, name, count=1)

    def __str__(self) -> str:
        return f"{self.pattern} -> {self.replacement}"


@functools.lru_cache(maxsize=16384)
def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise MappingError(f"rename rule pattern {pattern!r} is not a valid regex ({exc})") from None


# ---------------------------------------------------------------------------- applying
def apply_rules(rules: Sequence[RenameRule], name: str) -> str:
    r"""Rename one key: the first rule whose pattern matches rewrites it, once.

    This is how transformers 4.x applies ``key_mapping``: for each ``(pattern, replacement)``
    in order, ``re.subn(pattern, replacement, key)``, stopping at the first that replaced
    anything. Patterns anchored with ``^`` match at most once, so ``count=1`` changes nothing.

    Args:
        rules: Rules in priority order.
        name: A source key.

    Returns:
        The renamed key; ``name`` itself when no rule matches.

    >>> rules = [RenameRule(r"^a\.(\d+)\.w$", r"b.\1.weight"), RenameRule(r"^a\.", "c.")]
    >>> apply_rules(rules, "a.3.w"), apply_rules(rules, "a.x"), apply_rules(rules, "z")
    ('b.3.weight', 'c.x', 'z')
    """
    for rule in rules:
        renamed, n = _compile(rule.pattern).subn(rule.replacement, name, count=1)
        if n:
            return renamed
    return name


def _apply_chained(rules: Sequence[RenameRule], name: str) -> str:
    # mmengine's revise_keys (and transformers 5's renamings): every rule, in turn, on the
    # result of the previous ones.
    for rule in rules:
        name = _compile(rule.pattern).sub(rule.replacement, name)
    return name


def check_rules(rules: Sequence[RenameRule], mapping: Mapping[str, str], *, chained: bool = False) -> list[str]:
    r"""Source keys the rules do not rename to their target (empty: the rules are exact).

    Args:
        rules: Rules in priority order.
        mapping: ``{source_key: target_key}``.
        chained: Apply every rule in turn to the result of the previous ones instead of
            stopping at the first match, as mmengine's ``revise_keys`` does (and transformers 5
            with ``key_mapping``). :func:`infer_rules` orders its rules so that both readings
            agree whenever that is possible.

    Returns:
        The failing source keys, in mapping order.

    >>> check_rules([RenameRule(r"^a\.", "b.")], {"a.w": "b.w", "c.w": "c.w", "a.v": "x.v"})
    ['a.v']
    """
    rename = _apply_chained if chained else apply_rules
    return [src for src, tgt in mapping.items() if rename(rules, src) != tgt]


# ---------------------------------------------------------------------------- exporting
def rules_to_key_mapping(rules: Sequence[RenameRule], mapping: Mapping[str, str] | None = None, *,
                         transformers5: bool = False) -> dict[str, str]:
    r"""The rules as transformers' ``from_pretrained(key_mapping=...)``: ``{pattern: replacement}``.

    Transformers 4.x applies it exactly like :func:`apply_rules` (first match wins). A pattern
    that occurs twice keeps its first replacement, the only one that can ever fire.
    Transformers 5 reads the dict differently (every matching entry fires in turn, and only
    ``\1`` is substituted): see ``docs/rules.md`` before using rules with two groups there.

    Args:
        rules: Rules in priority order.
        mapping: When given, the dict is written only if it reproduces ``mapping`` exactly:
            first match wins, and with ``transformers5=True`` also applied in turn with at
            most one group per rule.
        transformers5: Check for transformers 5's reading too.

    Raises:
        MappingError: If ``mapping`` is given and the dict would rename a key wrongly.

    >>> rules_to_key_mapping([RenameRule(r"^backbone\.", "encoder.")])
    {'^backbone\\.': 'encoder.'}
    """
    if mapping is not None:
        _refuse_if_wrong(rules, mapping, chained=False, form="key_mapping")
        if transformers5:
            _refuse_if_wrong(rules, mapping, chained=True, form="key_mapping for transformers 5")
            grouped = [r for r in rules if _compile(r.pattern).groups > 1]
            if grouped:
                raise MappingError(
                    f"refusing to write key_mapping for transformers 5: rule {grouped[0]} has "
                    f"{_compile(grouped[0].pattern).groups} groups and transformers 5 fills only \\1; "
                    "infer the rules with max_groups=1"
                )
    out: dict[str, str] = {}
    for rule in rules:
        out.setdefault(rule.pattern, rule.replacement)
    return out


def rules_to_revise_keys(rules: Sequence[RenameRule], mapping: Mapping[str, str] | None = None
                         ) -> list[tuple[str, str]]:
    r"""The rules as mmengine's ``load_checkpoint(revise_keys=[(pattern, replacement), ...])``.

    mmengine applies *every* pair in turn (``re.sub`` over all keys, pair after pair), so the
    list is exact there only if ``check_rules(rules, mapping, chained=True)`` is empty.

    Args:
        rules: Rules in order.
        mapping: When given, the list is written only if applying every rule in turn
            reproduces ``mapping`` exactly.

    Raises:
        MappingError: If ``mapping`` is given and the list would rename a key wrongly.

    >>> rules_to_revise_keys([RenameRule(r"^module\.", "")])
    [('^module\\.', '')]
    """
    if mapping is not None:
        _refuse_if_wrong(rules, mapping, chained=True, form="revise_keys")
    return [(rule.pattern, rule.replacement) for rule in rules]


def _refuse_if_wrong(rules: Sequence[RenameRule], mapping: Mapping[str, str], *, chained: bool, form: str) -> None:
    wrong = check_rules(rules, mapping, chained=chained)
    if wrong:
        got = (_apply_chained if chained else apply_rules)(rules, wrong[0])
        raise MappingError(
            f"refusing to write {form}: applied {'every rule in turn' if chained else 'first match wins'}, "
            f"the rules rename {wrong[0]!r} to {got!r}, not {mapping[wrong[0]]!r} ({len(wrong)} of "
            f"{len(mapping)} keys wrong). infer_rules(mapping) makes the rules exact for both readings "
            "whenever the mapping allows it; otherwise use the mapping (or the plan) itself"
        )


def rules_to_torchtune_table(rules: Sequence[RenameRule], mapping: Mapping[str, str]) -> dict[str, str]:
    """The mapping as a torchtune-style table: numeric components replaced by ``{}``.

    ``{"model.layers.{}.self_attn.q_proj.weight": "layers.{}.attn.q_proj.weight", ...}``. A
    key is looked up as ``table[abstract(key)].format(*numbers(key))``, where ``numbers`` are
    the key's all-digit dot components in order and ``abstract`` replaces each of them by
    ``{}``. That only works where every key's numbers reach its target unchanged and in the
    same order. torchtune's ``get_mapped_key`` reads the table the same way for keys with one
    numeric component and no other digits before it (the Llama tables).

    Args:
        rules: Rules for ``mapping``; the table is checked to describe the same renaming.
        mapping: ``{source_key: target_key}``; its keys give the table's entries, in order.

    Returns:
        ``{abstract source key: target format string}``; identity entries included.

    Raises:
        MappingError: If the rules do not reproduce the mapping, if a key's numbers do not
            reach its target unchanged (shifted or regrouped blocks), or if two keys with the
            same abstract form map to different targets. Use the regex rules for those.

    >>> rules_to_torchtune_table([], {"layers.3.w": "layers.3.w"})
    {'layers.{}.w': 'layers.{}.w'}
    """
    wrong = check_rules(rules, mapping)
    if wrong:
        raise MappingError(
            f"the rules do not rename {wrong[0]!r} to {mapping[wrong[0]]!r} ({len(wrong)} keys wrong); "
            "infer them from this mapping with infer_rules(mapping)"
        )
    table: dict[str, str] = {}
    origin: dict[str, str] = {}
    for src, tgt in mapping.items():
        src_abstract, src_numbers = _abstract(src)
        tgt_format, tgt_numbers = _abstract(tgt, escape_braces=True)
        if src_numbers != tgt_numbers:
            raise MappingError(
                f"{src!r} -> {tgt!r} cannot be a torchtune-style table entry: its numeric components "
                f"{list(src_numbers)} do not reach the target unchanged and in order ({list(tgt_numbers)}); "
                "use the regex rules (rules_to_key_mapping) for this mapping"
            )
        previous = table.setdefault(src_abstract, tgt_format)
        if previous != tgt_format:
            raise MappingError(
                f"{origin[src_abstract]!r} and {src!r} share the table key {src_abstract!r} but map to "
                f"{previous!r} and {tgt_format!r}: a table cannot tell them apart by their numbers; "
                "use the regex rules (rules_to_key_mapping) for this mapping"
            )
        origin.setdefault(src_abstract, src)
    return table


def _abstract(name: str, *, escape_braces: bool = False) -> tuple[str, tuple[str, ...]]:
    parts = name.split(".")
    numbers = tuple(p for p in parts if p.isdecimal())
    if escape_braces:
        parts = [p.replace("{", "{{").replace("}", "}}") for p in parts]
    return ".".join("{}" if p.isdecimal() else p for p in parts), numbers


# ---------------------------------------------------------------------------- inferring
def infer_rules(
    mapping: Mapping[str, str], *, max_rules: int | None = None, max_groups: int | None = None
) -> list[RenameRule]:
    r"""Compress a mapping into a short list of regex rename rules that reproduce it exactly.

    Numbers carried over unchanged become ``(\d+)`` groups, so the rules of a 60-layer model
    do not grow with its depth. Numbers that change (``blocks.4`` -> ``stages.1.1``) cannot be
    written with backreferences and get literal rules. Identity entries get no rule unless a
    more general rule would rewrite them. The rules are ordered so that applying all of them
    in turn (mmengine) gives the same result as first-match-wins whenever that is possible.

    Args:
        mapping: ``{source_key: target_key}``, e.g. ``MappingPlan.mapping``.
        max_rules: Raise instead of returning more rules than this.
        max_groups: At most this many ``(\d+)`` groups per rule; numbers beyond the first
            ``max_groups`` of a key stay literal. ``1`` suits transformers 5, which expands
            only ``\1``.

    Returns:
        Rules in priority order (first match wins); ``check_rules(rules, mapping) == []``.

    Raises:
        MappingError: If a key or target is not a string or contains a newline, or if more
            than ``max_rules`` rules are needed.

    >>> mapping = {f"backbone.layer{i}.conv.weight": f"encoder.layer{i}.conv.weight" for i in (1, 2)}
    >>> mapping["head.weight"] = "head.weight"
    >>> print(*infer_rules(mapping), sep="\n")
    ^backbone\. -> encoder.
    >>> print(*infer_rules({f"h.{i}.attn.w": f"layers.{i}.attention.w" for i in range(60)}), sep="\n")
    ^h\.(\d+)\.attn\. -> layers.\1.attention.
    """
    _check_mapping(mapping)
    if max_groups is not None and max_groups < 0:
        raise MappingError(f"max_groups must be >= 0, got {max_groups}")
    if not mapping:
        return []
    rules = _Inference(mapping, max_groups).run()
    if max_rules is not None and len(rules) > max_rules:
        raise MappingError(
            f"reproducing this mapping of {len(mapping)} keys exactly takes {len(rules)} rename rules, "
            f"more than max_rules={max_rules} (e.g. {rules[0]}); its numbering changes between the two "
            "sides or its names follow no common pattern. Raise max_rules, or use the mapping itself"
        )
    return rules


def _check_mapping(mapping: Mapping[str, str]) -> None:
    for src, tgt in mapping.items():
        if not isinstance(src, str) or not isinstance(tgt, str):
            raise MappingError(f"rename rules need string keys and targets, got {src!r} -> {tgt!r}")
        if "\n" in src or "\n" in tgt:
            raise MappingError(
                f"cannot write rename rules for {src!r} -> {tgt!r}: a newline in a key defeats the "
                "'$' anchor; rename that key by hand"
            )


# Templates: a key is a tuple of components, a component a tuple of tokens. In a template a
# carried digit run is the int index of the source number it carries (in both templates).
# In a candidate's pattern a group token is None; in its replacement a group is an int
# (1-based group number) and everything else is literal text.


@functools.lru_cache(maxsize=65536)
def _component_tokens(component: str) -> tuple[str, ...]:
    return tuple(_DIGIT_RUNS.findall(component))


def _split(name: str) -> tuple[tuple[str, ...], ...]:
    return tuple(_component_tokens(part) for part in name.split("."))


@functools.lru_cache(maxsize=65536)
def _skeleton(tokens: tuple) -> tuple:
    # Digit runs (literal or group) generalised away: what an index node is keyed by.
    return tuple(None if t is None or t.isdecimal() else t for t in tokens)


def _digit_positions(comps: tuple[tuple[str, ...], ...]) -> list[tuple[int, int]]:
    return [(ci, ti) for ci, comp in enumerate(comps) for ti, tok in enumerate(comp) if tok.isdecimal()]


def _carry(src_comps, tgt_comps, max_groups: int | None):
    """Source number index carried into each target number (-1: literal), and the values."""
    src_pos, tgt_pos = _digit_positions(src_comps), _digit_positions(tgt_comps)
    src_vals = tuple(src_comps[ci][ti] for ci, ti in src_pos)
    tgt_vals = tuple(tgt_comps[ci][ti] for ci, ti in tgt_pos)
    if src_vals == tgt_vals:
        carry = list(range(len(src_vals)))
    else:
        # Equal values in the same kind of component first (`fc1` with `fc1`, a block index
        # with a block index), then any equal value: an accidental equality elsewhere in the
        # name must not steal a number that is really carried.
        used = [False] * len(src_vals)
        carry = [-1] * len(tgt_vals)
        src_ctx = [(_skeleton(src_comps[ci]), ti) for ci, ti in src_pos]
        tgt_ctx = [(_skeleton(tgt_comps[ci]), ti) for ci, ti in tgt_pos]
        for same_context in (True, False):
            for j, value in enumerate(tgt_vals):
                if carry[j] >= 0:
                    continue
                for k, src_value in enumerate(src_vals):
                    if not used[k] and src_value == value and (not same_context or src_ctx[k] == tgt_ctx[j]):
                        carry[j], used[k] = k, True
                        break
    if max_groups is not None:
        kept = set(sorted(k for k in carry if k >= 0)[:max_groups])
        carry = [k if k in kept else -1 for k in carry]
    return src_pos, tgt_pos, carry, src_vals


def _templates(src_comps, tgt_comps, max_groups):
    src_pos, tgt_pos, carry, src_vals = _carry(src_comps, tgt_comps, max_groups)
    src = [list(comp) for comp in src_comps]
    tgt = [list(comp) for comp in tgt_comps]
    for j, k in enumerate(carry):
        if k >= 0:
            ci, ti = src_pos[k]
            src[ci][ti] = k
            ci, ti = tgt_pos[j]
            tgt[ci][ti] = k
    return tuple(map(tuple, src)), tuple(map(tuple, tgt)), src_vals


def _first_depth(S, T) -> int:
    """Shortest source prefix whose rewrite keeps the rest of the key (len(S): whole key)."""
    n = len(S)
    for d in range(1 if S == T else 0, n):
        m = n - d
        if m <= len(T) and S[d:] == T[len(T) - m :]:
            return d
    return n


def _ref(group: int) -> str:
    return f"\\{group}" if group < 10 else f"\\g<{group}>"


class _Candidate:
    """One possible rule: pattern components, whole-key or prefix, replacement components."""

    __slots__ = ("pcomps", "full", "rcomps", "pid", "n_groups", "_pattern", "_replacement", "_order", "_regex")

    def __init__(self, pcomps, full, rcomps):
        self.pcomps, self.full, self.rcomps = pcomps, full, rcomps
        self.pid = (pcomps, full)
        self.n_groups = sum(t is None for comp in pcomps for t in comp)
        self._pattern = self._replacement = self._order = self._regex = None

    @property
    def pattern(self) -> str:
        if self._pattern is None:
            body = r"\.".join("".join(r"(\d+)" if t is None else re.escape(t) for t in comp) for comp in self.pcomps)
            self._pattern = "^" + body + ("$" if self.full else (r"\." if self.pcomps else ""))
        return self._pattern

    @property
    def replacement(self) -> str:
        if self._replacement is None:
            body = ".".join(
                "".join(_ref(t) if isinstance(t, int) else t.replace("\\", "\\\\") for t in comp)
                for comp in self.rcomps
            )
            self._replacement = body if self.full or not self.rcomps else body + "."
        return self._replacement

    @property
    def order(self) -> tuple:
        # Most specific first: more components, then fewer groups; text (`blocks.3` before
        # `blocks.10`) breaks ties.
        if self._order is None:
            self._order = (
                -len(self.pcomps), self.n_groups, not self.full,
                natural_key(self.pattern), self.pattern, natural_key(self.replacement), self.replacement,
            )
        return self._order

    def apply(self, name: str) -> str:
        if self._regex is None:
            self._regex = _compile(self.pattern)
        return self._regex.sub(self.replacement, name, count=1)

    def rule(self) -> RenameRule:
        return RenameRule(self.pattern, self.replacement)


class _Node:
    __slots__ = ("literal", "grouped", "prefix", "full")

    def __init__(self):
        self.literal: dict[tuple, _Node] = {}  # group-free component -> child
        self.grouped: dict[tuple, list[tuple[tuple, bool, _Node]]] = {}  # skeleton -> (component, wild, child)
        self.prefix: list[int] = []
        self.full: list[int] = []


class _Index:
    """Candidates in a trie of pattern components: which of them match a key, without regexes.

    A pattern component matches a key component with the same skeleton whose digit runs
    equal its literal ones (a group matches any run); this is exactly what its regex does.
    """

    def __init__(self, candidates: Sequence[_Candidate]):
        self.root = _Node()
        for rank, cand in enumerate(candidates):
            node = self.root
            for pcomp in cand.pcomps:
                if None not in pcomp:
                    node = node.literal.setdefault(pcomp, _Node())
                    continue
                skeleton = _skeleton(pcomp)
                siblings = node.grouped.setdefault(skeleton, [])
                child = next((c for p, _, c in siblings if p == pcomp), None)
                if child is None:
                    child = _Node()
                    # Every digit run a group: the skeleton alone decides the match.
                    siblings.append((pcomp, pcomp == skeleton, child))
                node = child
            (node.full if cand.full else node.prefix).append(rank)

    def matches(self, comps: tuple[tuple[str, ...], ...], skeletons: tuple[tuple, ...]) -> list[int]:
        """Ranks of the candidates whose pattern matches the key, in no particular order."""
        out: list[int] = []
        frontier = [self.root]
        for comp, skeleton in zip(comps, skeletons):
            following = []
            for node in frontier:
                out.extend(node.prefix)
                child = node.literal.get(comp)
                if child is not None:
                    following.append(child)
                for pcomp, wild, child in node.grouped.get(skeleton, ()):
                    if wild or all(p is None or p == t for p, t in zip(pcomp, comp)):
                        following.append(child)
            frontier = following
            if not frontier:
                return out
        for node in frontier:
            out.extend(node.full)
        return out


class _Class:
    __slots__ = ("S", "T", "pairs", "identity", "depths", "tchain")

    def __init__(self, S, T):
        self.S, self.T, self.pairs = S, T, []
        self.identity = S == T
        self.depths = range(_first_depth(S, T), len(S) + 1)
        self.tchain: list[_Candidate] | None = None


class _Pair:
    __slots__ = ("src", "tgt", "scomps", "tcomps", "sskel", "tskel", "values", "cls", "chain")

    def __init__(self, src, tgt, scomps, tcomps, values, cls):
        self.src, self.tgt, self.scomps, self.tcomps, self.values, self.cls = src, tgt, scomps, tcomps, values, cls
        self.sskel = tuple(map(_skeleton, scomps))
        self.tskel = tuple(map(_skeleton, tcomps))
        self.chain: list[_Candidate] | None = None

    @property
    def identity(self) -> bool:
        return self.cls.identity


class _Inference:
    """One :func:`infer_rules` call: the parsed mapping, its candidates and their votes."""

    def __init__(self, mapping: Mapping[str, str], max_groups: int | None):
        self._interned: dict[tuple, _Candidate] = {}
        classes: dict[tuple, _Class] = {}
        self.pairs: list[_Pair] = []
        for src, tgt in sorted(mapping.items()):
            scomps, tcomps = _split(src), _split(tgt)
            S, T, values = _templates(scomps, tcomps, max_groups)
            cls = classes.get((S, T))
            if cls is None:
                cls = classes[(S, T)] = _Class(S, T)
            pair = _Pair(src, tgt, scomps, tcomps, values, cls)
            cls.pairs.append(pair)
            self.pairs.append(pair)
        self.classes = list(classes.values())
        self.renamed = [cls for cls in self.classes if not cls.identity]
        self.identities = [p for p in self.pairs if p.identity]
        self.banned: set[tuple] = set()  # patterns not to use (they fire again on renamed keys)

    # ------------------------------------------------------------------ candidates
    def _candidate(self, S, T, d: int, values: tuple[str, ...] | None) -> _Candidate:
        """The rule rewriting S's first d components (d == len(S): all of it) into T's.

        ``values`` given: carried numbers written literally (the key-specific variant).
        """
        n = len(S)
        full = d == n
        P, Q = (S, T) if full else (S[:d], T[: len(T) - (n - d)])
        groups: dict[int, int] = {}
        pcomps = []
        for comp in P:
            if any(type(t) is int for t in comp):
                toks = []
                for t in comp:
                    if type(t) is int:
                        if values is None:
                            groups[t] = len(groups) + 1
                            toks.append(None)
                        else:
                            toks.append(values[t])
                    else:
                        toks.append(t)
                comp = tuple(toks)
            pcomps.append(comp)
        rcomps = tuple(
            tuple((groups[t] if values is None else values[t]) if type(t) is int else t for t in comp) for comp in Q
        )
        key = (tuple(pcomps), full, rcomps)
        cand = self._interned.get(key)
        if cand is None:
            cand = self._interned[key] = _Candidate(*key)
        return cand

    def _tchain(self, cls: _Class) -> list[_Candidate]:
        if cls.tchain is None:
            cls.tchain = [self._candidate(cls.S, cls.T, d, None) for d in cls.depths]
        return cls.tchain

    def _chain(self, pair: _Pair) -> list[_Candidate]:
        """Every candidate valid for the pair, most general first (descending order)."""
        if pair.chain is None:
            cls, out = pair.cls, []
            for d, templated in zip(cls.depths, self._tchain(cls)):
                out.append(templated)
                literal = self._candidate(cls.S, cls.T, d, pair.values)
                if literal is not templated:
                    out.append(literal)
            pair.chain = out
        return pair.chain

    # ------------------------------------------------------------------ votes
    def _winners(self, support: Counter) -> dict[tuple, _Candidate]:
        by_pattern: dict[tuple, list[_Candidate]] = defaultdict(list)
        for cand in support:
            by_pattern[cand.pid].append(cand)
        return {pid: min(cands, key=lambda c: (-support[c], c.order)) for pid, cands in by_pattern.items()}

    def _touching_identities(self, cands: Sequence[_Candidate]) -> set[tuple]:
        """Patterns among ``cands`` that match some identity key."""
        if not self.identities or not cands:
            return set()
        index = _Index(cands)
        return {cands[r].pid for p in self.identities for r in index.matches(p.scomps, p.sskel)}

    def _vote(self) -> None:
        support: Counter = Counter()
        for cls in self.renamed:
            for cand in self._tchain(cls):
                support[cand] += len(cls.pairs)
        winners = self._winners(support)
        dirty = self._touching_identities(list(support))
        # Classes whose most general candidate loses its pattern (or touches an identity key)
        # may do better with key-specific literal candidates: let those vote too.
        self.contested = {
            id(cls)
            for cls in self.renamed
            if winners[cls.tchain[0].pid] is not cls.tchain[0] or cls.tchain[0].pid in dirty
        }
        fresh = []
        for cls in self.renamed:
            if id(cls) in self.contested:
                templated = set(cls.tchain)
                for pair in cls.pairs:
                    for cand in self._chain(pair):
                        if cand not in templated:
                            if cand not in support:
                                fresh.append(cand)
                            support[cand] += 1
        self.winners = self._winners(support)
        self.dirty = dirty | self._touching_identities(fresh)

    # ------------------------------------------------------------------ decision list
    def _initial(self, avoid_identities: bool) -> dict[tuple, _Candidate]:
        """Each renamed key's most general winning candidate (optionally: touching no identity key)."""

        def acceptable(cand: _Candidate, pair: _Pair) -> bool:
            if cand.pid in self.banned and cand is not self._chain(pair)[-1]:
                return False
            return self.winners.get(cand.pid) is cand and not (avoid_identities and cand.pid in self.dirty)

        chosen: dict[tuple, _Candidate] = {}
        for cls in self.renamed:
            if id(cls) not in self.contested and cls.tchain[0].pid not in self.banned:
                chosen[cls.tchain[0].pid] = cls.tchain[0]
                continue
            for pair in cls.pairs:
                # The key's own full literal rule is last in its chain and always acceptable.
                cand = next(c for c in self._chain(pair) if acceptable(c, pair))
                chosen[cand.pid] = cand
        return chosen

    def _claims(self, ranked: Sequence[_Candidate]) -> list[tuple[_Pair, _Candidate | None]]:
        """Keys the first matching rule renames wrongly, with that rule."""
        index = _Index(ranked)
        wrong = []
        for pair in self.pairs:
            ranks = index.matches(pair.scomps, pair.sskel)
            if ranks:
                claimer = ranked[min(ranks)]
                if claimer.apply(pair.src) != pair.tgt:
                    wrong.append((pair, claimer))
            elif not pair.identity:
                wrong.append((pair, None))
        return wrong

    def _repair(self, chosen: dict[tuple, _Candidate]) -> dict[tuple, _Candidate]:
        """Give every wrongly renamed key a more specific candidate that precedes its claimer."""
        for _ in range(_MAX_REPAIR_ROUNDS):
            wrong = self._claims(sorted(chosen.values(), key=lambda c: c.order))
            if not wrong:
                return chosen
            proposals: dict[tuple, Counter] = defaultdict(Counter)
            for pair, claimer in wrong:
                for cand in self._chain(pair):
                    if ((claimer is None or cand.order < claimer.order) and cand.pid not in chosen
                            and cand.pid not in self.banned):
                        proposals[cand.pid][cand] += 1
                        break
            for pid, votes in proposals.items():
                chosen[pid] = min(votes, key=lambda c: (-votes[c], c.order))
        # Still wrong after the rounds: whole-key literal rules, which precede every other
        # rule that matches their key and match nothing else.
        wrong = self._claims(sorted(chosen.values(), key=lambda c: c.order))
        for pair, _claimer in wrong:
            cand = self._chain(pair)[-1]
            chosen[cand.pid] = cand
        return chosen

    def _prune(self, chosen: dict[tuple, _Candidate]) -> list[_Candidate]:
        """Drop rules whose keys the following rules rename correctly anyway."""
        ranked = sorted(chosen.values(), key=lambda c: c.order)
        index = _Index(ranked)
        lists = [sorted(index.matches(p.scomps, p.sskel)) for p in self.pairs]
        position = [0] * len(self.pairs)
        claimed: dict[int, list[int]] = defaultdict(list)
        for i, ranks in enumerate(lists):
            if ranks:
                claimed[ranks[0]].append(i)
        removed: set[int] = set()
        for r in sorted(range(len(ranked)), key=lambda r: (len(claimed[r]), -r)):
            moves = []
            for i in claimed[r]:
                ranks, p = lists[i], position[i] + 1
                while p < len(ranks) and ranks[p] in removed:
                    p += 1
                successor = ranks[p] if p < len(ranks) else None
                pair = self.pairs[i]
                if pair.tgt != (pair.src if successor is None else ranked[successor].apply(pair.src)):
                    break
                moves.append((i, p, successor))
            else:
                removed.add(r)
                for i, p, successor in moves:
                    position[i] = p
                    if successor is not None:
                        claimed[successor].append(i)
                claimed[r] = []
        return [c for r, c in enumerate(ranked) if r not in removed]

    def _order(self, ranked: list[_Candidate]) -> tuple[list[_Candidate], bool, set[tuple]]:
        r"""Reorder so that applying every rule in turn equals first-match-wins, if possible.

        First match needs each key's claimer before the other rules matching the key;
        chained application also needs every rule matching the renamed key before the
        claimer (so that none fires again on the result). Ties keep the specificity order.

        Returns ``(rules, chain_safe, culprits)``: when no order works, ``culprits`` are the
        patterns of the most general rules in the conflict that fire again on keys other
        rules renamed (``^`` -> ``model.`` fires on every key); banning them lets the next
        attempt use more specific rules (``^norm\.`` -> ``model.norm.``).
        """
        index = _Index(ranked)
        first: set[tuple[int, int]] = set()
        chained: set[tuple[int, int]] = set()
        for pair in self.pairs:
            ranks = sorted(index.matches(pair.scomps, pair.sskel))
            if not ranks:
                continue
            claimer = ranks[0]
            first.update((claimer, r) for r in ranks[1:])
            chained.update((r, claimer) for r in index.matches(pair.tcomps, pair.tskel) if r != claimer)
        order = _toposort(len(ranked), first | chained)
        if order is None:
            stuck = _cyclic_nodes(len(ranked), first | chained)
            refiring = {a for a, b in chained if a in stuck and b in stuck}
            if not refiring:
                return ranked, False, set()
            widest = min(len(ranked[r].pcomps) for r in refiring)
            return ranked, False, {ranked[r].pid for r in refiring if len(ranked[r].pcomps) == widest
                                   and not ranked[r].full}
        return [ranked[r] for r in order], True, set()

    def _decision_list(self, avoid_identities: bool) -> tuple[list[_Candidate], bool, set[tuple]]:
        rules = self._prune(self._repair(self._initial(avoid_identities)))
        rules, chain_safe, culprits = self._order(rules)
        wrong = self._claims(rules)
        if wrong:  # cannot happen; never return inexact rules if it does
            literal = {self._chain(p)[-1].pid: self._chain(p)[-1] for p, _ in wrong}
            rules, chain_safe = sorted(literal.values(), key=lambda c: c.order) + rules, False
        return rules, chain_safe, culprits

    def run(self) -> list[RenameRule]:
        self._vote()
        best: tuple | None = None
        # Two strategies when some keys stay unchanged: general rules plus shields for those
        # keys, or only rules that never touch them. A list exact under both first-match and
        # chained application wins (issue 13), then the shorter one. A list that cannot be
        # ordered for chained application is tried again without the general rules that
        # fire again on renamed keys.
        for avoid_identities in (False, True) if self.identities else (False,):
            self.banned = set()
            for _ in range(_MAX_BAN_ROUNDS):
                rules, chain_safe, culprits = self._decision_list(avoid_identities)
                score = (not chain_safe, len(rules))
                if best is None or score < best[0]:
                    best = (score, rules)
                if chain_safe or not culprits or culprits <= self.banned:
                    break
                self.banned |= culprits
        self.banned = set()
        return [c.rule() for c in best[1]]


def _cyclic_nodes(n: int, edges: set[tuple[int, int]]) -> set[int]:
    """Nodes on a cycle: those left after repeatedly removing nodes without predecessors or
    without successors."""
    alive = set(range(n))
    live_edges = set(edges)
    while True:
        has_in = {b for _, b in live_edges}
        has_out = {a for a, _ in live_edges}
        keep = alive & has_in & has_out
        if keep == alive:
            return alive
        alive = keep
        live_edges = {(a, b) for a, b in live_edges if a in alive and b in alive}


def _toposort(n: int, edges: set[tuple[int, int]]) -> list[int] | None:
    """Kahn's algorithm, smallest rank first; None on a cycle."""
    successors: list[list[int]] = [[] for _ in range(n)]
    indegree = [0] * n
    for a, b in edges:
        successors[a].append(b)
        indegree[b] += 1
    heap = [r for r in range(n) if indegree[r] == 0]
    heapq.heapify(heap)
    out = []
    while heap:
        r = heapq.heappop(heap)
        out.append(r)
        for b in successors[r]:
            indegree[b] -= 1
            if indegree[b] == 0:
                heapq.heappush(heap, b)
    return out if len(out) == n else None


@dataclass(frozen=True)
class RuleForms:
    """A plan's renames as regex rules, in the forms transformers, mmengine and torchtune take.

    Each form was checked against the plan's mapping under the way its tool applies it; a form
    that would rename a key wrongly is None, and ``refused`` says why.

    Attributes:
        rules: the rules (first match wins).
        key_mapping: transformers 4.x ``from_pretrained(key_mapping=...)``.
        key_mapping_transformers5: the same for transformers 5 (one ``(\\d+)`` group per rule).
        revise_keys: mmengine's ``load_checkpoint(revise_keys=...)`` pairs.
        not_renames: entries that are not plain renames (several sources, or a transform).
        refused: form -> why it was not written.
    """

    rules: tuple[RenameRule, ...]
    key_mapping: dict[str, str] | None
    key_mapping_transformers5: dict[str, str] | None
    revise_keys: list[list[str]] | None
    not_renames: tuple[dict[str, Any], ...] = ()
    refused: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON ``weight-mapper map --rules`` writes (``refused`` only when a form was)."""
        data: dict[str, Any] = {
            "rules": [{"pattern": r.pattern, "replacement": r.replacement} for r in self.rules],
            "key_mapping": self.key_mapping,
            "key_mapping_transformers5": self.key_mapping_transformers5,
            "revise_keys": self.revise_keys,
            "not_renames": [dict(e) for e in self.not_renames],
        }
        if self.refused:
            data["refused"] = dict(self.refused)
        return data


def rule_forms(plan: MappingPlan) -> RuleForms:
    """The renames of ``plan`` (its 1:1 entries) as :class:`RuleForms`.

    Raises:
        MappingError: the renames cannot be written as rules at all (see :func:`infer_rules`).
    """
    mapping = {e.source[0]: e.target for e in plan.entries if len(e.source) == 1}
    rules = infer_rules(mapping)
    single_group = infer_rules(mapping, max_groups=1)
    refused: dict[str, str] = {}

    def checked(form: str, write: Callable[[], Any]) -> Any:
        try:
            return write()
        except MappingError as exc:
            refused[form] = str(exc)
            return None

    return RuleForms(
        rules=tuple(rules),
        key_mapping=checked("key_mapping", lambda: rules_to_key_mapping(rules, mapping)),
        key_mapping_transformers5=checked(
            "key_mapping_transformers5", lambda: rules_to_key_mapping(single_group, mapping, transformers5=True)),
        revise_keys=checked("revise_keys", lambda: [list(p) for p in rules_to_revise_keys(rules, mapping)]),
        not_renames=tuple({"target": e.target, "source": list(e.source), "transform": e.transform}
                          for e in plan.entries if len(e.source) > 1 or e.transform),
        refused=refused,
    )
