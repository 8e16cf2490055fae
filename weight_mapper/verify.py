"""Stage 6b: the proof. Convert, load into the target, run both models, compare outputs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from weight_mapper.apply import apply_plan
from weight_mapper.errors import ConversionError
from weight_mapper.plan import MappingPlan

__all__ = ["VerificationReport", "verify_conversion"]


@dataclass(frozen=True)
class VerificationReport:
    """What running both models after the conversion showed.

    Attributes:
        max_abs_diff: Largest absolute difference over every compared output tensor.
        n_outputs: How many output tensors were compared.
        untouched: Target keys the conversion did not fill (left at their initial values).
        unexpected: Converted keys the target does not have.
        atol: Tolerance ``ok`` was judged with.
    """

    max_abs_diff: float
    n_outputs: int
    untouched: tuple[str, ...]
    unexpected: tuple[str, ...]
    atol: float

    @property
    def ok(self) -> bool:
        """Outputs agree within ``atol`` and every target tensor was filled."""
        return self.max_abs_diff <= self.atol and not self.untouched and not self.unexpected

    def message(self) -> str:
        verdict = "conversion verified" if self.ok else "conversion NOT verified"
        parts = [f"{verdict}: max abs output difference {self.max_abs_diff:.3g} over {self.n_outputs} output tensor(s) "
                 f"(atol {self.atol:g})"]
        if self.untouched:
            parts.append(f"{len(self.untouched)} target tensor(s) left at their initial values: "
                         + ", ".join(self.untouched[:8]) + (" ..." if len(self.untouched) > 8 else ""))
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} converted key(s) the target does not have: "
                         + ", ".join(self.unexpected[:8]))
        return "\n".join(parts)


def _tensors(output: Any) -> list[torch.Tensor]:
    """Every tensor in a model output (tensor, tuple, list, dict or a ModelOutput), in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for v in output.values() for t in _tensors(v)]
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in _tensors(v)]
    return []


def _run(model: nn.Module, dummy_input: Any) -> list[torch.Tensor]:
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            if isinstance(dummy_input, Mapping):
                return _tensors(model(**dummy_input))
            if isinstance(dummy_input, (tuple, list)):
                return _tensors(model(*dummy_input))
            return _tensors(model(dummy_input))
    finally:
        model.train(was_training)


def verify_conversion(
    plan: MappingPlan, source: nn.Module, target: nn.Module, dummy_input: Any, *, atol: float = 1e-5
) -> VerificationReport:
    """Convert ``source``'s weights with ``plan``, load them into ``target``, compare outputs.

    ``target``'s tensors are overwritten by the converted ones (that is the point); both
    models run in eval mode without gradients and their training flags are restored.

    Raises:
        ConversionError: If a model fails on ``dummy_input`` or the outputs cannot be compared.
    """
    state = source.state_dict()
    if plan.source_prefix:  # the plan names the checkpoint's keys, which carry a wrapper prefix
        state = {plan.source_prefix + k: v for k, v in state.items()}
    converted = apply_plan(plan, state, source=type(source).__name__)
    result = target.load_state_dict(converted, strict=False)
    try:
        expected, got = _run(source, dummy_input), _run(target, dummy_input)
    except Exception as exc:  # noqa: BLE001 - user code: report it with context
        raise ConversionError(f"running the models on dummy_input failed: {type(exc).__name__}: {exc}") from exc
    pairs = [(a, b) for a, b in zip(expected, got) if a.shape == b.shape and a.is_floating_point()]
    if not pairs:
        raise ConversionError(
            f"{type(source).__name__} and {type(target).__name__} returned no output tensors of equal shape "
            "to compare; pass a dummy_input both accept and that yields comparable outputs"
        )
    diff = max(float((a.float() - b.float()).abs().max()) if a.numel() else 0.0 for a, b in pairs)
    # Not result.missing_keys: torch quietly fills a missing BatchNorm num_batches_tracked.
    untouched = tuple(k for k in target.state_dict() if k not in converted)
    return VerificationReport(diff, len(pairs), untouched, tuple(result.unexpected_keys), atol)
