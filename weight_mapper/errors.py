"""The exceptions weight_mapper raises for bad input.

Every message names the file, key or shape involved and says how to fix it.
"""

from __future__ import annotations

__all__ = [
    "WeightMapperError",
    "CheckpointError",
    "UnsafeCheckpointError",
    "MappingError",
    "PlanError",
    "ConversionError",
]


class WeightMapperError(Exception):
    """Base class of every error weight_mapper raises on purpose.

    The message names the Python keyword that fixes the problem (``trust_pickle=True``);
    ``option`` and ``value`` say it again as data, so that a front end names its own flag
    once, at its edge (the CLI adds ``--trust-pickle``), and inner messages stay short.
    """

    def __init__(self, *args: object, option: str | None = None, value: str | None = None):
        super().__init__(*args)
        self.option = option
        self.value = value


class CheckpointError(WeightMapperError):
    """A checkpoint file could not be read or written."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint needs arbitrary code to unpickle and the user did not opt in."""


class MappingError(WeightMapperError, ValueError):
    """The matcher was given invalid options or inputs."""


class PlanError(WeightMapperError, ValueError):
    """A mapping plan is malformed or does not fit the checkpoint it is applied to."""


class ConversionError(WeightMapperError):
    """Applying a plan produced tensors that do not fit the target model."""
