"""Run the accuracy benchmark: every pair x every strategy, print a table, write JSON.

    python -m benchmarks.accuracy                      # all pairs whose libraries import
    python -m benchmarks.accuracy --pairs llama syn_renamed --strategies greedy best_match
    python -m benchmarks.accuracy --update-readme      # also rewrite the table in benchmarks/README.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.runinfo import cpu_model, git_state, replace_between
from benchmarks.accuracy.evaluate import (
    close_enough,
    output_diff,
    positional_plan,
    prepare_source,
    round_trip,
    score_plan,
    truth_plan,
)
from benchmarks.accuracy.pairs import PAIRS, REPO_ROOT, Pair, missing_requirements

__all__ = ["main", "run_pair", "STRATEGIES"]

# label -> (weight_mapper strategy or None for the positional baseline, what the mapper is given:
# "module" both models, "dummy" both models and dummy_input, "state_dict" the source's state
# dict and the target model, as `weight-mapper map CHECKPOINT FACTORY` does, "sorted" the
# source saved as a safetensors file (its header lists the keys sorted) and the target model)
STRATEGIES: dict[str, tuple[str | None, str]] = {
    "positional": (None, "module"),
    "greedy": ("greedy", "module"),
    "best_match": ("best_match", "module"),
    "best_match+dummy": ("best_match", "dummy"),
    "best_match+sd": ("best_match", "state_dict"),
    "best_match+sorted": ("best_match", "sorted"),
    # not run by default; pick them with --strategies
    "shape_only": ("shape_only", "module"),
    "conservative": ("conservative", "module"),
    "greedy+dummy": ("greedy", "dummy"),
}
DEFAULT_STRATEGIES = ("positional", "greedy", "best_match", "best_match+dummy", "best_match+sd", "best_match+sorted")
DEFAULT_JSON = REPO_ROOT / "benchmarks" / "results" / "accuracy.json"
README = REPO_ROOT / "benchmarks" / "README.md"
_BEGIN, _END = "<!-- accuracy-table:begin -->", "<!-- accuracy-table:end -->"
_EXAMPLES = 3  # wrong pairs printed per (pair, strategy); the JSON keeps all


def _predict(pair_mappers: dict[str, Any], strategy: str | None, given: str, src_sd, tgt_sd):
    """``(plan, mapper or None, setup seconds, mapping seconds)`` for one strategy."""
    if strategy is None:
        start = time.perf_counter()
        plan = positional_plan(src_sd, tgt_sd)
        return plan, None, 0.0, time.perf_counter() - start
    mapper, setup_s = pair_mappers[given]
    start = time.perf_counter()
    mapper.suggest_mapping(strategy=strategy)
    elapsed = time.perf_counter() - start
    return mapper.get_plan(), mapper, setup_s, elapsed


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}" if str(exc) else type(exc).__name__


def _verify(plan, mapper, src, tgt, x) -> dict[str, Any]:
    """``mapper.verify(src, tgt, x)`` (for the baseline, the function it calls, on its plan)."""
    from weight_mapper.verify import verify_conversion

    try:
        report = mapper.verify(src, tgt, x) if mapper is not None else verify_conversion(plan, src, tgt, x)
    except Exception as exc:  # noqa: BLE001 - report any failure as a failed verification
        return {"ok": False, "max_abs_diff": float("nan"), "untouched": None, "error": _error(exc)}
    return {"ok": report.ok, "max_abs_diff": report.max_abs_diff, "untouched": len(report.untouched),
            "atol": report.atol, "error": None}


def _transform_counts(entries) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in entries:
        key = e.transform or "copy"
        counts[key] = counts.get(key, 0) + 1
    return counts


def run_pair(pair: Pair, strategies: Sequence[str], *, seed: int = 0) -> dict[str, Any]:
    """Prove the pair's ground truth, then score every strategy on it."""
    from weight_mapper import WeightMapper, apply_plan

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    src, tgt = pair.build()
    prepare_source(src, pair.make_input, gen)
    tgt.eval()
    x = pair.make_input(1, gen)
    src_sd = src.state_dict()
    tgt_sd = tgt.state_dict()
    fresh = {k: v.clone() for k, v in tgt_sd.items()}  # the target's random init, restored per strategy
    truth = pair.truth(list(src_sd))

    # Proof: converting through the ground truth (transforms applied) loads strictly and
    # reproduces the source's outputs; and the truth's plan inverts back to the source exactly.
    gt_plan = truth_plan(truth, src_sd, tgt_sd)
    tgt.load_state_dict(apply_plan(gt_plan, src_sd), strict=True)
    proof_diff, scale = output_diff(src, tgt, x, pair.output)
    gt_counts = _transform_counts(gt_plan.entries)
    record: dict[str, Any] = {
        "name": pair.name, "source": pair.source, "target": pair.target, "note": pair.note,
        "n_source": len(src_sd), "n_target": len(tgt_sd), "n_truth": len(truth),
        "truth_transforms": {k: v for k, v in gt_counts.items() if k != "copy"},
        "truth_not_copy": {t: [list(srcs), tr] for t, (srcs, tr) in truth.items() if tr is not None},
        "proof": {"max_abs_diff": proof_diff, "output_scale": scale, "ok": close_enough(proof_diff, scale),
                  "inverse": round_trip(gt_plan, src_sd)},
        "results": [],
    }

    mappers: dict[str, Any] = {}
    tmp = tempfile.TemporaryDirectory(prefix="accuracy_")
    for given in sorted({STRATEGIES[s][1] for s in strategies if STRATEGIES[s][0] is not None}):
        start = time.perf_counter()
        if given == "state_dict":
            mapper = WeightMapper(src_sd, tgt)
        elif given == "sorted":
            from safetensors.torch import save_file

            path = Path(tmp.name) / "source.safetensors"
            save_file({k: v.detach().clone().contiguous() for k, v in sorted(src_sd.items())}, str(path))
            mapper = WeightMapper.from_checkpoint(path, tgt)
        else:
            mapper = WeightMapper(src, tgt, dummy_input=x if given == "dummy" else None)
        mappers[given] = (mapper, time.perf_counter() - start)

    for label in strategies:
        strategy, given = STRATEGIES[label]
        plan, mapper, setup_s, map_s = _predict(mappers, strategy, given, src_sd, tgt_sd)
        score = score_plan(plan, truth, len(tgt_sd))
        tgt.load_state_dict(fresh)
        error = None
        try:
            # Every target tensor the plan leaves out keeps the fresh target's random init.
            tgt.load_state_dict(apply_plan(plan, src_sd), strict=False)
            diff, _ = output_diff(src, tgt, x, pair.output)
        except Exception as exc:  # noqa: BLE001 - a bad mapping may fail to convert, load or run
            diff, error = float("nan"), _error(exc)
        tgt.load_state_dict(fresh)
        verified = _verify(plan, mapper, src, tgt, x)
        tgt.load_state_dict(fresh)
        flagged = {e.target: e.flagged for e in plan.entries}
        record["results"].append({
            "strategy": label,
            "precision": score.precision, "recall": score.recall, "f1": score.f1,
            "n_predicted": score.n_predicted, "n_correct": score.n_correct, "filled": score.filled,
            "transforms": _transform_counts(plan.entries),
            "max_abs_diff": diff, "functional_ok": close_enough(diff, scale), "error": error,
            "verify": verified, "inverse": round_trip(plan, src_sd),
            "setup_s": setup_s, "suggest_s": map_s,
            "wrong": [{"target": t, "predicted": [list(ps), pt], "truth": None if ws is None else [list(ws), wt]}
                      for t, ps, pt, ws, wt in score.wrong],
            "missed": [{"target": t, "truth": [list(ws), wt]} for t, ws, wt in score.missed],
            # wrong entries that carry no flag (not ambiguous, no review flag): what a user would trust
            "unflagged_wrong": sum(not flagged.get(t, True) for t, *_ in score.wrong),
        })
    tmp.cleanup()
    record["total_s"] = time.perf_counter() - t0
    return record


