"""Name normalisation: how a tensor or module name is cut into comparable pieces.

Rules are data (module-level tables); the functions below only apply them. Numeric
components and digit runs are read as *positions* (``layer3.2`` -> indices ``(3, 2)``) and
removed from the text that is compared character by character, so that ``layers.3`` and
``layers.13`` do not look alike merely because they share a digit.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence

__all__ = [
    "LEAF_SYNONYMS",
    "TOKEN_SYNONYMS",
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

# Module-name tokens that are abbreviations of one another. Keys and values are lower case.
TOKEN_SYNONYMS: dict[str, str] = {
    "attention": "attn",
    "feature": "features",
    "feat": "features",
    "feats": "features",
    "extractor": "features",
    "fc": "linear",
    "dense": "linear",
    "lin": "linear",
    "proj": "projection",
    "ln": "norm",
    "layernorm": "norm",
    "layer_norm": "norm",
    "bn": "batchnorm",
    "batch": "batchnorm",
    "conv": "conv",
    "convolution": "conv",
    "emb": "embed",
    "embedding": "embed",
    "embeddings": "embed",
    "tok": "token",
    "tokens": "token",
    "blocks": "block",
    "layers": "layer",
    "heads": "head",
    "classifier": "head",
    "mlp": "mlp",
    "ffn": "mlp",
    "feedforward": "mlp",
    "ff": "mlp",
}

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


def _raw_tokens(name: str) -> list[str]:
    text = _CAMEL.sub("_", name)
    text = _ALPHA_DIGIT.sub("_", text)
    return [t for t in _SPLIT.split(text.lower()) if t]


def name_tokens(name: str) -> tuple[str, ...]:
    """Return the normalised, non-numeric tokens of a name, in order.

    >>> name_tokens("model.layers.3.self_attn.q_proj")
    ('model', 'layer', 'self', 'attn', 'q', 'projection')
    """
    # Names of big models repeat a few components thousands of times: tokenise each once.
    return tuple(t for part in name.split(".") for t in _component_tokens(part))


@functools.lru_cache(maxsize=65536)
def _component_tokens(component: str) -> tuple[str, ...]:
    return tuple(TOKEN_SYNONYMS.get(t, t) for t in _raw_tokens(component) if not t.isdecimal())


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
