"""The data flow of full-size models on the meta device, and the 45,395-tensor mapping (issue 16).

    python -m benchmarks.scale.flow                    # deepseek_v3 and llama_405b, one fresh interpreter each
    python -m benchmarks.scale.flow --cases llama_405b

For each full-size case of the scale benchmark (DeepSeek-V3 671B, Llama-3 at 405B size, built
under ``torch.device("meta")`` from transformers 5 configs), in a fresh interpreter:

- **flow s**: :func:`weight_mapper.flow.auto_execution_order` on the meta model (a synthesised
  input, one forward pass recorded through a ``TorchFunctionMode``; nothing computed), and how
  many of the model's tensors it places;
- **match s**: ``WeightMapper(source, model)`` + ``suggest_mapping(strategy="best_match")``,
  the source being the case's ``{name: shape}`` dict under the reference names (45,395 tensors
  for DeepSeek-V3). A state-dict source has no module, so the matcher records no flow for this
  pair (a flow is only compared between two modules): **with flow** is the flow recorded on
  the target plus this matching, added, the cost of a pair whose both sides are modules.

Targets (issue 16): the 45,395-tensor mapping under 5 s with the flow, under 2 s without.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["measure", "render", "main"]

REPO_ROOT = Path(__file__).resolve().parents[2]
CASES = ("deepseek_v3", "llama_405b")
TARGET_WITH_FLOW_S, TARGET_WITHOUT_FLOW_S = 5.0, 2.0


def measure(case_name: str, *, strategy: str = "best_match") -> dict[str, Any]:
    """Build one case on meta, record its flow, map its source; timings (this process)."""
    t0 = time.perf_counter()
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from benchmarks.scale.full_size import CASES as FULL
    from benchmarks.scale.full_size import build_case
    from weight_mapper import WeightMapper
    from weight_mapper.flow import auto_execution_order

    import_s = time.perf_counter() - t0
    case = FULL[case_name]
    t0 = time.perf_counter()
    model = case.build_target()
    build_s = time.perf_counter() - t0
    n_model = len(model.state_dict())
    t0, c0 = time.perf_counter(), time.process_time()
    order, how = auto_execution_order(model)
    flow_s, flow_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    placed = 0 if order is None else sum(name in order for name in model.state_dict())
    built = build_case(case, model=model)
    t0, c0 = time.perf_counter(), time.process_time()
    mapper = WeightMapper(built.source, built.target)
    mapper.suggest_mapping(strategy=strategy)
    match_s, match_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    plan = mapper.get_plan()
    correct = sum(1 for e in plan.entries if len(e.source) == 1 and built.truth.get(e.source[0]) == e.target)
    return {"case": case_name, "n_source": len(built.source), "n_model": n_model, "import_s": import_s,
            "build_s": build_s, "flow_s": flow_s, "flow_cpu_s": flow_cpu_s, "match_cpu_s": match_cpu_s,
            "flow_how": how, "placed": placed, "match_s": match_s,
            "with_flow_s": flow_s + match_s, "flow_sources": list(mapper.flow_sources),
            "correct_1to1": correct, "n_truth": len(built.truth), "strategy": strategy}


def _run_child(case: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.scale.flow", "--child", case], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"case": case, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def render(records: list[dict[str, Any]]) -> str:
    lines = ["| case | model tensors | flow s | flow source | tensors placed | source tensors | match s (no flow) "
             "| flow + match s | 1:1 correct | build on meta s | flow / match CPU s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['error']} | | | | | | | | | |")
            continue
        lines.append(f"| {r['case']} | {r['n_model']:,} | {r['flow_s']:.2f} | {r['flow_how']} | {r['placed']:,}/{r['n_model']:,} "
                     f"| {r['n_source']:,} | {r['match_s']:.2f} | {r['with_flow_s']:.2f} | {r['correct_1to1']:,}/{r['n_truth']:,} "
                     f"| {r['build_s']:.1f} | {r['flow_cpu_s']:.2f} / {r['match_cpu_s']:.2f} |")
    mark = {True: "met", False: "**MISSED**"}
    lines.append("")
    for r in records:
        if "error" in r or r["n_source"] < 10_000:
            continue
        with_cpu = r["flow_cpu_s"] + r["match_cpu_s"]
        lines.append(f"- `{r['case']}`, {r['n_source']:,} tensors: {r['match_s']:.2f} s without the flow "
                     f"(< {TARGET_WITHOUT_FLOW_S:.0f} s: {mark[r['match_s'] < TARGET_WITHOUT_FLOW_S]}; "
                     f"{r['match_cpu_s']:.2f} s of CPU: {mark[r['match_cpu_s'] < TARGET_WITHOUT_FLOW_S]}), "
                     f"{r['with_flow_s']:.2f} s with it (< {TARGET_WITH_FLOW_S:.0f} s: "
                     f"{mark[r['with_flow_s'] < TARGET_WITH_FLOW_S]}; {with_cpu:.2f} s of CPU: "
                     f"{mark[with_cpu < TARGET_WITH_FLOW_S]})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale.flow", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES))
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "flow.json")
    parser.add_argument("--child", metavar="CASE", help=argparse.SUPPRESS)
    parser.add_argument("--render", type=Path, default=None, metavar="JSON", help="print the table of an earlier run")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child)))
        return 0
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return 0
    import os

    load_start, records = os.getloadavg()[0], []
    for case in args.cases:
        records.append(_run_child(case))
        print(f"[{case}] {records[-1].get('error') or 'done'}", file=sys.stderr, flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(records, indent=1) + "\n")
    print(f"Load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (2 cores).\n")
    print(render(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
