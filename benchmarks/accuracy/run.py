"""Run the accuracy benchmark: every pair x every strategy, print a table, write JSON.

    python -m benchmarks.accuracy                      # all pairs whose libraries import
    python -m benchmarks.accuracy --pairs llama syn_renamed --strategies greedy best_match
    python -m benchmarks.accuracy --update-readme      # also rewrite the table in benchmarks/README.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.accuracy.evaluate import (
    Prediction,
    close_enough,
    convert,
    fuse,
    output_diff,
    positional_mapping,
    prepare_source,
    score_mapping,
)
from benchmarks.accuracy.pairs import PAIRS, REPO_ROOT, Pair, missing_requirements

__all__ = ["main", "run_pair", "STRATEGIES"]

# label -> (weight_mapper strategy or None for the positional baseline, pass dummy_input?)
STRATEGIES: dict[str, tuple[str | None, bool]] = {
    "positional": (None, False),
    "greedy": ("greedy", False),
    "best_match": ("best_match", False),
    "best_match+dummy": ("best_match", True),
    # not run by default; pick them with --strategies
    "shape_only": ("shape_only", False),
    "conservative": ("conservative", False),
    "greedy+dummy": ("greedy", True),
}
DEFAULT_STRATEGIES = ("positional", "greedy", "best_match", "best_match+dummy")
DEFAULT_JSON = REPO_ROOT / "benchmarks" / "results" / "accuracy.json"
README = REPO_ROOT / "benchmarks" / "README.md"
_BEGIN, _END = "<!-- accuracy-table:begin -->", "<!-- accuracy-table:end -->"
_EXAMPLES = 3  # wrong pairs printed per (pair, strategy); the JSON keeps all


def _predict(pair_mappers: dict[bool, Any], strategy: str | None, use_dummy: bool, src_sd, tgt_sd):
    """``(predictions, setup seconds, mapping seconds)`` for one strategy."""
    if strategy is None:
        start = time.perf_counter()
        predicted = positional_mapping(src_sd, tgt_sd)
        return predicted, 0.0, time.perf_counter() - start
    mapper, setup_s = pair_mappers[use_dummy]
    start = time.perf_counter()
    mapper.suggest_mapping(strategy=strategy)
    elapsed = time.perf_counter() - start
    plan = mapper.get_plan()
    predicted = [Prediction(e.source[0], e.target, e.transform) for e in plan.entries if len(e.source) == 1]
    return predicted, setup_s, elapsed


def run_pair(pair: Pair, strategies: Sequence[str], *, seed: int = 0) -> dict[str, Any]:
    """Prove the pair's ground truth, then score every strategy on it."""
    from weight_mapper import WeightMapper

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
    fused = fuse(pair.not_1to1, src_sd)

    # Proof: the ground truth (plus the concatenations) converts the source exactly.
    tgt.load_state_dict({**{truth[k]: v for k, v in src_sd.items() if k in truth}, **fused}, strict=True)
    proof_diff, scale = output_diff(src, tgt, x, pair.output)
    record: dict[str, Any] = {
        "name": pair.name, "source": pair.source, "target": pair.target, "note": pair.note,
        "n_source": len(src_sd), "n_target": len(tgt_sd), "n_truth": len(truth),
        "not_1to1": {t: list(s) for t, s in pair.not_1to1.items()},
        "proof": {"max_abs_diff": proof_diff, "output_scale": scale, "ok": close_enough(proof_diff, scale)},
        "results": [],
    }

    mappers: dict[bool, Any] = {}
    for use_dummy in sorted({STRATEGIES[s][1] for s in strategies if STRATEGIES[s][0] is not None}):
        start = time.perf_counter()
        mapper = WeightMapper(src, tgt, dummy_input=x if use_dummy else None)
        mappers[use_dummy] = (mapper, time.perf_counter() - start)

    for label in strategies:
        strategy, use_dummy = STRATEGIES[label]
        predicted, setup_s, map_s = _predict(mappers, strategy, use_dummy, src_sd, tgt_sd)
        score = score_mapping(predicted, truth, len(tgt_sd))
        tgt.load_state_dict(fresh)
        error = None
        try:
            # Targets no 1:1 mapping can fill are filled by the benchmark itself, so that the
            # check judges the 1:1 part; everything else starts from the random init.
            tgt.load_state_dict({**fused, **convert(predicted, src_sd)}, strict=False)
            diff, _ = output_diff(src, tgt, x, pair.output)
        except Exception as exc:  # noqa: BLE001 - a bad mapping may fail to load or run
            diff, error = float("nan"), f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        record["results"].append({
            "strategy": label,
            "precision": score.precision, "recall": score.recall, "f1": score.f1,
            "n_predicted": score.n_predicted, "n_correct": score.n_correct, "filled": score.filled,
            "max_abs_diff": diff, "functional_ok": close_enough(diff, scale), "error": error,
            "setup_s": setup_s, "suggest_s": map_s,
            "wrong": [list(w) for w in score.wrong], "missed": [list(m) for m in score.missed],
        })
    record["total_s"] = time.perf_counter() - t0
    return record


