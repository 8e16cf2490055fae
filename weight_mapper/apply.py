"""Stage 6: apply a plan to a checkpoint's tensors, and check the result against a model.

Nothing here scores or guesses: :func:`apply_plan` executes a :class:`MappingPlan` entry by
entry, and :func:`validate_state_dict` compares the result with a target module in the words
``torch.nn.Module.load_state_dict`` uses.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from weight_mapper.errors import ConversionError, PlanError
from weight_mapper.plan import MappingPlan, PlanEntry
from weight_mapper.transforms import get_transform

__all__ = ["apply_plan", "ConvertedTensors", "validate_state_dict", "ValidationReport"]


def apply_plan(
    plan: MappingPlan,
    tensors: Mapping[str, torch.Tensor],
    *,
    source: str = "checkpoint",
    targets: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Build the target state dict from ``tensors`` as ``plan`` says.

    Entries that copy the same source unchanged share one tensor, so tied weights stay tied; a
    source several entries read (the pieces of a split) is looked up once.

    Args:
        plan: The mapping plan.
        tensors: Source name -> tensor (a state dict or a lazily loading mapping).
        source: Name of the checkpoint, for error messages.
        targets: Only build these target keys (one shard's worth when streaming).

    Raises:
        PlanError: If a source key is missing or a transform yields the wrong shape.

    >>> from weight_mapper.plan import PlanEntry
    >>> p = MappingPlan((PlanEntry(("a",), "b", None, 1.0, 1.0, "tensor", (1,), (1,)),))
    >>> list(apply_plan(p, {"a": torch.zeros(1)}))
    ['b']
    """
    out: dict[str, torch.Tensor] = {}
    produced: dict[tuple, torch.Tensor] = {}
    wanted = None if targets is None else set(targets)
    entries = [e for e in plan.entries if wanted is None or e.target in wanted]
    # A fused source split over several targets is read once, not once per piece.
    uses = Counter(name for e in entries for name in set(e.source))
    loaded: dict[str, torch.Tensor] = {}

    def read(name: str) -> torch.Tensor:
        if uses[name] < 2:
            return _lookup(tensors, name, source)
        if name not in loaded:
            loaded[name] = _lookup(tensors, name, source)
        return loaded[name]

    for entry in entries:
        key = (entry.source, entry.transform, repr(sorted(entry.args.items())))
        if key not in produced:
            produced[key] = _build(entry, [read(name) for name in entry.source], source)
        out[entry.target] = produced[key]
    return out


def _build(entry: PlanEntry, values: list[torch.Tensor], source: str) -> torch.Tensor:
    """One entry's target tensor from its source tensors (read in ``entry.source`` order)."""
    transform = get_transform(entry.transform)
    if len(entry.source) != 1 and not transform.many_sources:
        raise PlanError(f"entry for {entry.target!r} combines {list(entry.source)} with {entry.transform or 'copy'}")
    try:
        result = transform.apply(values, entry.args)
    except (RuntimeError, IndexError, KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError,
            PlanError) as exc:
        raise PlanError(
            f"{source}: cannot {entry.transform} {list(entry.source)} "
            f"(shapes {[list(v.shape) for v in values]}) into {entry.target!r}: {exc}"
        ) from None
    if entry.target_shape and tuple(result.shape) != tuple(entry.target_shape):
        raise PlanError(
            f"{source}: {', '.join(repr(n) for n in entry.source)} has shape "
            f"{[list(v.shape) for v in values] if len(values) > 1 else list(values[0].shape)}; after "
            f"{entry.transform or 'copy'} it is {list(result.shape)}, but the plan expects "
            f"{list(entry.target_shape)} for {entry.target!r}. The plan was made for another checkpoint; "
            "run `weight-mapper map` again on this one."
        )
    return result


