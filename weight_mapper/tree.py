"""Stage 2: the module tree of one side, and its tensors grouped by owning module.

A :class:`ModuleTree` is a networkx ``DiGraph`` of module paths (root ``""``), children in
definition order. A :class:`GroupTable` holds one row per module that owns tensors directly
(a ``ParameterGroup``): its member tensor rows and a *signature* (normalised leaf names and
shapes) under which groups are bucketed for matching.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import cached_property

import networkx as nx
import numpy as np

from weight_mapper.errors import MappingError
from weight_mapper.names import ORDINALS, POLAR_FAMILIES, component_ordinal, natural_key, repeat_key
from weight_mapper.table import TensorTable

__all__ = ["ModuleTree", "GroupTable", "ROOT"]

ROOT = ""
_TREES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # table -> its ModuleTree, while the table lives
#: Most characters all module paths of one tree may hold (a 1M-tensor model needs < 10M).
MAX_TREE_CHARS = 100_000_000


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _series_key(path: str) -> tuple:
    """Sort key of a repeated sibling: its ordinal word's rank (``before`` < ``after``), else
    its digits read as numbers (``layer2`` < ``layer10``)."""
    last = path.rpartition(".")[2]
    ordinal = component_ordinal(last)
    if ordinal is not None and ordinal[1] != 0:
        return (0, ordinal[2], ())
    return (1, 0, natural_key(last))


class ModuleTree:
    """The module hierarchy implied by a table's tensor names.

    Attributes:
        graph: ``networkx.DiGraph`` with an edge parent -> child for every module path; node
            attribute ``type`` (class name or ``""``) and ``depth``.
        paths: Every module path, root first, in definition order.
        path2id: Module path -> integer id (row in :attr:`paths`).
    """

    def __init__(self, table: TensorTable):
        graph = nx.DiGraph()
        graph.add_node(ROOT, type="", depth=0)
        types: dict[str, str] = {}
        for module, mtype in zip(table.modules, table.module_types):
            types.setdefault(module, mtype)
        n_chars = 0  # every module path is kept: bound their total size (deep hostile names)
        for module in table.modules:
            path = module
            chain = []
            while path != ROOT and path not in graph:
                chain.append(path)
                n_chars += len(path)
                path = _parent(path)
            if n_chars > MAX_TREE_CHARS:
                raise MappingError(f"{table.label}: the module paths of its tensor names hold more than "
                                   f"{MAX_TREE_CHARS:,} characters in all (names nested very deep); such "
                                   f"names are refused")
            for node in reversed(chain):
                graph.add_node(node, type=types.get(node, ""), depth=node.count(".") + 1)
                graph.add_edge(_parent(node), node)
        self.graph = graph
        self.paths: tuple[str, ...] = tuple(graph.nodes)
        self.path2id: dict[str, int] = {p: i for i, p in enumerate(self.paths)}

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

    @cached_property
    def parent_id(self) -> np.ndarray:
        """Id of each module's parent; the root is its own parent."""
        return np.array([self.path2id[_parent(p)] if p else 0 for p in self.paths], dtype=np.int64)

    @cached_property
    def sibling_pos(self) -> np.ndarray:
        """Position of each module among its parent's children, scaled to [0, 1]."""
        out = np.zeros(len(self.paths))
        for node in self.paths:
            children = list(self.graph.successors(node))
            if len(children) > 1:
                for i, child in enumerate(children):
                    out[self.path2id[child]] = i / (len(children) - 1)
        return out

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
        ranks: dict[str, tuple[int, ...]] = {ROOT: ()}
        for node in self.paths:  # parents come before their children
            repeated: dict[str, list[str]] = {}
            for child in self.graph.successors(node):
                repeated.setdefault(repeat_key(child.rpartition(".")[2]), []).append(child)
            for children in repeated.values():
                if len(children) == 1:
                    ranks[children[0]] = ranks[node]
                    continue
                for rank, child in enumerate(sorted(children, key=_series_key)):
                    ranks[child] = (*ranks[node], rank)
        return tuple(ranks[p] for p in self.paths)

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
        for node in self.paths:
            series: dict[tuple[str, int], list[tuple[int, str]]] = {}
            for child in self.graph.successors(node):
                last = child.rpartition(".")[2]
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
                            own[self.path2id[child]] = float(v)
                    continue
                for v, child in members:
                    own[self.path2id[child]] = values.index(v) / (len(values) - 1)
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
        for row in rows:
            rows_of.setdefault(table.modules[row], []).append(int(row))
        paths = tuple(rows_of)
        members = tuple(np.asarray(rows, dtype=np.int64) for rows in rows_of.values())
        signatures = tuple(
            "|".join(sorted(f"{table.leaves[r]}:{'x'.join(map(str, table.shapes[r]))}" for r in rows))
            for rows in rows_of.values()
        )
        module_ids = np.array([tree.path2id[p] for p in paths], dtype=np.int64)
        return cls(paths=paths, members=members, signatures=signatures, module_ids=module_ids)

    def __len__(self) -> int:
        return len(self.paths)
