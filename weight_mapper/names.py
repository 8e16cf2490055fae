"""Name normalisation: how a tensor or module name is cut into comparable pieces.

Rules are data (module-level tables); the functions below only apply them. Numeric
components and digit runs are read as *positions* (``layer3.2`` -> indices ``(3, 2)``) and
removed from the text that is compared character by character, so that ``layers.3`` and
``layers.13`` do not look alike merely because they share a digit.
"""

from __future__ import annotations

import functools
import json
import re
from importlib import resources
from collections.abc import Iterable, Sequence

__all__ = [
    "LEAF_SYNONYMS",
    "TOKEN_SYNONYMS",
    "COMPONENT_SYNONYMS",
    "ORDINALS",
    "VOCABULARY",
    "CONTESTED",
    "POLAR_FAMILIES",
    "contested_rows",
    "component_ordinal",
    "repeat_key",
    "split_name",
    "name_tokens",
    "name_indices",
    "name_skeleton",
    "normalise_leaf",
    "semantic_chunks",
    "natural_key",
]

# Parameter / buffer leaf names that mean the same thing across frameworks and eras.
LEAF_SYNONYMS: dict[str, str] = {
    "gamma": "weight",
    "beta": "bias",
    "kernel": "weight",
    "scale": "weight",
    "g": "weight",
    "b": "bias",
    "w": "weight",
    "moving_mean": "running_mean",
    "moving_var": "running_var",
    "moving_variance": "running_var",
}

_VOCABULARY_FILE = "data/vocabulary.json"


def _load_vocabulary() -> dict:
    """The field's vocabulary (``weight_mapper/data/vocabulary.json``, see ``tools/mine_vocabulary.py``)."""
    return json.loads(resources.files("weight_mapper").joinpath(_VOCABULARY_FILE).read_text(encoding="utf-8"))


VOCABULARY: dict = _load_vocabulary()

# Word tokens that are spellings of one another (``q`` ~ ``query``), member -> canonical spelling.
TOKEN_SYNONYMS: dict[str, str] = {
    member: entry["group"][0] for entry in VOCABULARY["token_synonyms"] for member in entry["group"][1:]
}

# Ordinal words: token -> (family, rank). ``conv_a`` / ``conv_b`` count like ``conv1`` / ``conv2``,
# ``layernorm_before`` / ``_after`` like ``norm1`` / ``norm2``. Digit runs are family 0.
ORDINALS: dict[str, tuple[int, int]] = {
    word: (family, rank)
    for family, entry in enumerate(VOCABULARY["ordinals"], start=1)
    for rank, word in enumerate(entry["family"])
}

#: Ordinal families of exactly two words (``before``/``after``, ``pre``/``post``, ``in``/``out``):
#: one of them says "first" or "last" without a sibling to compare with.
POLAR_FAMILIES: frozenset[int] = frozenset(
    family for family, entry in enumerate(VOCABULARY["ordinals"], start=1) if len(entry["family"]) == 2
)

_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_SPLIT = re.compile(r"[._\-/:\s]+")
_DIGITS = re.compile(r"\d+")
_ALPHA_DIGIT = re.compile(r"(?<=[A-Za-z])(?=\d)|(?<=\d)(?=[A-Za-z])")


def split_name(name: str) -> tuple[str, str]:
    """Split a dotted tensor name into its module path and leaf name.

    >>> split_name("encoder.layer.0.weight")
    ('encoder.layer.0', 'weight')
    """
    module, _, leaf = name.rpartition(".")
    return module, leaf


def normalise_leaf(leaf: str) -> str:
    """Map a parameter or buffer leaf name to its canonical spelling.

    >>> normalise_leaf("gamma")
    'weight'
    """
    lowered = leaf.lower()
    return LEAF_SYNONYMS.get(lowered, lowered)


# Names of big models repeat a few components thousands of times: each helper below that reads
# one component is cached (a 100,000-tensor model has a few hundred distinct components).
@functools.lru_cache(maxsize=65536)
def _raw_tokens(name: str) -> tuple[str, ...]:
    text = _CAMEL.sub("_", name)
    text = _ALPHA_DIGIT.sub("_", text)
    return tuple(t for t in _SPLIT.split(text.lower()) if t)


@functools.lru_cache(maxsize=65536)
def component_ordinal(component: str) -> tuple[str, int, int] | None:
    """``(key, family, rank)`` of a module-name component that names an ordinal, else None.

    The last digit run or ordinal word (:data:`ORDINALS`) is the ordinal; the other tokens,
    normalised, are the key. A bare position (``3``, ``a``) has no key and gives None.

    >>> component_ordinal("conv_b"), component_ordinal("norm2"), component_ordinal("layernorm_after")
    (('conv', 1, 1), ('norm', 0, 2), ('norm', 3, 1))
    """
    raw = _raw_tokens(component)
    marks = [i for i, t in enumerate(raw) if t.isdecimal() or t in ORDINALS]
    if not marks:
        return None
    i = marks[-1]
    rest = [TOKEN_SYNONYMS.get(t, t) for j, t in enumerate(raw) if j != i and not t.isdecimal()]
    if not rest:
        return None
    family, rank = (0, int(raw[i])) if raw[i].isdecimal() else ORDINALS[raw[i]]
    return "_".join(rest), family, rank


