"""Prove and repair on real architecture pairs; print what it cost in forward passes.

    python -m benchmarks.repair                         # every accuracy pair whose libraries import
    python -m benchmarks.repair --pairs llama gpt2      # some of them (plus the rotary case, always)

Per pair (built as the accuracy benchmark builds it: random weights, every source tensor made to
matter, one input), three plans are proved with ``verify_conversion``:

1. **matcher**: ``suggest_mapping(repair=False)`` with both models and the input: is it right
   (an independent output comparison: the converted state dict loaded into a fresh target),
   and does ``verify``'s verdict agree with that comparison?
2. **suggest**: ``suggest_mapping()`` as users call it with both models and an input, which
   proves and repairs; forward passes counted by the report;
3. **sabotaged**: the ground-truth plan with the sources of two equally shaped entries
   exchanged (one per seed), proved with ``repair=True``: repaired or not, and the forward
   passes it took.

Plus ``llama_rope``: HF Llama -> a torchtune-named decoder that rotates interleaved pairs, where
names and shapes give a plan that copies q/k and is wrong without the rotary convention.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import replace
from typing import Any

import torch

from benchmarks.accuracy import conversions
from benchmarks.accuracy.evaluate import close_enough, output_diff, prepare_source, score_plan, truth_plan
from benchmarks.accuracy.pairs import PAIRS, REPO_ROOT, Pair, _LLAMA, _build_llama, _llama_truth, _tokens, \
    missing_requirements
from benchmarks.runinfo import cpu_model, git_state

DEFAULT_JSON = REPO_ROOT / "benchmarks" / "results" / "repair.json"


def _build_llama_rope():
    hf, _ = _build_llama()
    c = _LLAMA
    ref = conversions.tests_module("reference_llama")
    tune = ref.TransformerDecoder(c["vocab"], c["dim"], c["hidden"], c["layers"], c["heads"], c["kv_heads"], c["eps"],
                                  c["theta"], interleaved=True)
    return hf, tune


def _rope_truth(keys: list[str]):
    """The llama pair's truth, with the q/k rows reordered into interleaved pairs."""
    return {t: (s, "rotary_interleave" if t.endswith(("q_proj.weight", "k_proj.weight")) else tr)
            for t, (s, tr) in _llama_truth(keys).items()}


_ROPE = Pair("llama_rope", "HF LlamaForCausalLM", "torchtune-named decoder, interleaved rotary",
             _build_llama_rope, _tokens(_LLAMA["vocab"], 16), _rope_truth, requires=("transformers",))


def _independent(plan, src, tgt, fresh, x, pair) -> bool:
    from weight_mapper import apply_plan

    tgt.load_state_dict(fresh)
    try:
        tgt.load_state_dict(apply_plan(plan, src.state_dict()), strict=False)
        diff, scale = output_diff(src, tgt, x, pair.output)
    except Exception:  # noqa: BLE001 - a wrong plan may fail to convert or load
        return False
    finally:
        tgt.load_state_dict(fresh)
    return close_enough(diff, scale)


def _sabotage(plan, seed: int):
    """Exchange the sources of two equally shaped single-source entries (None if there are none)."""
    rng = random.Random(seed)
    by_shape: dict[tuple, list[int]] = {}
    for i, e in enumerate(plan.entries):
        if len(e.source) == 1 and e.level != "alias":
            by_shape.setdefault((e.source_shape, e.target_shape, e.transform), []).append(i)
    groups = [g for g in by_shape.values() if len(g) >= 2]
    if not groups:
        return None, ""
    i, j = rng.sample(rng.choice(groups), 2)
    entries = list(plan.entries)
    a, b = entries[i], entries[j]
    entries[i], entries[j] = replace(a, source=b.source), replace(b, source=a.source)
    return replace(plan, entries=tuple(entries)), f"{a.target} <-> {b.target}"


