"""weight_mapper: infer how the tensors of one checkpoint map onto another architecture.

The pipeline, one module per stage: ``checkpoint`` -> ``table`` -> ``tree`` -> ``score`` ->
``assign`` -> ``plan`` -> ``apply`` -> ``report``. ``WeightMapper`` and ``WeightRenamer`` are
thin facades over it.
"""

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
from weight_mapper.mapper import STRATEGIES, WeightMapper
from weight_mapper.match import MatchOptions, match
from weight_mapper.plan import MappingPlan, PlanEntry
from weight_mapper.renamer import WeightRenamer
from weight_mapper.table import TensorTable
from weight_mapper.training_state import TrainingStateReport, convert_training_state

__version__ = "0.1.0"

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
