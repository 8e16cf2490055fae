"""The transform registry: what a plan entry may do to its source tensor on the way.

Each transform is data in :data:`TRANSFORMS`: how to apply it to a tensor, how to compute the
shape it produces, and the name of its inverse, so that any plan can be reversed. Applying
a transform never scores anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from weight_mapper.errors import PlanError

__all__ = ["Transform", "TRANSFORMS", "get_transform"]


@dataclass(frozen=True)
class Transform:
    """One registered tensor transform.

    Attributes:
        name: Registry key, stored in plans.
        apply: Tensor -> tensor.
        shape: Source shape -> produced shape.
        inverse: Name of the transform that undoes this one.
    """

    name: str
    apply: Callable[[torch.Tensor], torch.Tensor]
    shape: Callable[[tuple[int, ...]], tuple[int, ...]]
    inverse: str


def _transpose(t: torch.Tensor) -> torch.Tensor:
    # contiguous: safetensors refuses non-contiguous views, and a copy detaches from the source.
    return t.t().contiguous()


TRANSFORMS: dict[str, Transform] = {
    "identity": Transform("identity", lambda t: t, lambda s: tuple(s), "identity"),
    "transpose": Transform("transpose", _transpose, lambda s: tuple(reversed(s)), "transpose"),
}


def get_transform(name: str | None) -> Transform:
    """Look up a transform; ``None`` means identity.

    Raises:
        PlanError: For a name not in :data:`TRANSFORMS`.

    >>> get_transform("transpose").shape((3, 2))
    (2, 3)
    """
    key = "identity" if name is None else name
    try:
        return TRANSFORMS[key]
    except KeyError:
        raise PlanError(f"unknown transform {name!r}; known transforms: {sorted(TRANSFORMS)}") from None