class ConvertedTensors(Mapping):
    """The target state dict a plan describes, each tensor computed when it is read.

    Nothing is loaded up front, so a converted 100 GB checkpoint costs no memory until it is
    saved shard by shard; :meth:`shapes` answers from the plan alone.

    >>> from weight_mapper.plan import PlanEntry
    >>> p = MappingPlan((PlanEntry(("a",), "b", None, 1.0, 1.0, "tensor", (1,), (1,)),))
    >>> ConvertedTensors(p, {"a": torch.zeros(1)}).shapes()
    {'b': (1,)}
    """

    def __init__(self, plan: MappingPlan, tensors: Mapping[str, torch.Tensor], *, source: str = "checkpoint"):
        self.plan, self._tensors, self._source = plan, tensors, source
        # The key index, built once: reading one key runs its own entry only (O(1) in the plan's size).
        self._target2entry = {e.target: e for e in plan.entries}

    def __getitem__(self, key: str) -> torch.Tensor:
        entry = self._target2entry.get(key)
        if entry is None:
            raise KeyError(key)
        return _build(entry, [_lookup(self._tensors, name, self._source) for name in entry.source], self._source)

    def __contains__(self, key: object) -> bool:
        # Mapping's default would compute the tensor just to answer membership.
        return key in self._target2entry

    def __iter__(self) -> Iterator[str]:
        return iter(self._target2entry)

    def __len__(self) -> int:
        return len(self._target2entry)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Target key -> shape, from the plan (no tensor is read)."""
        return {k: tuple(e.target_shape) for k, e in self._target2entry.items()}


def _lookup(tensors: Mapping[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key in tensors:
        return tensors[key]
    raise PlanError(
        f"{source} has no tensor {key!r} that the plan needs; the plan was made for another "
        "checkpoint. Run `weight-mapper map` again on this one."
    )


@dataclass(frozen=True)
class ValidationReport:
    """How a converted state dict fits a target module, in ``load_state_dict``'s terms.

    Attributes:
        missing_keys: Target keys the state dict does not provide.
        unexpected_keys: State dict keys the target does not have.
        mismatched: ``(key, checkpoint shape, model shape)`` for size mismatches.
    """

    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not (self.missing_keys or self.unexpected_keys or self.mismatched)

    def message(self, model_name: str = "Module") -> str:
        """The error text ``load_state_dict(strict=True)`` would print."""
        parts = []
        if self.missing_keys:
            parts.append("Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in self.missing_keys) + ". ")
        if self.unexpected_keys:
            parts.append("Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in self.unexpected_keys) + ". ")
        for key, got, want in self.mismatched:
            parts.append(
                f"size mismatch for {key}: copying a param with shape torch.Size({list(got)}) from checkpoint, "
                f"the shape in current model is torch.Size({list(want)})."
            )
        if not parts:
            return f"All keys matched successfully for {model_name}"
        return f"Error(s) in loading state_dict for {model_name}:\n\t" + "\n\t".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (the CLI's ``apply --json``)."""
        return {
            "ok": self.ok,
            "missing_keys": list(self.missing_keys),
            "unexpected_keys": list(self.unexpected_keys),
            "mismatched": [{"key": k, "checkpoint_shape": list(got), "model_shape": list(want)}
                           for k, got, want in self.mismatched],
        }

    def __iter__(self):
        """Unpack as ``missing, unexpected = report`` like torch's ``load_state_dict``."""
        return iter((list(self.missing_keys), list(self.unexpected_keys)))


def validate_state_dict(
    state_dict: Mapping[str, torch.Tensor], target: nn.Module, *, strict: bool = False
) -> ValidationReport:
    """Compare a converted state dict with the keys and shapes ``target`` expects.

    Raises:
        ConversionError: With ``strict=True``, worded like ``load_state_dict``'s RuntimeError.
    """
    expected = target.state_dict(keep_vars=True)
    shapes = (
        state_dict.shapes() if isinstance(state_dict, ConvertedTensors)
        else {k: tuple(v.shape) for k, v in state_dict.items()}
    )
    missing = tuple(k for k in expected if k not in shapes)
    unexpected = tuple(k for k in shapes if k not in expected)
    mismatched = tuple(
        (k, shapes[k], tuple(expected[k].shape))
        for k in expected
        if k in shapes and shapes[k] != tuple(expected[k].shape)
    )
    report = ValidationReport(missing, unexpected, mismatched)
    if strict and not report.ok:
        raise ConversionError(report.message(type(target).__name__))
    return report
