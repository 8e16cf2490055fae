"""Twin towers: a target that one source tower can supply alone draws from that tower only.

Checkpoints of two-tower and encoder-decoder models hold several top-level subtrees built from
the same layers: CLIP's ``text_model`` and ``vision_model``, T5's ``encoder`` and ``decoder``.
A target that is one of them (torchtune's T5 encoder or CLIP text encoder, built from the
whole Hugging Face checkpoint) finds an equally shaped, often equally named candidate for
each of its tensors in *both* towers; scored tensor by tensor, a layer's ``q_proj`` can come
from the text tower and its ``k_proj`` from the vision tower, every entry confident.

A person decides at the level of the towers first, and so does :func:`tower_exclusions`: a
source tower *supplies* the target when the shapes of its tensors cover at least
:data:`SUPPLY_SHARE` of the target's. When two or more towers supply it, they compete for the
whole target. The one whose shapes cover more of the target wins; then the one with fewer
tensors left over (T5's decoder has a cross-attention the encoder lacks), then the one the
first assignment drew more targets from; a tie on all three decides nothing. The losers' tensors are left
out of the matching (they stay unmatched, as a partial transfer leaves them). A target that
needs both towers (a whole encoder-decoder) is supplied by neither alone, and nothing changes.

This runs on the tables and one assignment only: no tensor data.
"""

from __future__ import annotations

import functools
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from weight_mapper.table import TensorTable

__all__ = ["SUPPLY_SHARE", "TowerChoice", "source_towers", "tower_exclusions"]

#: A source tower supplies the target when its tensor shapes cover this share of the target's.
SUPPLY_SHARE = 0.75


@dataclass(frozen=True)
class TowerChoice:
    """Which of several supplying source towers the target draws from.

    Attributes:
        chosen: The winning tower's name prefix (``"encoder."``).
        excluded: The other supplying towers' prefixes, whose tensors are left out.
        drawn: Per supplying tower, how many targets the first assignment drew from it.
        rows: Source rows of the excluded towers.
    """

    chosen: str
    excluded: tuple[str, ...]
    drawn: dict[str, int]
    rows: np.ndarray

    def describe(self) -> str:
        """One line for the plan's analysis."""
        counts = ", ".join(f"{t.rstrip('.')} {n}" for t, n in self.drawn.items())
        return (f"the target draws from one of {len(self.drawn)} source towers that can each supply it: "
                f"{self.chosen.rstrip('.')} (targets drawn in the first assignment: {counts}); "
                f"{', '.join(t.rstrip('.') for t in self.excluded)} left out")


def source_towers(names: tuple[str, ...] | list[str]) -> list[str]:
    """Each name's tower: its first component below the components every name shares.

    >>> source_towers(["m.encoder.0.w", "m.decoder.0.w", "m.shared.w"])
    ['m.encoder.', 'm.decoder.', 'm.shared.']
    >>> source_towers(["logit_scale", "text.w"])
    ['logit_scale', 'text.']
    """
    parts = [n.split(".") for n in names]
    common = 0
    if parts:
        while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
            common += 1
    return [".".join(p[:common + 1]) + ("." if len(p) > common + 1 else "") for p in parts]


@functools.lru_cache(maxsize=4096)
def _shape_key(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(shape))  # transposed storage ([in, out] Conv1D) supplies the same tensor


def tower_exclusions(src: TensorTable, tgt: TensorTable, assigned_src: np.ndarray) -> TowerChoice | None:
    """The towers to leave out, when several source towers could each supply the whole target.

    Args:
        src, tgt: The two sides.
        assigned_src: Source rows of the first (unrestricted) 1:1 assignment.

    Returns:
        The decision, or None when at most one tower supplies the target or the first
        assignment does not prefer one of them.
    """
    canon_s, canon_t = np.flatnonzero(src.is_canonical), np.flatnonzero(tgt.is_canonical)
    if len(canon_t) < 4:
        return None
    towers = source_towers(src.names)
    needed = Counter(_shape_key(tgt.shapes[r]) for r in canon_t)
    by_tower: defaultdict[str, Counter] = defaultdict(Counter)
    for r in canon_s.tolist():
        by_tower[towers[r]][_shape_key(src.shapes[r])] += 1
    size = sum(needed.values())
    cover = {t: sum((c & needed).values()) for t, c in by_tower.items() if t.endswith(".")}
    suppliers = [t for t, n in cover.items() if n >= SUPPLY_SHARE * size]
    if len(suppliers) < 2:
        return None
    drawn_counts = Counter(towers[r] for r in assigned_src.tolist())
    drawn = {t: drawn_counts.get(t, 0) for t in suppliers}
    leftover = {t: sum(by_tower[t].values()) - cover[t] for t in suppliers}
    key = {t: (-cover[t], leftover[t], -drawn[t]) for t in suppliers}
    ranked = sorted(suppliers, key=key.__getitem__)
    best, second = ranked[0], ranked[1]
    if key[best] == key[second]:
        return None
    excluded = tuple(ranked[1:])
    rows = np.array([r for r in canon_s.tolist() if towers[r] in excluded], dtype=np.int64)
    return TowerChoice(best, excluded, {t: drawn[t] for t in ranked}, rows)
