"""``WeightRenamer``: the facade that applies a mapping to a checkpoint and saves the result."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weight_mapper.apply import ConvertedTensors, ValidationReport, apply_plan, validate_state_dict
from weight_mapper.checkpoint import (clean_stale_temporaries, load_checkpoint, output_format, save_checkpoint,
                                     temporary_path_for, unwrap_state_dict)
from weight_mapper.errors import CheckpointError, ConversionError, PlanError
from weight_mapper.plan import MappingPlan, PlanEntry
from weight_mapper.training_state import (TrainingStateReport, drop_training_state, has_training_state,
                                           refuse_training_state, training_state_for)

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
            self.source_files: tuple[Path, ...] = (Path(checkpoint), *ckpt.files)
            self.tensors: Mapping[str, torch.Tensor] = ckpt.tensors
            self.state_key, self.envelope, self.metadata = ckpt.state_key, dict(ckpt.envelope), dict(ckpt.metadata)
            self.source_name = str(checkpoint)
            self._source_ordered = ckpt.tensors.ordered  # a sorted safetensors header is not
        else:
            tensors, state_key, envelope, _ = unwrap_state_dict(checkpoint, key=key)
            self.source_path = None
            self.source_files = ()
            self.tensors, self.state_key, self.envelope, self.metadata = tensors, state_key, dict(envelope), {}
            self.source_name = "state_dict"
            self._source_ordered = True
        self.renamed: ConvertedTensors | None = None
        self.plan: MappingPlan | None = None
        self.training_report: TrainingStateReport | None = None
        self._training_envelope: dict | None = None

    def rename_keys(
        self, mapping: Mapping[str, str] | MappingPlan, *, keep_unmapped: bool = False,
        target: nn.Module | Mapping[str, Any] | None = None,
    ) -> ConvertedTensors:
        """Apply ``mapping`` (``{old: new}`` or a :class:`MappingPlan`) to the checkpoint.

        The dict ``WeightMapper.suggest_mapping()`` returns carries its plan, so passing it
        converts exactly what passing the plan does (transposes, reshapes, fused q/k/v). Edited
        pairs of that dict are checked against the target's shapes. A plain dict can only
        rename: several sources mapped to one target are refused.

        Args:
            mapping: Source key -> target key, or a plan (which may carry transforms).
            keep_unmapped: Keep tensors the mapping does not mention under their old names
                (they would be "unexpected keys" for the target); dropped by default.
            target: The target model (or its state dict), to check a dict written by hand:
                a pair whose shapes differ gets the transpose or reshape that fixes it, or
                is refused. The dict ``suggest_mapping`` returned knows its target already.

        Returns:
            The converted state dict, a mapping whose tensors are computed when read (also kept
            for :meth:`save` and :meth:`validate`).

        Raises:
            PlanError: If the mapping names a missing key, two sources land on one target
                outside a combined entry of its plan, or an edited pair's shapes need a
                transform no dict can carry.
        """
        plan = mapping if isinstance(mapping, MappingPlan) else self._plan_from_dict(mapping, target)
        missing = [s for e in plan.entries for s in e.source if s not in self.tensors]
        if missing:
            raise PlanError(
                f"{self.source_name} has no tensor(s) {missing[:5]} that the plan needs; the plan was made "
                "for another checkpoint. Run `weight-mapper map` again on this one."
            )
        target2entry: dict[str, PlanEntry] = {}
        for e in plan.entries:
            if e.target in target2entry:
                raise PlanError(f"the plan fills {e.target!r} twice (from {list(target2entry[e.target].source)} and "
                                f"{list(e.source)}); a target key can be filled once: remove one entry")
            target2entry[e.target] = e
        if keep_unmapped:
            used = {s for e in plan.entries for s in e.source}
            targets = {e.target for e in plan.entries}
            extra = []
            for name in self.tensors:
                if name not in used:
                    if name in targets:
                        raise PlanError(f"unmapped source key {name!r} collides with a renamed key; map it explicitly")
                    shape = tuple(self.tensors[name].shape)
                    extra.append(PlanEntry((name,), name, None, 1.0, 1.0, "tensor", shape, shape))
            plan = replace(plan, entries=plan.entries + tuple(extra))
        self.plan = plan
        self.renamed = ConvertedTensors(plan, self.tensors, source=self.source_name)
        self.training_report, self._training_envelope = None, None  # converted with the previous plan
        return self.renamed

    def _plan_from_dict(self, mapping: Mapping[str, str], target: Any = None) -> MappingPlan:
        from weight_mapper.mapping_dict import plan_from_mapping

        plan = getattr(mapping, "plan", None)
        if plan is not None and dict(mapping) == plan.mapping:
            return plan
        shapes = self.tensors.shapes() if hasattr(self.tensors, "shapes") else {
            n: tuple(t.shape) for n, t in self.tensors.items()}  # a safetensors source reads only its header here
        target_shapes = getattr(mapping, "target_shapes", None)
        if target is not None:
            state = target.state_dict(keep_vars=True) if isinstance(target, nn.Module) else target
            target_shapes = {n: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for n, v in state.items()}
        return plan_from_mapping(mapping, plan, shapes, target_shapes, source_label=self.source_name)

    def _require_renamed(self) -> ConvertedTensors:
        if self.renamed is None:
            raise ConversionError("nothing to save yet: call rename_keys(mapping) first")
        return self.renamed

    @property
    def n_shards(self) -> int:
        """How many files the source tensors are read from (1 for a single file or a state dict)."""
        return len(self._shards())

    def _shards(self) -> list[tuple[Path | None, list[str]]]:
        shards = getattr(self.tensors, "shards", None)
        return shards() if shards is not None else [(None, list(self.tensors))]

    def convert_training_state(
        self,
        target_model: nn.Module | None = None,
        *,
        source_model: nn.Module | None = None,
        source_param_order: Any = None,
        target_param_order: Any = None,
    ) -> TrainingStateReport:
        """Convert the checkpoint's optimizer state with the plan of :meth:`rename_keys`.

        Per-parameter state (``exp_avg``, ``momentum_buffer``, ...) is re-keyed to
        ``target_model``'s parameter order and transformed as its weight was; see
        :mod:`weight_mapper.training_state`. :meth:`save` writes the result into a torch file's
        envelope. State that cannot be converted with certainty is left out, and the returned
        report says why.

        Args:
            target_model: The model the converted checkpoint is for (meta device is fine).
            source_model: The model the checkpoint was saved from; else its parameter order is
                read from the checkpoint's own order, without buffers.
            source_param_order, target_param_order: Explicit parameter names in optimizer index
                order (one list, or one per optimizer), for optimizers not built from
                ``model.parameters()``.

        Raises:
            ConversionError: If :meth:`rename_keys` was not called.
        """
        plan = self._require_renamed().plan
        self._training_envelope, self.training_report = training_state_for(
            self.envelope, plan, self.tensors, ordered=self._source_ordered, target_model=target_model,
            source_model=source_model, source_param_order=source_param_order, target_param_order=target_param_order)
        return self.training_report

    def _output_envelope(self, path: Path, training_state: str) -> dict:
        """The envelope written around the tensors: training state converted, dropped or refused."""
        if training_state not in ("convert", "drop"):
            raise ConversionError(f"training_state={training_state!r}; expected 'convert' or 'drop'")
        if training_state == "drop":
            return drop_training_state(self.envelope)
        if output_format(path) != "torch" or not has_training_state(self.envelope):
            return self.envelope
        if self._training_envelope is None and self.renamed is None:  # tensors converted by the caller
            return refuse_training_state(self.envelope, "no plan was applied with rename_keys")[0]
        if self._training_envelope is None:
            self.convert_training_state()
        report = self.training_report
        if report is not None and not report.ok:
            refused = "; ".join(o.message() for o in report.optimizers if not o.converted)
            warnings.warn(f"{path}: the optimizer state was not converted and is left out: {refused}",
                          stacklevel=4)
        return dict(self._training_envelope or {})

    def save(self, path: str | Path, *, keep_envelope: bool = False, progress: Any = None,
             training_state: str = "convert") -> Path:
        """Save the converted tensors atomically.

        - A path ending in ``.safetensors`` writes one safetensors file; any other suffix
          (``.pt``, ``.pth``, ``.bin``, ``.ckpt``) a torch file holding the plain state dict,
          so that ``model.load_state_dict(torch.load(path))`` works. With
          ``keep_envelope=True`` a torch file gets the source's envelope (Lightning's epoch,
          hyper_parameters, ...) written back around the tensors instead (see
          :meth:`save_with_envelope`).
        - A path without a suffix writes a sharded safetensors folder, one output shard per
          source shard plus ``model.safetensors.index.json``, converting shard by shard so
          that memory is bounded by the largest shard, not the model.
        - In a kept envelope, optimizer state follows the mapping (see
          :meth:`convert_training_state`, called without models if it was not called): state
          whose parameter order is not certain is left out with a warning rather than passed on
          unchanged.

        Args:
            path: Output file or folder; never the source.
            keep_envelope: Write a torch file in the source's envelope (a safetensors output
                holds tensors only, and warns that the envelope is dropped).
            progress: Optional callable ``progress(done, total)``, called after each source
                tensor read (``total`` counts the distinct source tensors the plan reads).
            training_state: With ``keep_envelope``: ``"convert"`` (default) or ``"drop"`` (leave
                optimizer, LR scheduler and AMP scaler state out: weights only).

        Raises:
            ConversionError: If :meth:`rename_keys` was not called.
            CheckpointError: If ``path`` is the source or the plan's own file, or cannot be written.
        """
        converted = self._require_renamed()
        path = Path(path)
        # Never the source, nor the plan being applied.
        protected = [*self.source_files, *([converted.plan.path] if converted.plan.path is not None else [])]
        source = self.tensors if progress is None else _CountedReads(self.tensors, converted.plan, progress)
        if output_format(path) == "sharded-safetensors":
            return self._save_sharded(path, converted, source)
        tensors = apply_plan(converted.plan, source, source=self.source_name)
        if keep_envelope:  # a safetensors output warns that it cannot hold the envelope
            out = self.save_with_envelope(tensors, path, protected=protected, training_state=training_state)
        else:
            out = save_checkpoint(tensors, path, metadata=self.metadata or None, protected=protected)
        return out

    def save_with_envelope(self, tensors: Mapping[str, torch.Tensor], path: str | Path, *,
                           protected: Any = (), training_state: str = "convert") -> Path:
        """Write ``tensors`` as a torch file inside the source's envelope, under its state key.

        The envelope is the rest of what the source file held (Lightning's ``epoch``,
        ``hyper_parameters``, ...); a source without one gives the plain state dict. Its
        optimizer state is converted with the plan (``training_state="convert"``, see
        :meth:`convert_training_state`) or left out (``"drop"``).

        Raises:
            CheckpointError: If ``path`` is protected or cannot be written.
            ConversionError: If ``training_state`` is neither.
        """
        envelope = self._output_envelope(Path(path), training_state)
        return save_checkpoint(tensors, path, envelope=envelope, state_key=self.state_key,
                               metadata=self.metadata or None, protected=protected)

    def _save_sharded(self, folder: Path, converted: ConvertedTensors, source: Mapping[str, torch.Tensor]) -> Path:
        source_dirs = {p.resolve() for p in self.source_files} | {p.resolve().parent for p in self.source_files}
        if folder.resolve() in source_dirs:
            raise CheckpointError(f"Refusing to overwrite the source checkpoint {folder}; choose another output path")
        if folder.exists():
            raise CheckpointError(f"{folder} already exists; choose a new folder for the sharded output")
        if not folder.parent.is_dir():
            raise CheckpointError(f"cannot write {folder}: folder {folder.parent} does not exist")
        shards, needs = self._output_shards(converted.plan)
        # The last output shard that reads each source shard: its memory map is let go after it.
        last_use = {k: i for i, used in enumerate(needs) for k in used}
        release, prefetch = getattr(self.tensors, "release", None), getattr(self.tensors, "prefetch", None)
        clean_stale_temporaries(folder.parent)
        tmp = temporary_path_for(folder)
        tmp.mkdir()
        try:
            weight_map, total_size = {}, 0
            for i, targets in enumerate(shards, start=1):
                if prefetch is not None and i < len(shards):
                    for k in sorted(needs[i] - needs[i - 1]):  # the next output shard's sources only
                        prefetch(k)
                shard_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                tensors = apply_plan(converted.plan, source, source=self.source_name, targets=targets)
                save_checkpoint(tensors, tmp / shard_name, metadata=self.metadata or None)
                total_size += sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors.values()}.values())
                weight_map.update({t: shard_name for t in targets})
                del tensors
                if release is not None:
                    for k in sorted(needs[i - 1]):
                        if last_use[k] == i - 1:
                            release(k)
            index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            os.rename(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder

    def _output_shards(self, plan: MappingPlan) -> tuple[list[list[str]], list[set[int]]]:
        """Target keys of each output shard, and the source shards each one reads.

        Output shards follow the source shards: an entry goes with its first source's shard, in
        the source's order, so a conversion reads the source front to back.
        """
        source_shards = self._shards()
        name2shard = {name: k for k, (_, names) in enumerate(source_shards) for name in names}
        source2entries: dict[str, list[PlanEntry]] = {}
        for e in plan.entries:
            source2entries.setdefault(e.source[0], []).append(e)
        shards: list[list[str]] = []
        needs: list[set[int]] = []
        for _, names in source_shards:
            entries = [e for name in names for e in source2entries.get(name, [])]
            if entries:
                shards.append([e.target for e in entries])
                needs.append({name2shard[s] for e in entries for s in e.source if s in name2shard})
        return shards, needs

    def validate(self, target_module: nn.Module, *, strict: bool = False) -> ValidationReport:
        """Compare the converted tensors with ``target_module``'s keys and shapes.

        Raises:
            ConversionError: With ``strict=True``, if keys are missing, unexpected or mis-shaped.
        """
        return validate_state_dict(self._require_renamed(), target_module, strict=strict)


class _CountedReads(Mapping[str, torch.Tensor]):
    """The source tensors, calling ``progress(done, total)`` after every tensor read (for :meth:`WeightRenamer.save`)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], plan: MappingPlan,
                 progress: Callable[[int, int], Any]):
        self._tensors, self._progress = tensors, progress
        self._total = len({name for e in plan.entries for name in e.source})
        self._done = 0

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self._tensors[name]
        self._done += 1
        self._progress(self._done, max(self._total, self._done))
        return tensor

    def __contains__(self, name: object) -> bool:
        return name in self._tensors  # never a read

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)