# ---------------------------------------------------------------------------- output
def _fmt_diff(d: float) -> str:
    return "error" if d != d else f"{d:.1e}"


def _fmt_inverse(inv: dict) -> str:
    if inv["exact"]:
        return "yes"
    if inv["error"]:
        return "no: error"
    parts = [f"{inv[k]} {w}" for k, w in (("missing", "missing"), ("differ", "differ"), ("extra", "extra")) if inv[k]]
    return "no: " + ", ".join(parts)


def _fmt_verify(v: dict) -> str:
    if v["error"]:
        return "error"
    if v["ok"]:
        return "yes"
    return "no" + (f" ({v['untouched']} unfilled)" if v["untouched"] else "")


def _fmt_transforms(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "-"


def proof_table(pairs: Sequence[dict]) -> str:
    lines = [
        "| pair | source -> target | tensors src/tgt | truth entries | of which transformed | proof max abs diff (output scale) | truth inverts exactly |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in pairs:
        if "skipped" in p:
            lines.append(f"| {p['name']} | skipped: {p['skipped']} | | | | | |")
            continue
        ok = "" if p["proof"]["ok"] else " **NOT PROVED**"
        lines.append(
            f"| {p['name']} | {p['source']} -> {p['target']} | {p['n_source']}/{p['n_target']} | {p['n_truth']} "
            f"| {_fmt_transforms(p['truth_transforms'])} "
            f"| {_fmt_diff(p['proof']['max_abs_diff'])} ({p['proof']['output_scale']:.2g}){ok} "
            f"| {_fmt_inverse(p['proof']['inverse'])} |"
        )
    return "\n".join(lines)


def results_table(pairs: Sequence[dict]) -> str:
    lines = [
        "| pair | strategy | precision | recall | F1 | wrong | unflagged wrong | target filled | max abs diff "
        "| outputs match | verify() | inverse exact | setup s | suggest s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in pairs:
        for r in p.get("results", ()):
            lines.append(
                f"| {p['name']} | {r['strategy']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} "
                f"| {r['n_predicted'] - r['n_correct']} | {r.get('unflagged_wrong', '-')} | {r['filled']:.1%} "
                f"| {_fmt_diff(r['max_abs_diff'])} "
                f"| {'yes' if r['functional_ok'] else 'no'} | {_fmt_verify(r['verify'])} | {_fmt_inverse(r['inverse'])} "
                f"| {r['setup_s']:.2f} | {r['suggest_s']:.2f} |"
            )
    return "\n".join(lines)


def _fmt_entry(sources: Sequence[str], transform: str | None) -> str:
    src = ", ".join(f"`{s}`" for s in sources[:3]) + (f", ... ({len(sources)})" if len(sources) > 3 else "")
    return src + (f" [{transform}]" if transform else "")


def failures(pairs: Sequence[dict], n: int = _EXAMPLES) -> str:
    lines = []
    for p in pairs:
        for r in p.get("results", ()):
            problems = [f"{len(r['wrong'])} wrong, {len(r['missed'])} missed"]
            if r["error"]:
                problems.append(f"conversion: {r['error']}")
            if r["verify"]["error"]:
                problems.append(f"verify: {r['verify']['error']}")
            if r["inverse"]["error"]:
                problems.append(f"inverse: {r['inverse']['error']}")
            if not r["wrong"] and not r["missed"] and len(problems) == 1:
                continue
            lines.append(f"- {p['name']} / {r['strategy']}: " + "; ".join(problems))
            for w in r["wrong"][:n]:
                want = "none" if w["truth"] is None else _fmt_entry(*w["truth"])
                lines.append(f"    - `{w['target']}` <- {_fmt_entry(*w['predicted'])} (truth: {want})")
            for m in r["missed"][:n] if not r["wrong"] else ():
                lines.append(f"    - `{m['target']}` unfilled (truth: {_fmt_entry(*m['truth'])})")
    return "\n".join(lines) or "(none)"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("torchvision", "timm", "transformers", "weight_mapper"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            out[name] = "not importable"
    return out


def _machine() -> str:
    return f"{cpu_model()}, torch threads {torch.get_num_threads()}"


def _git_state() -> str:
    return git_state()


def _interpreter() -> str:
    """The Python that ran this, as typed (a venv's ``bin/python``, not the file it links to)."""
    exe = Path(sys.executable)
    return "python" if not exe.is_absolute() else str(exe)


def render(report: dict) -> str:
    m = report["meta"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    return "\n".join([
        f"Run {m['date']} on {m['machine']}; {versions}; commit {m['git']}; {m['total_s']:.0f} s in all.",
        f"Command: `{m['command']}`",
        "",
        "Ground truth, proved by converting the source through it and comparing outputs (batch 1, eval mode):",
        "",
        proof_table(report["pairs"]),
        "",
        "Strategies (precision/recall/F1 over the ground-truth entries, an entry correct only if its target, its source"
        " keys in order and its transform all agree; `wrong` = predicted entries that differ from the truth,"
        " `unflagged wrong` = those of them the plan does not flag for review (the positional baseline flags nothing);"
        " `+sd` = from the source's state dict, `+sorted` = from the source saved as a safetensors file, whose"
        " header lists the keys sorted;"
        " `max abs diff` = outputs of the source vs a fresh target loaded with `apply_plan(plan, source_state_dict)`,"
        " `strict=False`; `verify()` = `mapper.verify(source, target, x)` passes; `inverse exact` ="
        " `apply_plan(plan.inverse(), apply_plan(plan, sd))` gives back every source tensor exactly):",
        "",
        results_table(report["pairs"]),
    ])


def _update_readme(text: str) -> None:
    replace_between(README, _BEGIN, _END, text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", choices=[p.name for p in PAIRS], default=[p.name for p in PAIRS])
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=list(DEFAULT_STRATEGIES))
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"where to write results (default {DEFAULT_JSON.relative_to(REPO_ROOT)})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--update-readme", action="store_true", help="rewrite the table in benchmarks/README.md")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    records = []
    for pair in (p for p in PAIRS if p.name in args.pairs):
        missing = missing_requirements(pair)
        if missing:
            print(f"[{pair.name}] skipped: {', '.join(missing)} not importable", file=sys.stderr)
            records.append({"name": pair.name, "skipped": f"{', '.join(missing)} not importable"})
            continue
        print(f"[{pair.name}] running ...", file=sys.stderr, flush=True)
        records.append(run_pair(pair, args.strategies, seed=args.seed))
        print(f"[{pair.name}] done in {records[-1]['total_s']:.1f} s", file=sys.stderr, flush=True)

    argv_shown = " ".join(sys.argv[1:]) if argv is None else " ".join(argv)
    report = {
        "meta": {
            "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "machine": _machine(),
            "versions": _versions(),
            "git": _git_state(),
            "command": f"{_interpreter()} -m benchmarks.accuracy {argv_shown}".strip(),
            "seed": args.seed,
            "total_s": time.perf_counter() - start,
        },
        "pairs": records,
    }
    text = render(report)
    print(text)
    print("\nWrong or missed tensors (first few per pair and strategy):\n" + failures(records))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {args.json}")
    if args.update_readme:
        _update_readme(text)
        print(f"updated {README}")
    return 0