# ---------------------------------------------------------------------------- output
def _fmt_diff(d: float) -> str:
    return "error" if d != d else f"{d:.1e}"


def proof_table(pairs: Sequence[dict]) -> str:
    lines = [
        "| pair | source -> target | tensors src/tgt | truth 1:1 | not 1:1 | proof max abs diff (output scale) |",
        "|---|---|---|---|---|---|",
    ]
    for p in pairs:
        if "skipped" in p:
            lines.append(f"| {p['name']} | skipped: {p['skipped']} | | | | |")
            continue
        ok = "" if p["proof"]["ok"] else " **NOT PROVED**"
        lines.append(
            f"| {p['name']} | {p['source']} -> {p['target']} | {p['n_source']}/{p['n_target']} | {p['n_truth']} "
            f"| {len(p['not_1to1'])} | {_fmt_diff(p['proof']['max_abs_diff'])} ({p['proof']['output_scale']:.2g}){ok} |"
        )
    return "\n".join(lines)


def results_table(pairs: Sequence[dict]) -> str:
    lines = [
        "| pair | strategy | precision | recall | F1 | wrong | target filled | max abs diff | outputs match | setup s | suggest s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in pairs:
        for r in p.get("results", ()):
            lines.append(
                f"| {p['name']} | {r['strategy']} | {r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f} "
                f"| {r['n_predicted'] - r['n_correct']} | {r['filled']:.1%} | {_fmt_diff(r['max_abs_diff'])} "
                f"| {('yes' if r['functional_ok'] else 'no') + ('*' if p['not_1to1'] else '')} "
                f"| {r['setup_s']:.2f} | {r['suggest_s']:.2f} |"
            )
    return "\n".join(lines)


def failures(pairs: Sequence[dict], n: int = _EXAMPLES) -> str:
    lines = []
    for p in pairs:
        for r in p.get("results", ()):
            if not r["wrong"] and not r["missed"]:
                continue
            lines.append(f"- {p['name']} / {r['strategy']}: {len(r['wrong'])} wrong, {len(r['missed'])} missed")
            for s, got, want in r["wrong"][:n]:
                lines.append(f"    - `{s}` -> `{got}` (truth: `{want}`)")
            for s, want in r["missed"][:n] if not r["wrong"] else ():
                lines.append(f"    - `{s}` unmapped (truth: `{want}`)")
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
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def _git_state() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "weight_mapper"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return rev + (" (weight_mapper/ has uncommitted changes)" if dirty else "")


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
        "Strategies (precision/recall/F1 over the 1:1 ground truth; `wrong` = predicted copies that differ from it;"
        " `max abs diff` = outputs of the source vs a fresh target loaded with the predicted mapping, `strict=False`):",
        "",
        results_table(report["pairs"]),
        "",
        "\\* pair with targets no 1:1 mapping can fill (see `not 1:1`): the benchmark fills those itself"
        " (concatenation) before loading the prediction, so the output check judges the 1:1 part.",
    ])


def _update_readme(text: str) -> None:
    readme = README.read_text()
    if _BEGIN not in readme or _END not in readme:
        raise SystemExit(f"{README} has no {_BEGIN} ... {_END} markers; add them where the table goes")
    head, rest = readme.split(_BEGIN, 1)
    _, tail = rest.split(_END, 1)
    README.write_text(f"{head}{_BEGIN}\n{text}\n{_END}{tail}")


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
