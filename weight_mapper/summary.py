"""What a checkpoint holds, at a glance: the data behind ``weight-mapper inspect``.

:func:`summarize_checkpoint` reads names, shapes and dtypes only (never tensor data of a
safetensors file) and returns a :class:`CheckpointSummary`; ``to_dict()`` is what
``inspect --json`` prints. Rendering it is the CLI's business.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weight_mapper.checkpoint import Checkpoint, detect_wrapper_prefix
from weight_mapper.table import TensorTable
from weight_mapper.training_state import describe_training_state
from weight_mapper.tree import ROOT, ModuleTree

__all__ = ["CheckpointSummary", "ModuleRow", "summarize_checkpoint"]


@dataclass(frozen=True)
class ModuleRow:
    """One module of the tree: its path, depth, and the tensors and parameters under it."""

    path: str
    depth: int
    n_tensors: int
    n_parameters: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "depth": self.depth, "n_tensors": self.n_tensors,
                "n_parameters": self.n_parameters}


@dataclass(frozen=True)
class CheckpointSummary:
    """Format, counts, dtypes, envelope and module tree of one checkpoint.

    Tied names count as tensors but their parameters and bytes count once, at the first name.
    ``modules`` are in definition order (natural order for a sorted safetensors header), down
    to the depth asked for, counted below the wrapper prefix.
    """

    path: str
    format: str
    n_tensors: int
    n_tied: int
    n_parameters: int
    n_bytes: int
    dtypes: dict[str, int]
    state_key: str | None
    envelope_keys: list[str]
    wrapper_prefix: str
    n_shards: int
    skipped: list[str]
    metadata: dict[str, str]
    training_state: dict[str, Any]
    modules: tuple[ModuleRow, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``inspect --json``); keys in the order they are listed here."""
        return {
            "path": self.path, "format": self.format, "n_tensors": self.n_tensors, "n_tied": self.n_tied,
            "n_parameters": self.n_parameters, "n_bytes": self.n_bytes, "dtypes": dict(self.dtypes),
            "state_key": self.state_key, "envelope_keys": list(self.envelope_keys),
            "wrapper_prefix": self.wrapper_prefix, "n_shards": self.n_shards, "skipped": list(self.skipped),
            "metadata": dict(self.metadata), "training_state": self.training_state,
            "modules": [row.to_dict() for row in self.modules],
        }


def summarize_checkpoint(ckpt: Checkpoint, *, path: str | Path | None = None, depth: int = 2) -> CheckpointSummary:
    """Summarise ``ckpt`` without reading tensor data.

    Args:
        ckpt: what :func:`~weight_mapper.checkpoint.load_checkpoint` returned.
        path: how to name it (default: the path it was read from).
        depth: levels of the module tree to list, below the wrapper prefix.

    Example:
        >>> import torch
        >>> w = torch.ones(4, 2)
        >>> s = summarize_checkpoint(Checkpoint.from_state_dict({"a.weight": w, "b.weight": w}))
        >>> s.n_tensors, s.n_tied, s.n_parameters, [row.path for row in s.modules]
        (2, 1, 8, ['a', 'b'])
    """
    path = Path(path) if path is not None else ckpt.path
    table = TensorTable.from_checkpoint(ckpt, label=path.name if path is not None else None)
    name2dtype = ckpt.tensors.dtypes()
    n_bytes = sum(int(table.numel[row]) * name2dtype[name].itemsize
                  for row, name in enumerate(table.names) if table.is_canonical[row])
    dtype2count = Counter(str(name2dtype[name]).removeprefix("torch.") for name in table.names)
    prefix = detect_wrapper_prefix(table.names)
    return CheckpointSummary(
        path=str(path) if path is not None else "<state dict>",
        format=ckpt.format,
        n_tensors=len(table),
        n_tied=int((~table.is_canonical).sum()),
        n_parameters=table.n_parameters,
        n_bytes=n_bytes,
        dtypes=dict(dtype2count.most_common()),
        state_key=ckpt.state_key,
        envelope_keys=[str(k) for k in ckpt.envelope],
        wrapper_prefix=prefix,
        n_shards=len(ckpt.tensors.shards()),
        skipped=list(ckpt.skipped),
        metadata=dict(ckpt.metadata),
        training_state=describe_training_state(ckpt.envelope),
        # The depth counts below the wrapper prefix: "model." alone would fill a level.
        modules=module_rows(table, depth=depth + prefix.count(".")),
    )


def module_rows(table: TensorTable, *, depth: int) -> tuple[ModuleRow, ...]:
    """Modules down to ``depth``, in definition order, with the tensors and parameters under each.

    Parameters are counted over canonical tensors, so a tied weight counts once, at its first name.
    """
    tree = ModuleTree(table)
    path2n_tensors: Counter[str] = Counter()
    path2n_parameters: Counter[str] = Counter()
    for row, module in enumerate(table.modules):
        numel = int(table.numel[row]) if table.is_canonical[row] else 0
        path = module
        while True:
            path2n_tensors[path] += 1
            path2n_parameters[path] += numel
            if path == ROOT:
                break
            path = path.rpartition(".")[0]
    rows = []
    stack = [(child, 1) for child in reversed(list(tree.graph.successors(ROOT)))]
    while stack:  # depth-first preorder: children in definition order, down to ``depth``
        path, level = stack.pop()
        rows.append(ModuleRow(path, tree.graph.nodes[path]["depth"], path2n_tensors[path], path2n_parameters[path]))
        if level < depth:
            stack.extend((child, level + 1) for child in reversed(list(tree.graph.successors(path))))
    return tuple(rows)