_MAX_CLASS = 10  # a mined synonym class never grows past this: long chains drift in meaning


def _component_classes(vocabulary: dict) -> dict[str, str]:
    """Module-name components that name one thing: lookup key (:func:`_component_key`) ->
    the class's canonical spelling.

    The hand-written groups are taken as they are. Mined pairs (first those more packages
    agree on, then those more converters state) join two classes unless that would make
    synonyms of two components one table lists side by side (``distinct``: ``q_proj`` and
    ``k_proj``), of two different ordinals of one key (``norm1`` and ``norm2``), or of a key
    with and without an ordinal (``norm`` and ``norm1``), or grow a class past
    :data:`_MAX_CLASS`. The canonical spelling is the hand-written group's first, else the
    spelling converters name most often.
    """
    parent: dict[str, str] = {}
    members: dict[str, set[str]] = {}
    spelling: dict[str, str] = {}  # key -> its most-named spelling
    named: dict[str, int] = {}
    for entry in vocabulary.get("mined_components", ()):
        for c in entry["pair"]:
            named[c] = named.get(c, 0) + len(entry["sources"])
    apart: dict[str, set[int]] = {}
    for k, group in enumerate(vocabulary.get("distinct", ())):
        for c in group:
            apart.setdefault(_component_key(c), set()).add(k)

    def find(c: str) -> str:
        key = _component_key(c)
        if key not in parent or named.get(c, 0) > named.get(spelling[key], 0):
            spelling[key] = c
        parent.setdefault(key, key)
        members.setdefault(key, {key})
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    def clash(a: str, b: str) -> bool:
        if apart.get(a, set()) & apart.get(b, set()):
            return True
        oa, ob = component_ordinal(spelling[a]), component_ordinal(spelling[b])
        key_a = oa[0] if oa else "_".join(TOKEN_SYNONYMS.get(t, t) for t in _raw_tokens(spelling[a]))
        key_b = ob[0] if ob else "_".join(TOKEN_SYNONYMS.get(t, t) for t in _raw_tokens(spelling[b]))
        if key_a != key_b:
            return False
        if (oa is None) != (ob is None):
            return True
        return oa is not None and ob is not None and oa[1] == ob[1] and oa[2] != ob[2]

    def union(a: str, b: str, *, checked: bool) -> None:
        ra, rb = find(a), find(b)
        if ra == rb:
            return
        if checked and (len(members[ra]) + len(members[rb]) > _MAX_CLASS
                        or any(clash(x, y) for x in members[ra] for y in members[rb])):
            return
        parent[rb] = ra
        members[ra] |= members.pop(rb)

    curated: dict[str, str] = {}
    for entry in vocabulary.get("component_synonyms", ()):
        group = [c.lower() for c in entry["group"]]
        for c in group[1:]:
            union(group[0], c, checked=False)
        curated[_component_key(group[0])] = group[0]
    mined = sorted(vocabulary.get("mined_components", ()),
                   key=lambda e: (-len({s.split()[0] for s in e["sources"]}), -len(e["sources"]), e["pair"]))
    for entry in mined:
        a, b = entry["pair"]
        if _well_formed(a) and _well_formed(b):
            union(a, b, checked=True)
    out = {}
    curated_root = {find(k): first for k, first in curated.items()}
    for root, group in list(members.items()):
        canonical = curated_root.get(root) or min(
            (spelling[k] for k in group), key=lambda c: (-named.get(c, 0), len(c), c))
        out.update({k: canonical for k in group})
    return out


def _component_key(component: str) -> str:
    """How a component is looked up among the synonyms: ``ln_1``, ``LN1`` and ``ln1`` alike."""
    return component.lower().replace("_", "")


def _well_formed(component: str) -> bool:
    """A component worth a mined synonym: a compound (``q_proj``) or an abbreviation (``wq``).

    A single word (``conv``, ``dense``, ``output``, ``encoder``) is renamed by converters in
    one context only; made a synonym everywhere, it would equate ``conv`` with ``proj``.
    """
    if not re.fullmatch(r"[a-z][a-z0-9_]*[a-z0-9]", component):
        return False
    raw = _raw_tokens(component)
    return not (len(raw) == 1 and len(raw[0]) >= 4)


#: Module-name components whose meaning depends on a sibling: component -> the siblings beside
#: which it means something else (``post_attention_layernorm`` beside ``pre_feedforward_layernorm``
#: is Gemma's attention-output norm, not Llama's MLP norm). Entries naming one are flagged.
CONTESTED: dict[str, frozenset[str]] = {
    entry["name"]: frozenset(entry["beside"]) for entry in VOCABULARY.get("contested", ())
}


