"""Stage 2: the module tree of one side, and its tensors grouped by owning module.

A :class:`ModuleTree` holds the module paths (root ``""``) with each one's parent and its
children in definition order (:class:`ModuleGraph`, read as a networkx ``DiGraph``). A :class:`GroupTable` holds one row per module that owns tensors directly
(a ``ParameterGroup``): its member tensor rows and a *signature* (normalised leaf names and
shapes) under which groups are bucketed for matching.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from weight_mapper.errors import MappingError
from weight_mapper.names import (
    ORDINALS,
    POLAR_FAMILIES,
    component_indices,
    component_ordinal,
    component_tokens,
    natural_key,
    repeat_key,
)
from weight_mapper.table import TensorTable

__all__ = ["ModuleTree", "ModuleGraph", "GroupTable", "ROOT"]

ROOT = ""
_TREES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # table -> its ModuleTree, while the table lives
#: Most characters all module paths of one tree may hold (a 1M-tensor model needs < 10M).
MAX_TREE_CHARS = 100_000_000


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _numeric(component: str) -> tuple[int, ...]:
    return (int(component),) if component.isdecimal() else ()


def _series_key(path: str) -> tuple:
    """Sort key of a repeated sibling: its ordinal word's rank (``before`` < ``after``), else
    its digits read as numbers (``layer2`` < ``layer10``)."""
    return _component_series_key(path.rpartition(".")[2])


@functools.lru_cache(maxsize=65536)
def _component_series_key(last: str) -> tuple:
    ordinal = component_ordinal(last)
    if ordinal is not None and ordinal[1] != 0:
        return (0, ordinal[2], ())
    return (1, 0, natural_key(last))


class ModuleGraph:
    """The parent -> child edges of a :class:`ModuleTree`, read as a networkx ``DiGraph`` is.

    Nodes are module paths in definition order; ``successors(path)`` yields a module's children
    in definition order and ``nodes[path]`` its attributes ``{"type", "depth"}``. It keeps one
    list of child ids per module, not networkx's dicts per node and edge: a DeepSeek-V3
    checkpoint has 60,000 modules.
    """

    def __init__(self, paths: tuple[str, ...], path2id: dict[str, int], parent_id: np.ndarray,
                 children: list[list[int]], types: dict[str, str]):
        self._paths = paths
        self._path2id = path2id
        self._parent_id = parent_id
        self._children = children
        self._types = types
        self.nodes = _NodeView(self)

    def __contains__(self, path: object) -> bool:
        return path in self._path2id

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def has_node(self, path: str) -> bool:
        return path in self._path2id

    def number_of_nodes(self) -> int:
        return len(self._paths)

    def _id(self, path: str) -> int:
        try:
            return self._path2id[path]
        except KeyError:
            raise KeyError(f"the module {path!r} is not in the tree") from None

    def successors(self, path: str) -> Iterator[str]:
        """The module's children, in definition order."""
        return (self._paths[c] for c in self._children[self._id(path)])

    def predecessors(self, path: str) -> Iterator[str]:
        """The module's parent (none for the root)."""
        node = self._id(path)
        return iter(() if node == 0 else (self._paths[self._parent_id[node]],))

    def out_degree(self, path: str) -> int:
        """The module's number of children."""
        return len(self._children[self._id(path)])


class _NodeView(Mapping):
    """``graph.nodes``: module path -> ``{"type": class name or "", "depth": number of components}``."""

    def __init__(self, graph: ModuleGraph):
        self._graph = graph

    def __getitem__(self, path: str) -> dict[str, Any]:
        self._graph._id(path)
        return {"type": self._graph._types.get(path, ""), "depth": path.count(".") + 1 if path else 0}

    def __iter__(self) -> Iterator[str]:
        return iter(self._graph)

    def __len__(self) -> int:
        return len(self._graph)

    def __contains__(self, path: object) -> bool:
        return path in self._graph


