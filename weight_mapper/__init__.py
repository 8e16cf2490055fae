"""weight_mapper: infer how the tensors of one checkpoint map onto another architecture.

The pipeline, one module per stage: ``checkpoint`` -> ``table`` -> ``tree`` -> ``score`` ->
``assign`` -> ``plan`` -> ``apply`` -> ``report``. ``WeightMapper`` and ``WeightRenamer`` are
thin facades over it.

The matcher (``WeightMapper``, ``STRATEGIES``, ``match``, ``MatchOptions``) is imported on first use (PEP 562), so that a
program which only applies or inverts a plan (``weight_mapper.apply``, ``renamer``,
``transforms``) loads none of scipy, rapidfuzz or rich.
"""

from typing import TYPE_CHECKING, Any

from weight_mapper.apply import ValidationReport, apply_plan, validate_state_dict
from weight_mapper.checkpoint import Checkpoint, load_checkpoint, load_checkpoint_as_dict, save_checkpoint
from weight_mapper.errors import (
    CheckpointError,
    ConversionError,
    MappingError,
    PlanError,
    UnsafeCheckpointError,
    WeightMapperError,
)
from weight_mapper.plan import MappingPlan, PlanEntry
from weight_mapper.renamer import WeightRenamer
from weight_mapper.table import TensorTable
from weight_mapper.training_state import TrainingStateReport, convert_training_state

if TYPE_CHECKING:
    from weight_mapper.mapper import STRATEGIES, WeightMapper
    from weight_mapper.matching import MatchOptions, match

__version__ = "0.1.0"

# Public names whose modules load the matcher: resolved lazily by ``__getattr__``.
_LAZY = {
    "WeightMapper": "weight_mapper.mapper",
    "STRATEGIES": "weight_mapper.mapper",
    "match": "weight_mapper.matching",
    "MatchOptions": "weight_mapper.matching",
}

__all__ = [
    "WeightMapper",
    "WeightRenamer",
    "MappingPlan",
    "PlanEntry",
    "TensorTable",
    "STRATEGIES",
    "match",
    "MatchOptions",
    "Checkpoint",
    "load_checkpoint",
    "load_checkpoint_as_dict",
    "save_checkpoint",
    "apply_plan",
    "validate_state_dict",
    "ValidationReport",
    "convert_training_state",
    "TrainingStateReport",
    "WeightMapperError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "MappingError",
    "PlanError",
    "ConversionError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'weight_mapper' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