def contested_rows(modules: Sequence[str]) -> set[int]:
    """Rows whose module is a :data:`CONTESTED` component with one of its siblings beside it.

    >>> sorted(contested_rows(["l.0.post_attention_layernorm", "l.0.pre_feedforward_layernorm",
    ...                        "l.1.post_attention_layernorm"]))
    [0]
    """
    out: set[int] = set()
    ends = tuple(CONTESTED)
    if not ends:
        return out
    present: set[str] | None = None
    for row, module in enumerate(modules):
        if not module.endswith(ends):  # the common case, decided in C
            continue
        parent, _, component = module.rpartition(".")
        beside = CONTESTED.get(component)
        if not beside:
            continue
        present = set(modules) if present is None else present
        if any((f"{parent}.{b}" if parent else b) in present for b in beside):
            out.add(row)
    return out


# Module-name components that name one thing (``attention_norm`` ~ ``input_layernorm`` ~
# ``sa_norm``; ``wq`` ~ ``q_proj``), member -> canonical spelling: hand-written groups plus the
# renamings mined from the field's converters (see :data:`VOCABULARY`).
COMPONENT_SYNONYMS: dict[str, str] = _component_classes(VOCABULARY)


def name_tokens(name: str) -> tuple[str, ...]:
    """Return the normalised, non-numeric tokens of a name, in order.

    >>> name_tokens("model.layers.3.self_attn.q_proj")
    ('model', 'layer', 'attn', 'query', 'projection', '~qproj')
    """
    # Names of big models repeat a few components thousands of times: tokenise each once.
    return tuple(t for part in name.split(".") for t in _component_tokens(part))


@functools.lru_cache(maxsize=65536)
def _component_tokens(component: str) -> tuple[str, ...]:
    # A component of a synonym class reads as its class's canonical spelling plus a class token
    # (``~ln1``), so ``attention_norm`` and ``input_layernorm`` agree and ``ffn_norm`` does not.
    canonical = COMPONENT_SYNONYMS.get(_component_key(component))
    raw = _raw_tokens(canonical or component)
    if component_ordinal(canonical or component) is not None:  # ``conv_a`` reads ``conv``, like ``conv1``
        last = max(i for i, t in enumerate(raw) if t.isdecimal() or t in ORDINALS)
        raw = raw[:last] + raw[last + 1:]
    words = tuple(TOKEN_SYNONYMS.get(t, t) for t in raw if not t.isdecimal())
    # A one-word class (``attention`` -> ``attn``) needs no class token; nor does an ordinal one
    # (``cv1`` -> ``conv1``), whose members the ordinal score compares with ``conv_a``.
    if not canonical or (len(words) == 1 and canonical.isalpha()) or component_ordinal(canonical):
        return words
    return (*words, "~" + _component_key(canonical))


@functools.lru_cache(maxsize=65536)
def repeat_key(component: str) -> str:
    """A component without its digits, word tokens normalised: siblings that repeat one block
    share it (``layer1`` .. ``layer4``, ``conv1`` .. ``conv3``).

    >>> repeat_key("conv2"), repeat_key("bn_1"), repeat_key("conv_b")
    ('conv', 'norm', 'conv')
    """
    ordinal = component_ordinal(component)
    if ordinal is not None and ordinal[1] != 0:  # an ordinal word: ``conv_a`` .. ``conv_c`` repeat too
        return ordinal[0]
    return "_".join(TOKEN_SYNONYMS.get(t, t) for t in _raw_tokens(component) if not t.isdecimal())


def name_indices(name: str) -> tuple[int, ...]:
    """Return every digit run of a name as an integer position, in order.

    >>> name_indices("layer3.2.conv1")
    (3, 2, 1)
    """
    return tuple(int(d) for d in _DIGITS.findall(name))


def name_skeleton(name: str) -> str:
    """Return the name as compared character by character: normalised tokens, no digits.

    >>> name_skeleton("backbone.layer3.2.conv1")
    'backbone.layer.conv'
    """
    return ".".join(name_tokens(name))


def semantic_chunks(name: str) -> frozenset[str]:
    """Return the set of raw word chunks of a name (used by ``incompatible_pairs``).

    >>> sorted(semantic_chunks("yolo_backbone"))
    ['backbone', 'yolo']
    """
    return frozenset(t for t in _raw_tokens(name) if not t.isdecimal())


def natural_key(name: str) -> tuple:
    """Sort key reading digit runs as numbers, so that ``layers.2`` sorts before ``layers.10``.

    >>> sorted(["layers.10.w", "layers.2.w"], key=natural_key)
    ['layers.2.w', 'layers.10.w']
    """
    return tuple((0, int(p), "") if p.isdecimal() else (1, 0, p) for p in _DIGIT_SPLIT.split(name) if p)


_DIGIT_SPLIT = re.compile(r"(\d+)")


def pad_indices(all_indices: Sequence[Iterable[int]], width: int | None = None) -> list[list[int]]:
    """Pad index tuples with -1 to a common width (for vectorised comparison)."""
    rows = [list(ix) for ix in all_indices]
    width = max((len(r) for r in rows), default=0) if width is None else width
    return [(r + [-1] * width)[:width] for r in rows]
