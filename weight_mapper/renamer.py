"""``WeightRenamer``: the facade that applies a mapping to a checkpoint and saves the result."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weight_mapper.apply import ValidationReport, apply_plan, validate_state_dict
from weight_mapper.checkpoint import load_checkpoint, save_checkpoint, unwrap_state_dict
from weight_mapper.errors import ConversionError, PlanError
from weight_mapper.plan import MappingPlan, PlanEntry

__all__ = ["WeightRenamer"]


class WeightRenamer:
    """Rename (and transform) the tensors of one checkpoint, then save them safely.

    Args:
        checkpoint: A checkpoint path (any format :func:`load_checkpoint` reads) or what
            ``torch.load`` returned (a state dict, or an envelope such as Lightning's).
        key: Envelope key holding the state dict, when there are several candidates.
        trust_pickle: Allow a pickle that needs arbitrary code (only for trusted files).

    Raises:
        CheckpointError: If the checkpoint cannot be read.

    >>> r = WeightRenamer({"old.weight": torch.ones(2)})
    >>> list(r.rename_keys({"old.weight": "new.weight"}))
    ['new.weight']
    """

    def __init__(self, checkpoint: str | Path | Mapping[str, Any], *, key: str | None = None, trust_pickle: bool = False):
        if isinstance(checkpoint, (str, Path)):
            ckpt = load_checkpoint(checkpoint, key=key, trust_pickle=trust_pickle)
            self.source_path: Path | None = ckpt.path
            self.tensors: Mapping[str, torch.Tensor] = ckpt.tensors
            self.state_key, self.envelope, self.metadata = ckpt.state_key, dict(ckpt.envelope), dict(ckpt.metadata)
            self.source_name = str(checkpoint)
        else:
            tensors, state_key, envelope, _ = unwrap_state_dict(checkpoint, key=key)
            self.source_path = None
            self.tensors, self.state_key, self.envelope, self.metadata = tensors, state_key, dict(envelope), {}
            self.source_name = "state_dict"
        self.renamed: dict[str, torch.Tensor] | None = None
        self.plan: MappingPlan | None = None

    def rename_keys(
        self, mapping: Mapping[str, str] | MappingPlan, *, keep_unmapped: bool = False
    ) -> dict[str, torch.Tensor]:
        """Apply ``mapping`` (``{old: new}`` or a :class:`MappingPlan`) to the checkpoint.

        Args:
            mapping: Source key -> target key, or a plan (which may carry transforms).
            keep_unmapped: Keep tensors the mapping does not mention under their old names
                (they would be "unexpected keys" for the target); dropped by default.

        Returns:
            The converted state dict (also kept for :meth:`save` and :meth:`validate`).

        Raises:
            PlanError: If the mapping names a missing key, or two sources land on one target.
        """
        plan = mapping if isinstance(mapping, MappingPlan) else self._plan_from_dict(mapping)
        out = apply_plan(plan, self.tensors, source=self.source_name)
        if keep_unmapped:
            used = {s for e in plan.entries for s in e.source}
            for name in self.tensors:
                if name not in used:
                    if name in out:
                        raise PlanError(f"unmapped source key {name!r} collides with a renamed key; map it explicitly")
                    out[name] = self.tensors[name]
        self.plan, self.renamed = plan, out
        return out

    def _plan_from_dict(self, mapping: Mapping[str, str]) -> MappingPlan:
        seen: dict[str, str] = {}
        entries = []
        for src, tgt in mapping.items():
            if tgt in seen:
                raise PlanError(f"{src!r} and {seen[tgt]!r} are both mapped to {tgt!r}; a target key can be filled once")
            seen[tgt] = src
            if src not in self.tensors:
                raise PlanError(f"{self.source_name} has no tensor {src!r}; check the mapping's source keys")
            shape = tuple(self.tensors[src].shape)
            entries.append(PlanEntry((src,), tgt, None, 1.0, 1.0, "tensor", shape, shape))
        return MappingPlan(tuple(entries), source_label=self.source_name)

    def _require_renamed(self) -> dict[str, torch.Tensor]:
        if self.renamed is None:
            raise ConversionError("nothing to save yet: call rename_keys(mapping) first")
        return self.renamed

    def save(self, path: str | Path) -> Path:
        """Save the converted tensors atomically (safetensors by ``.safetensors``, else torch).

        The envelope (Lightning's epoch, hyper_parameters, ...) is written back around the
        tensors in torch format. The source checkpoint is never overwritten.

        Raises:
            ConversionError: If :meth:`rename_keys` was not called.
            CheckpointError: If ``path`` is the source file or cannot be written.
        """
        tensors = self._require_renamed()
        protected = [self.source_path] if self.source_path is not None else []
        return save_checkpoint(
            tensors, path, envelope=self.envelope, state_key=self.state_key, metadata=self.metadata or None,
            protected=protected,
        )

    def validate(self, target_module: nn.Module, *, strict: bool = False) -> ValidationReport:
        """Compare the converted tensors with ``target_module``'s keys and shapes.

        Raises:
            ConversionError: With ``strict=True``, if keys are missing, unexpected or mis-shaped.
        """
        return validate_state_dict(self._require_renamed(), target_module, strict=strict)