class ModuleTree:
    """The module hierarchy implied by a table's tensor names.

    Attributes:
        graph: :class:`ModuleGraph`, an edge parent -> child for every module path, read as a
            networkx ``DiGraph`` (``successors``, ``nodes[path]["type"]``, ``nodes[path]["depth"]``).
        paths: Every module path, root first, in definition order.
        path2id: Module path -> integer id (row in :attr:`paths`).
        parent_id: Id of each module's parent; the root is its own parent.
    """

    def __init__(self, table: TensorTable):
        types: dict[str, str] = {}
        for module, mtype in zip(table.modules, table.module_types):
            types.setdefault(module, mtype)
        paths: list[str] = [ROOT]
        path2id: dict[str, int] = {ROOT: 0}
        parents: list[int] = [0]
        children: list[list[int]] = [[]]
        n_chars = 0  # every module path is kept: bound their total size (deep hostile names)
        for module in types:  # each module once, in definition order
            path = module
            chain = []
            while path not in path2id:
                chain.append(path)
                n_chars += len(path)
                path = _parent(path)
            if n_chars > MAX_TREE_CHARS:
                raise MappingError(f"{table.label}: the module paths of its tensor names hold more than "
                                   f"{MAX_TREE_CHARS:,} characters in all (names nested very deep); such "
                                   f"names are refused")
            parent = path2id[path]
            for node in reversed(chain):  # ancestors first: a parent always precedes its children
                node_id = path2id[node] = len(paths)
                paths.append(node)
                parents.append(parent)
                children.append([])
                children[parent].append(node_id)
                parent = node_id
        self.paths: tuple[str, ...] = tuple(paths)
        self.path2id: dict[str, int] = path2id
        self.parent_id: np.ndarray = np.array(parents, dtype=np.int64)
        self._children = children
        self.graph = ModuleGraph(self.paths, path2id, self.parent_id, children, types)

    @classmethod
    def of(cls, table: TensorTable) -> ModuleTree:
        """The tree of ``table``, built once per table (matching asks for it several times).

        A table is immutable, so its tree and the columns the tree caches are too.
        """
        tree = _TREES.get(table)
        if tree is None:
            tree = _TREES[table] = cls(table)
        return tree

    def __len__(self) -> int:
        return len(self.paths)

    # Name columns of every module path, each made of its parent's and its own last component's
    # (those cached per component in weight_mapper.names): a path is read once per tree.
    def _from_parent(self, of_component: Callable[[str], tuple]) -> tuple[tuple, ...]:
        out: list[tuple] = [()]
        parent_id, paths = self.parent_id.tolist(), self.paths
        for node in range(1, len(paths)):
            out.append(out[parent_id[node]] + of_component(paths[node].rpartition(".")[2]))
        return tuple(out)

    @cached_property
    def tokens(self) -> tuple[tuple[str, ...], ...]:
        """:func:`~weight_mapper.names.name_tokens` of each module path."""
        return self._from_parent(component_tokens)

    @cached_property
    def skeletons(self) -> tuple[str, ...]:
        """:func:`~weight_mapper.names.name_skeleton` of each module path."""
        return tuple(".".join(t) for t in self.tokens)

    @cached_property
    def indices(self) -> tuple[tuple[int, ...], ...]:
        """:func:`~weight_mapper.names.name_indices` of each module path."""
        return self._from_parent(component_indices)

    @cached_property
    def path_indices(self) -> tuple[tuple[int, ...], ...]:
        """The purely numeric components of each module path: its ModuleList / Sequential positions."""
        return self._from_parent(_numeric)

    @cached_property
    def sibling_pos(self) -> np.ndarray:
        """Position of each module among its parent's children, scaled to [0, 1]."""
        out = [0.0] * len(self.paths)
        for children in self._children:
            if len(children) > 1:
                last = len(children) - 1
                for i, child in enumerate(children):
                    out[child] = i / last
        return np.array(out, dtype=float)

    @cached_property
    def repeat_ranks(self) -> tuple[tuple[int, ...], ...]:
        """Each module's positions among repeated siblings, from the root down.

        Siblings whose names differ only in their digits (``layer1``..``layer4``, ``0``..``11``,
        ``block3-0``..``block3-5``, ``b1``..``b6``) are repetitions of one block; a module's rank
        among them, in natural order, is one position. Unrepeated modules add none, so two
        implementations that nest the same repetitions under other wrappers agree:
        ``trunk_output.block3.block3-1.f.c`` -> ``(2, 1)`` and ``s3.b2.conv3`` -> ``(2, 1, 2)``
        (``conv1``..``conv3`` repeat too).
        """
        paths = self.paths
        ranks: list[tuple[int, ...]] = [()] * len(paths)
        for node, children in enumerate(self._children):  # parents come before their children
            repeated: dict[str, list[int]] = {}
            for child in children:
                repeated.setdefault(repeat_key(paths[child].rpartition(".")[2]), []).append(child)
            for members in repeated.values():
                if len(members) == 1:
                    ranks[members[0]] = ranks[node]
                    continue
                for rank, child in enumerate(sorted(members, key=lambda c: _series_key(paths[c]))):
                    ranks[child] = (*ranks[node], rank)
        return tuple(ranks)

    @cached_property
    def ordinal_rank(self) -> np.ndarray:
        """Each module's rank among its siblings of one ordinal series, in [0, 1]; NaN if none.

        Siblings whose names share a key and differ in an ordinal (``conv1``..``conv3``,
        ``conv_a``..``conv_c``, ``layernorm_before``/``_after``, see
        :func:`~weight_mapper.names.component_ordinal`) form a series; a module's rank in it
        says "first", "second" whatever the spelling, and needs no definition order (a sorted
        header keeps it).
        """
        own = np.full(len(self.paths), np.nan)
        for children in self._children:
            series: dict[tuple[str, int], list[tuple[int, int]]] = {}
            for child in children:
                last = self.paths[child].rpartition(".")[2]
                found = component_ordinal(last)
                if found is None and last.lower() in ORDINALS:  # a bare ordinal word: pycls' ``f.a``..``f.c``
                    found = ("", *ORDINALS[last.lower()])
                if found is not None:
                    series.setdefault(found[:2], []).append((found[2], child))
            for (_, family), members in series.items():
                values = sorted({v for v, _ in members})
                if len(values) < 2:
                    # A lone word of a two-word family says where it stands by itself: ``norm_pre``
                    # beside a plain ``norm`` is the first (CLIP's ``ln_pre`` / ``ln_post``).
                    if family in POLAR_FAMILIES:
                        for v, child in members:
                            own[child] = float(v)
                    continue
                for v, child in members:
                    own[child] = values.index(v) / (len(values) - 1)
        # A module outside any series takes its parent's rank, one level up: the conv and the
        # norm of ``conv1`` (``conv1.conv``, ``conv1.bn``) or of ``f.a`` (``f.a.0``, ``f.a.1``)
        # are that layer's first, as ``conv1`` / ``bn1`` are where the series holds tensors itself.
        inherited = own[self.parent_id] if len(self.paths) else own
        return np.where(np.isnan(own) & (np.arange(len(self.paths)) > 0), inherited, own)

    def ancestor_ids(self, module_ids: np.ndarray, levels: int) -> np.ndarray:
        """``[n, levels]`` ids of the module itself (level 0) and its ancestors; root repeats."""
        out = np.empty((len(module_ids), levels), dtype=np.int64)
        current = np.asarray(module_ids, dtype=np.int64)
        for level in range(levels):
            out[:, level] = current
            current = self.parent_id[current]
        return out


