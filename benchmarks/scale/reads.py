"""Reading a converted checkpoint key by key at DeepSeek-V3 size (issue 16).

    python -m benchmarks.scale.reads                 # the 45,395-tensor DeepSeek-V3 Hub skeleton
    python -m benchmarks.scale.reads --case deepseek_v3_hub_small

The source is the ``deepseek_v3_hub`` case of the scale benchmark (reference names, every
tensor 1:1 onto the Hub checkpoint's names) as meta tensors of the real shapes, so reading a
tensor costs nothing and what is timed is the mapping itself. The plan is the ground truth
(one copy entry per tensor). Timed, in this process, fastest of ``--repeats``:

- **plain**: reading every source tensor once from ``renamer.tensors`` (``[name]`` in turn);
- **converted**: reading every target tensor once from ``renamer.rename_keys(plan)``
  (``converted[key]`` in turn, what ``dict(converted)`` and ``load_state_dict`` do).

The overhead of the conversion is the difference: done when under one second.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["measure", "render", "main"]

REPO_ROOT = Path(__file__).resolve().parents[2]
TARGET_OVERHEAD_S = 1.0


def measure(case_name: str = "deepseek_v3_hub", *, repeats: int = 3) -> dict[str, Any]:
    """Time plain and converted reads of every tensor of one case; the record."""
    import torch

    from benchmarks.scale.full_size import CASES, build_case
    from weight_mapper import WeightRenamer
    from weight_mapper.plan import MappingPlan, PlanEntry

    t0 = time.perf_counter()
    built = build_case(CASES[case_name])
    source = {name: torch.empty(shape, device="meta") for name, shape in built.source.items()}
    plan = MappingPlan(tuple(PlanEntry((s,), t, None, 1.0, 1.0, "tensor", built.source[s], built.source[s])
                             for s, t in built.truth.items()))
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    renamer = WeightRenamer(source)
    converted = renamer.rename_keys(plan)
    rename_keys_s = time.perf_counter() - t0
    tensors = renamer.tensors
    names, keys = list(tensors), list(converted)

    def plain() -> None:
        for name in names:
            tensors[name]

    def through_plan() -> None:
        for key in keys:
            converted[key]

    plain_s, converted_s = [], []
    for _ in range(repeats):
        for fn, times in ((plain, plain_s), (through_plan, converted_s)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    out = dict(converted)  # what load_state_dict reads, checked once
    assert len(out) == len(built.truth) and all(out[t].shape == built.source[s] for s, t in built.truth.items())
    overhead = min(converted_s) - min(plain_s)
    return {"case": case_name, "n_source": len(source), "n_target": len(keys), "build_s": build_s,
            "rename_keys_s": rename_keys_s, "plain_s": min(plain_s), "converted_s": min(converted_s),
            "plain_runs_s": plain_s, "converted_runs_s": converted_s, "overhead_s": overhead,
            "per_key_us": overhead / max(len(keys), 1) * 1e6, "target_met": overhead < TARGET_OVERHEAD_S}


def render(r: dict[str, Any]) -> str:
    mark = "met" if r["target_met"] else "**MISSED**"
    return "\n".join([
        "| case | tensors | rename_keys s | plain reads s | converted reads s | overhead s | per key |",
        "|---|---|---|---|---|---|---|",
        f"| {r['case']} | {r['n_target']:,} | {r['rename_keys_s']:.2f} | {r['plain_s']:.3f} | {r['converted_s']:.3f} "
        f"| {r['overhead_s']:.3f} | {r['per_key_us']:.1f} µs |",
        "",
        f"- reading all {r['n_target']:,} converted tensors: {r['overhead_s']:.3f} s of overhead beyond the plain reads "
        f"(< {TARGET_OVERHEAD_S:.0f} s: {mark})",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale.reads", description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="deepseek_v3_hub")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the record here")
    args = parser.parse_args(argv)
    record = measure(args.case, repeats=args.repeats)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    print(render(record))
    print(json.dumps(record), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
