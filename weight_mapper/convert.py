"""Convert a checkpoint with a plan, check it, save it: the library side of ``weight-mapper apply``.

:func:`convert_checkpoint` renames (and transforms) the tensors of a :class:`WeightRenamer`
as a plan says, validates them against the target model, optionally proves the conversion by
running both models (before anything is written), converts the optimizer state of a torch
output, and saves atomically. It returns a :class:`ConversionResult`, whose ``to_dict()`` is
what ``apply --json`` prints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from weight_mapper.apply import ValidationReport
from weight_mapper.checkpoint import output_format
from weight_mapper.errors import ConversionError
from weight_mapper.plan import MappingPlan
from weight_mapper.renamer import WeightRenamer
from weight_mapper.training_state import TrainingStateReport, has_training_state

if TYPE_CHECKING:
    from weight_mapper.verify import VerificationReport

__all__ = ["ConversionResult", "convert_checkpoint", "saved_format"]



def saved_format(path: Path) -> str:
    """What :meth:`WeightRenamer.save` wrote at ``path``: ``"sharded-safetensors"``, ``"safetensors"`` or ``"torch"``."""
    return output_format(path)


@dataclass(frozen=True)
class ConversionResult:
    """What :func:`convert_checkpoint` did.

    Attributes:
        output: the written checkpoint; None when nothing was written (a strict proof failed).
        source, plan_path: what was converted, with which plan (as given).
        n_tensors: tensors written.
        n_unmatched_source, n_unmatched_target: the plan's unmatched tensors on each side.
        validation: the converted keys and shapes against the target model, if one was given.
        training_state: what happened to the optimizer state of a torch output, if it had one.
        verification: the proof of the conversion, if one was asked for.
    """

    output: Path | None
    source: str
    plan_path: str
    n_tensors: int = 0
    n_unmatched_source: int = 0
    n_unmatched_target: int = 0
    validation: ValidationReport | None = None
    training_state: TrainingStateReport | None = None
    verification: VerificationReport | None = None

    @property
    def format(self) -> str | None:
        return None if self.output is None else saved_format(self.output)

    @property
    def verified(self) -> bool:
        """False only when a proof was run and failed."""
        return self.verification is None or self.verification.ok

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``apply --json``): without an output, only what was checked."""
        validation = None if self.validation is None else self.validation.to_dict()
        verification = None if self.verification is None else self.verification.to_dict()
        if self.output is None:
            return {"output": None, "source": self.source, "plan": self.plan_path,
                    "validation": validation, "verification": verification}
        return {
            "output": str(self.output), "format": self.format, "n_tensors": self.n_tensors,
            "source": self.source, "plan": self.plan_path,
            "n_unmatched_source": self.n_unmatched_source, "n_unmatched_target": self.n_unmatched_target,
            "validation": validation,
            "training_state": None if self.training_state is None else self.training_state.to_dict(),
            "verification": verification,
        }


def convert_checkpoint(
    renamer: WeightRenamer,
    plan: MappingPlan,
    output: str | Path,
    *,
    plan_path: str | Path = "",
    target_model: nn.Module | None = None,
    source_model: nn.Module | None = None,
    strict: bool = False,
    weights_only: bool = False,
    verify: Callable[[WeightRenamer, MappingPlan], VerificationReport] | None = None,
    progress: Callable[[int, int], Any] | None = None,
) -> ConversionResult:
    """Apply ``plan`` to ``renamer``'s checkpoint and save the result at ``output``.

    Args:
        renamer: the source checkpoint.
        plan: the plan to apply.
        output: ``*.safetensors``, a torch file, or a new folder for sharded safetensors.
        plan_path: where the plan was read from (reported, never written over).
        target_model: validate the converted keys and shapes against it (meta device is fine);
            a torch output's optimizer state is re-keyed to its parameter order.
        source_model: the model the checkpoint was saved from: its parameter order.
        strict: refuse to write anything unless validation (and the proof) succeed.
        weights_only: leave the training state out of a torch output.
        verify: called with the renamed checkpoint before anything is written, returns the proof
            (see :func:`weight_mapper.verify.verify_checkpoint`).
        progress: ``progress(done, total)`` after each source tensor read while saving.

    Returns:
        A :class:`ConversionResult`; its ``output`` is None when ``strict`` and the proof failed.

    Raises:
        ConversionError: ``strict`` and the converted tensors do not fit ``target_model``.
        CheckpointError: the output cannot be written.
        PlanError: the plan does not fit the checkpoint.
    """
    output = Path(output)
    renamer.rename_keys(plan)
    validation = renamer.validate(target_model) if target_model is not None else None
    if validation is not None and not validation.ok and strict:
        raise ConversionError(f"{validation.message(type(target_model).__name__)}\n"
                              f"Nothing was written to {output}", option="strict")
    # The proof runs before anything is written: a failed strict proof leaves no file behind.
    verification = verify(renamer, plan) if verify is not None else None
    result = ConversionResult(None, renamer.source_name, str(plan_path), validation=validation,
                              verification=verification)
    if verification is not None and not verification.ok and strict:
        return result
    training = None
    if not weights_only and output_format(output) == "torch" and has_training_state(renamer.envelope):
        # A torch file keeps the envelope: its optimizer state follows the plan, or is left out.
        training = renamer.convert_training_state(target_model, source_model=source_model)
    written = renamer.save(output, keep_envelope=True, progress=progress,
                           training_state="drop" if weights_only else "convert")
    return ConversionResult(
        written, renamer.source_name, str(plan_path), n_tensors=len(renamer.renamed or {}),
        n_unmatched_source=len(plan.unmatched_source), n_unmatched_target=len(plan.unmatched_target),
        validation=validation, training_state=training, verification=verification)