@dataclass(frozen=True, eq=False)
class GroupTable:
    """Canonical tensors grouped by the module that owns them, one row per module.

    Attributes:
        paths: Module path of each group.
        members: Tensor rows of each group, in definition order.
        signatures: Sorted ``leaf:shape`` list joined by ``|``; equal signatures form a bucket.
        module_ids: Id of each group's module in the tree.
    """

    paths: tuple[str, ...]
    members: tuple[np.ndarray, ...]
    signatures: tuple[str, ...]
    module_ids: np.ndarray

    @classmethod
    def from_table(cls, table: TensorTable, tree: ModuleTree, *, skip: np.ndarray | None = None) -> GroupTable:
        """Group the canonical rows of ``table`` by owning module (aliases are left out).

        Rows in ``skip`` (already spoken for, e.g. by a combined match) are left out too.

        >>> from torch import nn
        >>> t = TensorTable.from_module(nn.Sequential(nn.Linear(2, 3)))
        >>> GroupTable.from_table(t, ModuleTree(t)).signatures
        ('bias:3|weight:3x2',)
        """
        rows_of: dict[str, list[int]] = {}
        rows = np.flatnonzero(table.is_canonical)
        if skip is not None and len(skip):
            rows = np.setdiff1d(rows, skip)
        modules = table.modules
        for row in rows.tolist():
            rows_of.setdefault(modules[row], []).append(row)
        paths = tuple(rows_of)
        members = tuple(np.asarray(rows, dtype=np.int64) for rows in rows_of.values())
        keys = table.signature_keys
        signatures = tuple("|".join(sorted([keys[r] for r in rows])) for rows in rows_of.values())
        module_ids = np.array([tree.path2id[p] for p in paths], dtype=np.int64)
        return cls(paths=paths, members=members, signatures=signatures, module_ids=module_ids)

    def __len__(self) -> int:
        return len(self.paths)
