"""Stage 1: a model or state dict as a column table of tensors (names, shapes, kinds, order).

The table never holds tensor *data*: only what matching needs. A meta-device model, a
safetensors header or a ``{name: shape}`` dict give the same table as real weights.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import nn

from weight_mapper.checkpoint import storage_view
from weight_mapper.errors import MappingError
from weight_mapper.validate import Invalid, check_names
from weight_mapper.names import component_indices, component_tokens, natural_key, normalise_leaf, split_name

__all__ = ["TensorTable", "looks_sorted"]

_CANONICAL = -1  # alias_of value of a tensor that owns its storage


@dataclass(frozen=True, eq=False)
class TensorTable:
    """Every tensor of one side, one row each, in definition (state dict) order.

    Attributes:
        names: Full tensor names, as in the state dict.
        shapes: Shapes, as tuples.
        dtypes: dtype names (``"float32"``), ``""`` when only a shape was given.
        is_buffer: True for persistent buffers (BatchNorm running stats), False for parameters.
        module_types: Class name of the owning module, ``""`` when unknown (state dicts).
        exec_pos: Position in the data flow in [0, 1] (:mod:`weight_mapper.flow`): the tensor's
            first use, else its module's or nearest ancestor's; NaN when unknown.
        alias_of: Row of the tensor whose storage this one shares (tied weights), -1 if none.
        label: A short description of where the table came from (model class or file).
        ordered: Whether row order is definition order (False for safetensors files, whose
            header is sorted: order-based scores are then left out).
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    is_buffer: np.ndarray
    module_types: tuple[str, ...]
    exec_pos: np.ndarray
    alias_of: np.ndarray
    label: str = ""
    ordered: bool = True

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_module(
        cls, module: nn.Module, *, exec_order: Mapping[str, float] | None = None, label: str | None = None
    ) -> TensorTable:
        """Build the table of a module's parameters and persistent buffers.

        Tied weights (one Parameter registered under two names) become two rows, the second
        pointing at the first through ``alias_of``. Meta-device modules work: no data is read.

        Args:
            module: The model.
            exec_order: Tensor name or module path -> position in [0, 1], from
                :func:`~weight_mapper.flow.record_execution_order` or
                :func:`~weight_mapper.flow.trace_execution_order`.
            label: Description shown in reports; defaults to the module's class name.

        Raises:
            MappingError: If the module has no parameters or buffers.

        >>> TensorTable.from_module(nn.Linear(2, 3)).names
        ('weight', 'bias')
        """
        entries = module.state_dict(keep_vars=True)
        param_ids = {id(p) for _, p in module.named_parameters(remove_duplicate=False)}
        owner_types = {path: type(m).__name__ for path, m in module.named_modules(remove_duplicate=False)}
        names, shapes, dtypes, is_buffer, types, identities = [], [], [], [], [], []
        for name, value in entries.items():
            if not isinstance(value, torch.Tensor):
                continue
            names.append(name)
            shapes.append(tuple(value.shape))
            dtypes.append(str(value.dtype).removeprefix("torch."))
            is_buffer.append(id(value) not in param_ids)
            types.append(owner_types.get(split_name(name)[0], ""))
            identities.append(id(value))
        if not names:
            raise MappingError(
                f"{type(module).__name__} has no parameters or buffers to map; pass the model "
                "whose weights you want to convert."
            )
        return cls._build(
            names, shapes, dtypes, is_buffer, types, identities, exec_order,
            label if label is not None else type(module).__name__,
        )

    def with_module(self, module: nn.Module, *, exec_order: Mapping[str, float] | None = None) -> TensorTable:
        """This table, described by the model its tensors were saved from.

        A checkpoint holds names and shapes; its model adds what only the model knows: each
        tensor's module type (GPT-2's ``Conv1D`` stores weights transposed), parameter or
        buffer, definition order (a safetensors header is sorted by name), and with
        ``exec_order`` the data-flow positions. Rows are put in the model's order. A wrapper
        prefix on the table's names (``module.``) is allowed, and a tied weight saved under one
        of its names only (``lm_head.weight`` beside ``model.embed_tokens.weight``). Meta-device
        models work.

        Raises:
            MappingError: If the table does not hold exactly the model's tensors and shapes.

        >>> ckpt = TensorTable.from_state_dict({"module.bias": (3,), "module.weight": (3, 2)}, natural_order=True)
        >>> described = ckpt.with_module(nn.Linear(2, 3))
        >>> described.names, described.module_types, described.ordered
        (('module.weight', 'module.bias'), ('Linear', 'Linear'), True)
        """
        from weight_mapper.checkpoint import detect_wrapper_prefix

        model = TensorTable.from_module(module)
        prefix = detect_wrapper_prefix(self.names)
        if set(self.names) <= set(model.names):  # a file of a model whose names all start alike
            prefix = ""
        local = [n[len(prefix):] for n in self.names]
        present = set(local)
        # A tied weight is saved once (safetensors keeps one name of the group): any name of its
        # group in the file stands for all of them.
        group: dict[int, list[str]] = {}
        for r, n in enumerate(model.names):
            group.setdefault(r if model.alias_of[r] == _CANONICAL else int(model.alias_of[r]), []).append(n)
        held = {n for names in group.values() if present.intersection(names) for n in names}
        missing = [n for n in model.names if n not in held]
        unexpected = [self.names[r] for r, n in enumerate(local) if n not in model.name2row]
        conflicts = [f"{self.names[r]} {list(self.shapes[r])} vs {list(model.shapes[model.name2row[n]])}"
                     for r, n in enumerate(local) if n in model.name2row and model.shapes[model.name2row[n]] != self.shapes[r]]
        if missing or unexpected or conflicts:
            details = "; ".join(f"{what}: {', '.join(items[:3])}" + (f" and {len(items) - 3} more" if len(items) > 3 else "")
                                for what, items in (("missing", missing), ("unexpected", unexpected),
                                                    ("shape conflicts", conflicts)) if items)
            raise MappingError(f"{self.label} is not a state dict of {type(module).__name__}: {details}. Pass the "
                               "architecture the checkpoint was saved from, or leave the source model out.")
        rows = sorted(range(len(self)), key=lambda r: model.name2row[local[r]])
        model_rows = [model.name2row[local[r]] for r in rows]
        canonical = {r: (r if self.alias_of[r] == _CANONICAL else int(self.alias_of[r])) for r in rows}
        return TensorTable(
            names=tuple(self.names[r] for r in rows),
            shapes=tuple(self.shapes[r] for r in rows),
            dtypes=tuple(self.dtypes[r] for r in rows),
            is_buffer=model.is_buffer[model_rows],
            module_types=tuple(model.module_types[m] for m in model_rows),
            exec_pos=_exec_positions([local[r] for r in rows], exec_order),
            alias_of=_alias_rows([canonical[r] for r in rows]),
            label=self.label,
            ordered=True,
        )

    @classmethod
    def from_checkpoint(cls, checkpoint: Any, *, label: str | None = None) -> TensorTable:
        """Build the table of a :class:`~weight_mapper.checkpoint.Checkpoint` from shapes alone.

        The source says what its format means: tied names share a row's storage (``alias_of``),
        and a source whose order means nothing (a safetensors header is sorted) has its rows
        put in natural order (``layers.2`` before ``layers.10``), the closest stand-in for
        definition order. No tensor data is read.
        """
        source = checkpoint.tensors
        name = label if label is not None else (checkpoint.path.name if checkpoint.path else "checkpoint")
        return cls.from_state_dict(source.meta(), label=name, natural_order=not source.ordered)

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, Any], *, label: str = "state_dict", natural_order: bool = False
    ) -> TensorTable:
        """Build the table of a flat state dict.

        Values may be tensors (real or meta), or bare shapes (``torch.Size``, tuple or list of
        ints) when only names and shapes are known. Other values are skipped with a warning.
        ``natural_order=True`` is for sources whose order means nothing: rows are sorted by
        :func:`~weight_mapper.names.natural_key` and the table is marked ``ordered=False``.
        A state dict whose keys come sorted by name (as read from a safetensors file, whose
        header is sorted) is detected and treated the same way (:func:`looks_sorted`).

        Raises:
            MappingError: If no entry is a tensor or a shape.

        >>> TensorTable.from_state_dict({"fc.weight": (3, 2)}).shapes
        ((3, 2),)
        """
        names, shapes, dtypes, identities, skipped = [], [], [], [], []
        items: Any = state_dict.items()
        natural_order = natural_order or looks_sorted([str(k) for k in state_dict])
        if natural_order:
            items = sorted(items, key=lambda kv: natural_key(str(kv[0])))
        for name, value in items:
            if isinstance(value, torch.Tensor):
                shapes.append(tuple(value.shape))
                dtypes.append(str(value.dtype).removeprefix("torch."))
                identities.append(_storage_identity(value))
            elif isinstance(value, (tuple, list, torch.Size)) and all(
                isinstance(d, int) and d >= 0 for d in value
            ):
                shapes.append(tuple(int(d) for d in value))
                dtypes.append("")
                identities.append(("shape", name))
            else:
                skipped.append(str(name))
                continue
            names.append(str(name))
        if skipped:
            shown = ", ".join(repr(s) for s in skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
            warnings.warn(f"{label}: skipped {len(skipped)} non-tensor entries: {shown}", stacklevel=2)
        if not names:
            raise MappingError(
                f"{label} contains no tensors; expected a state dict mapping names to tensors "
                "(or to shapes)."
            )
        n = len(names)
        return cls._build(names, shapes, dtypes, [False] * n, [""] * n, identities, None, label, not natural_order)

    @classmethod
    def _build(cls, names, shapes, dtypes, is_buffer, types, identities, exec_order, label, ordered=True) -> TensorTable:
        try:
            check_names(names)
        except Invalid as e:
            raise MappingError(f"{label}: {e}; names beyond these bounds are refused") from None
        alias_of = _alias_rows(identities)
        exec_pos = _exec_positions(names, exec_order)
        return cls(
            names=tuple(names),
            shapes=tuple(shapes),
            dtypes=tuple(dtypes),
            is_buffer=np.asarray(is_buffer, dtype=bool),
            module_types=tuple(types),
            exec_pos=exec_pos,
            alias_of=alias_of,
            label=label,
            ordered=ordered,
        )

    # ------------------------------------------------------------------ derived columns
    def __len__(self) -> int:
        return len(self.names)

    @cached_property
    def name2row(self) -> dict[str, int]:
        return {name: row for row, name in enumerate(self.names)}

    @cached_property
    def modules(self) -> tuple[str, ...]:
        """Module path owning each tensor (``""`` for the root)."""
        return tuple(split_name(n)[0] for n in self.names)

    @cached_property
    def leaves(self) -> tuple[str, ...]:
        """Normalised leaf name of each tensor (``gamma`` -> ``weight``)."""
        return tuple(normalise_leaf(split_name(n)[1]) for n in self.names)

    @cached_property
    def ndim(self) -> np.ndarray:
        return np.fromiter((len(s) for s in self.shapes), dtype=np.int64, count=len(self))

    @cached_property
    def numel(self) -> np.ndarray:
        return np.fromiter((int(np.prod(s, dtype=np.int64)) for s in self.shapes), dtype=np.int64, count=len(self))

    @cached_property
    def shape_matrix(self) -> np.ndarray:
        """Shapes padded with -1 to ``[n, max_ndim]`` for vectorised comparison."""
        width = int(self.ndim.max(initial=0))
        out = np.full((len(self), max(width, 1)), -1, dtype=np.int64)
        for row, shape in enumerate(self.shapes):
            out[row, : len(shape)] = shape
        return out

    @cached_property
    def is_canonical(self) -> np.ndarray:
        return self.alias_of == _CANONICAL

    @cached_property
    def _module_names(self) -> tuple[tuple[tuple[str, ...], ...], tuple[tuple[int, ...], ...]]:
        """:func:`~weight_mapper.names.name_tokens` and :func:`~weight_mapper.names.name_indices`
        of each row's module path. A name's pieces are its components' in turn, so each module
        path is read once, as its parent's pieces and its own last component's (cached per
        component): a big model's names share their prefixes.
        """
        memo: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {"": ((), ())}
        for module in self.modules:
            if module in memo:
                continue
            chain = []
            path = module
            while path not in memo:
                chain.append(path)
                path = path.rpartition(".")[0]
            tokens, indices = memo[path]
            for path in reversed(chain):
                last = path.rpartition(".")[2]
                tokens, indices = tokens + component_tokens(last), indices + component_indices(last)
                memo[path] = (tokens, indices)
        pieces = [memo[m] for m in self.modules]
        return tuple(t for t, _ in pieces), tuple(i for _, i in pieces)

    @cached_property
    def tokens(self) -> tuple[tuple[str, ...], ...]:
        """:func:`~weight_mapper.names.name_tokens` of each name."""
        module_tokens = self._module_names[0]
        return tuple(m + component_tokens(split_name(n)[1]) for m, n in zip(module_tokens, self.names))

    @cached_property
    def skeletons(self) -> tuple[str, ...]:
        """:func:`~weight_mapper.names.name_skeleton` of each name: its :attr:`tokens` joined."""
        return tuple(".".join(t) for t in self.tokens)

    @cached_property
    def module_skeletons(self) -> tuple[str, ...]:
        """:func:`~weight_mapper.names.name_skeleton` of each row's module path."""
        return tuple(".".join(t) for t in self._module_names[0])

    @cached_property
    def signature_keys(self) -> tuple[str, ...]:
        """``leaf:shape`` of each row (``weight:3x2``): a module group's signature lists its members'."""
        return tuple(f"{leaf}:{'x'.join(map(str, shape))}" for leaf, shape in zip(self.leaves, self.shapes))

    @cached_property
    def indices(self) -> tuple[tuple[int, ...], ...]:
        """:func:`~weight_mapper.names.name_indices` of each name."""
        module_indices = self._module_names[1]
        return tuple(m + component_indices(split_name(n)[1]) for m, n in zip(module_indices, self.names))

    @cached_property
    def n_parameters(self) -> int:
        """Number of scalar values over canonical tensors (tied weights counted once)."""
        return int(self.numel[self.is_canonical].sum())


def looks_sorted(names: list[str]) -> bool:
    """Whether keys come sorted by name rather than in definition order.

    Sorted keys are a sign, not a proof: they count as sorted when the lexicographic order
    contradicts the order a model defines them in, i.e. a number after a larger one
    (``layers.10`` before ``layers.2``) or a module's ``bias`` before its ``weight`` (every
    torch layer registers its weight first).

    >>> looks_sorted(["fc.bias", "fc.weight", "head.bias", "head.weight"])
    True
    >>> looks_sorted(["fc.weight", "fc.bias"])
    False
    """
    if len(names) < 3 or any(a > b for a, b in zip(names, names[1:])):
        return False
    if sorted(names, key=natural_key) != names:
        return True
    present = set(names)
    return any(n.endswith(".bias") and n[:-4] + "weight" in present for n in names)


def _storage_identity(t: torch.Tensor) -> Any:
    """A key equal for two tensors that are tied: the checkpoint's rule, else the same object.

    A source's meta tensors (:meth:`~weight_mapper.checkpoint.TensorSource.meta`) share one
    object per tie group, so its ties survive here without any data.
    """
    view = storage_view(t)
    return ("id", id(t)) if view is None else ("storage", *view)


def _alias_rows(identities) -> np.ndarray:
    """Row of the first row with the same identity (tied storage), or -1 for that first row."""
    first_row: dict[Any, int] = {}
    alias_of = np.full(len(identities), _CANONICAL, dtype=np.int64)
    for row, ident in enumerate(identities):
        owner = first_row.setdefault(ident, row)
        if owner != row:
            alias_of[row] = owner
    return alias_of


def _exec_positions(names, exec_order: Mapping[str, float] | None) -> np.ndarray:
    """Each tensor's data-flow position: its own first use, else its module's or an ancestor's."""
    exec_pos = np.full(len(names), np.nan)
    if exec_order:
        for row, name in enumerate(names):
            exec_pos[row] = exec_order[name] if name in exec_order else _lookup_exec(exec_order, split_name(name)[0])
    return exec_pos


def _lookup_exec(exec_order: Mapping[str, float], module_path: str) -> float:
    """Position of the module, or of its nearest executed ancestor."""
    path = module_path
    while True:
        if path in exec_order:
            return float(exec_order[path])
        if not path:
            return float("nan")
        path = path.rpartition(".")[0]