def run_pair(pair: Pair, *, seeds: int) -> dict[str, Any]:
    from weight_mapper import WeightMapper
    from weight_mapper.verify import verify_conversion

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    src, tgt = pair.build()
    prepare_source(src, pair.make_input, gen)
    src.eval()
    tgt.eval()
    x = pair.make_input(1, gen)
    src_sd, tgt_sd = src.state_dict(), tgt.state_dict()
    fresh = {k: v.clone() for k, v in tgt_sd.items()}
    truth = pair.truth(list(src_sd))
    record: dict[str, Any] = {"name": pair.name, "n_source": len(src_sd), "n_target": len(tgt_sd)}

    print(f"  {pair.name}: matching", flush=True)
    mapper = WeightMapper(src, tgt, dummy_input=x)
    plan0 = mapper.suggest_mapping(repair=False) and mapper.get_plan()
    print(f"  {pair.name}: proving the matcher's plan", flush=True)
    report0 = verify_conversion(plan0, src, tgt, x)
    tgt.load_state_dict(fresh)
    right0 = _independent(plan0, src, tgt, fresh, x, pair)
    record["matcher"] = {"f1": score_plan(plan0, truth, len(tgt_sd)).f1, "independent_ok": right0,
                         "verify_ok": report0.ok, "agree": report0.ok == right0, "n_forward": report0.n_forward,
                         "flagged": sum(e.flagged for e in plan0.entries)}

    print(f"  {pair.name}: suggest_mapping with repair", flush=True)
    start = time.perf_counter()
    mapper.suggest_mapping()
    seconds = time.perf_counter() - start
    plan1, report1 = mapper.get_plan(), mapper.verification
    right1 = _independent(plan1, src, tgt, fresh, x, pair)
    record["suggest"] = {
        "f1": score_plan(plan1, truth, len(tgt_sd)).f1, "independent_ok": right1,
        "verify_ok": None if report1 is None else report1.ok,
        "agree": None if report1 is None else report1.ok == right1,
        "n_forward": None if report1 is None else report1.n_forward,
        "repairs": [] if report1 is None else list(report1.repairs), "seconds": seconds,
        "proved": sum(e.provenance == "proved" for e in plan1.entries),
        "repaired": sum(e.provenance == "repaired" for e in plan1.entries), "n_entries": len(plan1.entries),
    }

    sabotaged = []
    gt = truth_plan(truth, src_sd, tgt_sd) if pair.name != "llama_rope" else None
    for seed in range(seeds if gt is not None else 0):
        bad, what = _sabotage(gt, seed)
        if bad is None:
            break
        print(f"  {pair.name}: sabotaged {what}", flush=True)
        start = time.perf_counter()
        report = verify_conversion(bad, src, tgt, x, repair=True)
        tgt.load_state_dict(fresh)
        fixed = _independent(report.plan, src, tgt, fresh, x, pair)
        sabotaged.append({"exchanged": what, "repaired": report.ok, "independent_ok": fixed,
                          "agree": report.ok == fixed, "n_forward": report.n_forward,
                          "repairs": list(report.repairs), "seconds": time.perf_counter() - start})
    record["sabotaged"] = sabotaged
    return record


def _table(records: list[dict]) -> str:
    lines = [
        "| pair | matcher right | verify agrees | flagged | suggest: right | verify agrees | forward passes | "
        "repairs | seconds | sabotaged: repaired | forward passes (each) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        m, s, sab = r["matcher"], r["suggest"], r["sabotaged"]
        yes = lambda v: "yes" if v else "no"  # noqa: E731
        lines.append(
            f"| {r['name']} | {yes(m['independent_ok'])} (F1 {m['f1']:.3f}) | {yes(m['agree'])} | {m['flagged']} | "
            f"{yes(s['independent_ok'])} (F1 {s['f1']:.3f}) | {yes(s['agree'])} | {s['n_forward']} | "
            f"{len(s['repairs'])} | {s['seconds']:.1f} | "
            + (f"{sum(x['repaired'] for x in sab)}/{len(sab)} | {', '.join(str(x['n_forward']) for x in sab)} |"
               if sab else "n/a | n/a |"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.repair", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", nargs="*", default=None, help="pair names (default: every pair that imports)")
    parser.add_argument("--seeds", type=int, default=3, help="sabotaged plans per pair")
    parser.add_argument("--json", default=str(DEFAULT_JSON))
    args = parser.parse_args(argv)
    pairs = [p for p in (*PAIRS, _ROPE) if args.pairs is None or p.name in args.pairs or p is _ROPE]
    records = []
    for pair in pairs:
        missing = missing_requirements(pair)
        if missing:
            print(f"skipped {pair.name}: needs {', '.join(missing)}")
            continue
        t0 = time.perf_counter()
        record = run_pair(pair, seeds=args.seeds)
        record["total_s"] = time.perf_counter() - t0
        records.append(record)
        s = record["suggest"]
        print(f"{pair.name}: matcher right {record['matcher']['independent_ok']}, after suggest right "
              f"{s['independent_ok']}, {s['n_forward']} forward passes, repairs {s['repairs'][:3]}; sabotaged: "
              + "; ".join(f"{x['exchanged']} -> repaired {x['repaired']} in {x['n_forward']} passes {x['repairs']}"
                          for x in record["sabotaged"]), flush=True)
    print()
    print(f"weight_mapper {git_state()}, torch {torch.__version__}, {cpu_model()}")
    print(_table(records))
    path = DEFAULT_JSON.parent / "repair.json" if args.json == str(DEFAULT_JSON) else args.json
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(records, indent=2, default=str))
    return 0
