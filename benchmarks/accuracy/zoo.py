"""The zoo: real pairs whose ground truth the libraries' maintainers wrote, run as code.

    python -m benchmarks.accuracy.zoo                                  # every pair, every way
    python -m benchmarks.accuracy.zoo --pairs hf_mixtral tv_fcn_r50 --ways sorted
    python -m benchmarks.accuracy.zoo --update-readme                  # also rewrite the zoo table in benchmarks/README.md

For each pair of :mod:`benchmarks.accuracy.zoo_pairs`:

1. the ground truth: fill every source tensor with globally unique values
   (:func:`benchmarks.accuracy.tracer.tracer_state_dict`), run the maintainers' converter on it,
   read from each output element where it came from (:func:`~benchmarks.accuracy.tracer.read_truth`);
2. for each *way* of giving the source to the mapper (``model``: both models; ``state_dict``: the
   source's state dict in definition order and the target model; ``sorted``: the source saved
   as a safetensors file, whose header is sorted by name, via ``WeightMapper.from_checkpoint``;
   ``source_model``: the same file plus ``source_model=`` the source architecture), suggest a plan
   with ``best_match`` and with the positional baseline ``shape_only``, convert the *tracer*
   state dict through it with ``WeightRenamer(...).rename_keys(plan)`` (real transforms) and
   compare every converted tensor with the converter's by ``torch.equal``.

A crash in the mapper is recorded as a row (exception type, message, innermost
``weight_mapper`` frame) and the zoo goes on.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.accuracy.run import _interpreter, _machine, _versions
from benchmarks.accuracy.tracer import Origin, aliases, read_truth, tracer_state_dict
from benchmarks.accuracy.zoo_pairs import ZOO, ZooCase, ZooPair
from benchmarks.runinfo import REPO_ROOT, git_state, replace_between

__all__ = ["WAYS", "main", "run_zoo_pair", "score_way"]

WAYS = ("model", "state_dict", "sorted", "source_model")
STRATEGY, BASELINE = "best_match", "shape_only"
DEFAULT_JSON = REPO_ROOT / "benchmarks" / "results" / "zoo.json"
README = REPO_ROOT / "benchmarks" / "README.md"
_BEGIN, _END = "<!-- zoo-table:begin -->", "<!-- zoo-table:end -->"


def _missing(pair: ZooPair) -> list[str]:
    out = []
    for mod in pair.requires:
        try:
            __import__(mod)
        except Exception:  # noqa: BLE001 - any import failure means "not available"
            out.append(mod)
    return out


def _crash(exc: BaseException) -> dict[str, str]:
    """Exception type, first line, and the innermost frame in weight_mapper/ (else the innermost)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "weight_mapper" in f.filename and "benchmarks" not in f.filename]
    where = (ours or frames or [None])[-1]
    loc = "" if where is None else f"{Path(where.filename).name}:{where.lineno} ({where.name})"
    if where is not None and "weight_mapper" in where.filename:
        loc = f"weight_mapper/{Path(where.filename).name}:{where.lineno} ({where.name})"
    return {"type": type(exc).__name__, "message": str(exc).splitlines()[0][:300] if str(exc) else "",
            "where": loc}


# ---------------------------------------------------------------------------- ground truth
def _order_like_target(source_keys: list[str], truth: Mapping[str, Origin], target_keys: list[str]) -> list[str]:
    """Source keys in the order of the first target each one fills (a model's definition order, rebuilt)."""
    first: dict[str, int] = {}
    for i, t in enumerate(target_keys):
        for s in truth[t].sources:
            first.setdefault(s, i)
    big = len(target_keys)
    return sorted(source_keys, key=lambda s: first.get(s, big))


def ground_truth(case: ZooCase) -> dict[str, Any]:
    """Run the converter on tracer values; check its output fits the target; read the truth."""
    tracer = tracer_state_dict(case.source_sd)
    converted = dict(case.convert(tracer))
    target_sd = case.target.state_dict()
    target_keys = list(target_sd)
    extra = [k for k in converted if k not in target_sd]
    bad_shape = [k for k in converted if k in target_sd and tuple(converted[k].shape) != tuple(target_sd[k].shape)]
    truth = read_truth(tracer, converted, target_keys)
    return {"tracer": tracer, "converted": converted, "truth": truth, "target_keys": target_keys,
            "extra": extra, "bad_shape": bad_shape}


# ---------------------------------------------------------------------------- scoring
def score_way(plan: Any, truth: Mapping[str, Origin], converted: Mapping[str, torch.Tensor],
              tracer: Mapping[str, torch.Tensor], tied: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Score one plan: key F1, exact tensors, wrong entries flagged or not, missed targets, false alarms.

    ``converted`` is the maintainers' output on ``tracer``; the plan is applied to ``tracer`` with
    :class:`weight_mapper.WeightRenamer` and each target tensor compared by ``torch.equal``.
    ``tied`` (``{key: first key}`` of tied source tensors) makes tied keys one key for the F1.
    """
    tied = tied or {}

    def keys(sources) -> set[str]:
        return {tied.get(k, k) for k in sources}

    from weight_mapper import WeightRenamer

    filled = {t for t, o in truth.items() if o.kind != "target_only"}
    ours = WeightRenamer(tracer).rename_keys(plan)
    entries = {e.target: e for e in plan.entries}
    key_right = 0
    exact = 0
    wrong: list[dict[str, Any]] = []
    false_alarms = 0
    for t, e in entries.items():
        origin = truth.get(t)
        if origin is not None and t in filled and keys(e.source) == keys(origin.sources):
            key_right += 1
        equal, error = False, None
        if t in filled:
            try:
                mine = ours[t]
                theirs = converted[t]
                equal = tuple(mine.shape) == tuple(theirs.shape) and torch.equal(mine.to(theirs.dtype), theirs)
            except Exception as exc:  # noqa: BLE001 - a transform that fails is a wrong entry
                error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        if equal:
            exact += 1
            false_alarms += e.flagged
        else:
            wrong.append({"target": t, "source": list(e.source), "transform": e.transform, "flagged": e.flagged,
                          "flags": list(e.flags), "margin": round(float(e.margin), 4), "score": round(float(e.score), 4),
                          "truth": None if origin is None else origin.to_list(), "error": error})
    missed = sorted(filled - set(entries))
    n_pred, n_truth = len(entries), len(filled)
    precision = key_right / n_pred if n_pred else 0.0
    recall = key_right / n_truth if n_truth else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision, "recall": recall, "f1": f1, "n_predicted": n_pred, "n_truth": n_truth,
        "exact": exact, "wrong": len(wrong), "unflagged_wrong": sum(not w["flagged"] for w in wrong),
        "flagged_wrong": sum(w["flagged"] for w in wrong), "missed": len(missed), "false_alarms": false_alarms,
        "n_flagged": sum(e.flagged for e in entries.values()),
        "wrong_entries": wrong, "missed_targets": [[t, truth[t].to_list()] for t in missed],
    }


# ---------------------------------------------------------------------------- one pair
def _mapper(way: str, case: ZooCase, source_sd: dict[str, torch.Tensor], sorted_file: Path):
    from weight_mapper import WeightMapper

    if way == "model":
        return WeightMapper(case.source_model, case.target)
    if way == "state_dict":
        return WeightMapper(source_sd, case.target)
    if way == "sorted":
        return WeightMapper.from_checkpoint(sorted_file, case.target)
    if way == "source_model":
        return WeightMapper.from_checkpoint(sorted_file, case.target, source_model=case.source_model)
    raise ValueError(way)


def run_zoo_pair(pair: ZooPair, ways: Sequence[str], *, seed: int = 0, strategy: str = STRATEGY) -> dict[str, Any]:
    """Build the pair, read its ground truth, and score every way (crashes become rows)."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    record: dict[str, Any] = {"name": pair.name, "family": pair.family, "source": pair.source,
                              "target": pair.target, "truth_from": pair.truth, "ways": []}
    try:
        case = pair.build()
        gt = ground_truth(case)
    except Exception as exc:  # noqa: BLE001 - a pair that cannot be built is reported, not fatal
        record["error"] = _crash(exc)
        record["traceback"] = traceback.format_exc(limit=-6)
        record["total_s"] = time.perf_counter() - t0
        return record
    truth: dict[str, Origin] = gt["truth"]
    tied = aliases(case.source_sd)
    kinds: dict[str, int] = {}
    for o in truth.values():
        kinds[o.kind] = kinds.get(o.kind, 0) + 1
    ordered = case.source_model is None  # no model: rebuild its definition order from where tensors land
    source_keys = list(case.source_sd)
    if ordered:
        source_keys = _order_like_target(source_keys, truth, gt["target_keys"])
    source_sd = {k: case.source_sd[k] for k in source_keys}
    record.update({
        "n_source": len(source_sd), "n_target": len(gt["target_keys"]),
        "n_filled": sum(o.kind != "target_only" for o in truth.values()), "truth_kinds": kinds,
        "n_same_name": sum(o.sources == (t,) for t, o in truth.items()),
        "converter_extra_keys": gt["extra"][:20], "n_converter_extra": len(gt["extra"]),
        "converter_bad_shapes": gt["bad_shape"][:20], "tied_source_keys": tied,
        "source_order": "rebuilt from the target" if ordered else "source model's",
        "truth": {t: o.to_list() for t, o in truth.items()}, "errata": list(case.errata),
        "build_s": time.perf_counter() - t0,
    })
    with tempfile.TemporaryDirectory(prefix="zoo_") as tmp:
        sorted_file = Path(tmp) / "source.safetensors"
        save_file({k: source_sd[k].detach().clone().contiguous() for k in sorted(source_sd)}, str(sorted_file))
        for way in ways:
            row: dict[str, Any] = {"way": way}
            record["ways"].append(row)
            if way in ("model", "source_model") and case.source_model is None:
                row["skipped"] = "no source architecture at hand"
                continue
            start = time.perf_counter()
            try:
                mapper = _mapper(way, case, source_sd, sorted_file)
            except Exception as exc:  # noqa: BLE001
                row["crash"] = _crash(exc)
                row["traceback"] = traceback.format_exc(limit=-6)
                row["s"] = time.perf_counter() - start
                continue
            setup_s = time.perf_counter() - start
            for label, name in (("ours", strategy), ("baseline", BASELINE)):
                start = time.perf_counter()
                try:
                    mapper.suggest_mapping(strategy=name)
                    plan = mapper.get_plan()
                    suggest_s = time.perf_counter() - start
                    row[label] = score_way(plan, truth, gt["converted"], gt["tracer"], tied)
                    row[label]["s"] = setup_s + suggest_s
                except Exception as exc:  # noqa: BLE001
                    row[label] = {"crash": _crash(exc), "traceback": traceback.format_exc(limit=-6),
                                  "s": setup_s + time.perf_counter() - start}
            del mapper
            gc.collect()
    record["total_s"] = time.perf_counter() - t0
    return record


# ---------------------------------------------------------------------------- output
def _cell(r: dict | None, key: str) -> str:
    if r is None:
        return "-"
    if "crash" in r:
        return "crash"
    return str(r[key])


def _fmt_result(r: dict | None) -> tuple[str, str, str, str, str, str, str]:
    """F1, exact, unflagged wrong, flagged wrong, missed, false alarms, crash."""
    if r is None:
        return ("-",) * 7
    if "crash" in r:
        c = r["crash"]
        return ("-", "-", "-", "-", "-", "-", f"{c['type']} at {c['where']}")
    return (f"{r['f1']:.3f}", f"{r['exact']}/{r['n_truth']}", str(r["unflagged_wrong"]), str(r["flagged_wrong"]),
            str(r["missed"]), str(r["false_alarms"]), "")


def pairs_table(records: Sequence[dict]) -> str:
    lines = [("| pair | source -> target | ground truth (run as code) | tensors src/tgt | filled by the source "
              "| of which same name | how (tracer) |"),
             "|---|---|---|---|---|---|---|"]
    for p in records:
        if "skipped" in p:
            lines.append(f"| {p['name']} | skipped: {p['skipped']} | | | | | |")
            continue
        if "error" in p:
            e = p["error"]
            lines.append(f"| {p['name']} | {p['source']} -> {p['target']} | {p['truth_from']} "
                         f"| error building: {e['type']}: {e['message'][:100]} | | | |")
            continue
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(p["truth_kinds"].items(), key=lambda kv: -kv[1]))
        check = ""
        if p["n_converter_extra"] or p["converter_bad_shapes"]:
            check = f" (converter output not in target: {p['n_converter_extra']} keys, {len(p['converter_bad_shapes'])} shapes)"
        lines.append(f"| {p['name']} | {p['source']} -> {p['target']} | `{p['truth_from']}` "
                     f"| {p['n_source']}/{p['n_target']} | {p['n_filled']}{check} | {p.get('n_same_name', '?')} | {kinds} |")
    return "\n".join(lines)


def errata(records: Sequence[dict]) -> list[str]:
    """Converters the zoo corrects, with the evidence measured in this run (lines, or none)."""
    lines = [f"- `{p['name']}`: {e}" for p in records for e in p.get("errata", ())]
    return ["Errata (where a converter is wrong and the zoo's truth corrects it):", "", *lines, ""] if lines else []


def results_table(records: Sequence[dict]) -> str:
    lines = [("| pair | way | F1 | exact | unflagged wrong | flagged wrong | missed | false alarms | crash | s "
             "| baseline F1 | baseline exact | baseline wrong (unflagged) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in records:
        for row in p.get("ways", ()):
            if "skipped" in row:
                continue
            if "crash" in row:
                c = row["crash"]
                lines.append(f"| {p['name']} | {row['way']} | - | - | - | - | - | - | {c['type']} at {c['where']} (setup) "
                             f"| {row['s']:.1f} | - | - | - |")
                continue
            ours, base = row.get("ours"), row.get("baseline")
            f1, exact, uw, fw, missed, fa, crash = _fmt_result(ours)
            bf1, bexact, buw, *_ = _fmt_result(base)
            if base is not None and "crash" in base:
                bf1 = f"crash: {base['crash']['type']}"
            elif base is not None:
                buw = f"{base['wrong']} ({base['unflagged_wrong']})"
            lines.append(f"| {p['name']} | {row['way']} | {f1} | {exact} | {uw} | {fw} | {missed} | {fa} | {crash} "
                         f"| {ours['s']:.1f} | {bf1} | {bexact} | {buw} |")
    return "\n".join(lines)


def summary(records: Sequence[dict]) -> str:
    """Totals per way: pairs all exact, entries wrong unflagged, crashes."""
    lines = [("| way | pairs run | all exact | unflagged wrong (pairs with any) | flagged wrong | missed | false alarms "
             "| crashes | baseline: all exact | baseline: wrong (unflagged) |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for way in WAYS:
        rows = [r for p in records for r in p.get("ways", ()) if r["way"] == way and "skipped" not in r]
        if not rows:
            continue
        ok = [r["ours"] for r in rows if "ours" in r and "crash" not in r["ours"]]
        bok = [r["baseline"] for r in rows if "baseline" in r and "crash" not in r["baseline"]]
        crashes = len(rows) - len(ok)
        lines.append(
            f"| {way} | {len(rows)} | {sum(o['exact'] == o['n_truth'] and not o['wrong'] for o in ok)} "
            f"| {sum(o['unflagged_wrong'] for o in ok)} ({sum(o['unflagged_wrong'] > 0 for o in ok)}) "
            f"| {sum(o['flagged_wrong'] for o in ok)} | {sum(o['missed'] for o in ok)} "
            f"| {sum(o['false_alarms'] for o in ok)} | {crashes} "
            f"| {sum(o['exact'] == o['n_truth'] and not o['wrong'] for o in bok)} "
            f"| {sum(o['wrong'] for o in bok)} ({sum(o['unflagged_wrong'] for o in bok)}) |")
    return "\n".join(lines)


def failures(records: Sequence[dict], n: int = 3) -> str:
    out = []
    for p in records:
        if "error" in p:
            out.append(f"- {p['name']}: pair failed to build: {p['error']['type']}: {p['error']['message']}")
        for row in p.get("ways", ()):
            for label in ("ours",):
                r = row.get(label) if "crash" not in row else {"crash": row["crash"]}
                if not r:
                    continue
                if "crash" in r:
                    c = r["crash"]
                    out.append(f"- {p['name']} / {row['way']}: CRASH {c['type']} at {c['where']}: {c['message'][:200]}")
                    continue
                bad = [w for w in r["wrong_entries"] if not w["flagged"]]
                if bad:
                    out.append(f"- {p['name']} / {row['way']}: {len(bad)} unflagged wrong, e.g.")
                    for w in bad[:n]:
                        truth = w["truth"]
                        want = "target-only (leave unfilled)" if truth is None or truth[1] == "target_only" else \
                            f"{', '.join(truth[0][:3])}{' ...' if len(truth[0]) > 3 else ''} [{truth[1]}]"
                        out.append(f"    - `{w['target']}` <- {', '.join(w['source'][:3])}"
                                   f"{' ...' if len(w['source']) > 3 else ''} [{w['transform'] or 'copy'}] "
                                   f"(margin {w['margin']}; truth: {want}){' ' + w['error'] if w['error'] else ''}")
    return "\n".join(out) or "(none)"


_COUNTS = ("exact", "unflagged_wrong", "flagged_wrong", "missed", "false_alarms")


def _counts(report: dict) -> dict[tuple[str, str], str]:
    out = {}
    for p in report["pairs"]:
        for row in p.get("ways", ()):
            if "skipped" in row:
                continue
            r = {"crash": row["crash"]} if "crash" in row else row.get("ours", {})
            if "crash" in r:
                out[(p["name"], row["way"])] = f"crash {r['crash']['type']} at {r['crash']['where']}"
            else:
                out[(p["name"], row["way"])] = ", ".join(f"{k} {r[k]}" for k in _COUNTS)
    return out


def compare(old: dict, new: dict) -> str:
    """Every (pair, way) of ``new`` whose counts (or crash) differ from ``old``'s, one line each."""
    a, b = _counts(old), _counts(new)
    lines = []
    for key in sorted(b):
        if a.get(key) != b.get(key):
            lines.append(f"- {key[0]} / {key[1]}: {a.get(key, 'not run')} -> {b.get(key, 'not run')}")
    return "\n".join(lines) or "(no change)"


def render(report: dict) -> str:
    m = report["meta"]
    strategy = m.get("strategy", STRATEGY)
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    return "\n".join([
        f"Measured on commit {m['git']} ({m['date']}; {m['machine']}; {versions}); {m['total_s']:.0f} s in all"
        + (f", peak RSS {m['peak_rss_mib']:.0f} MiB." if "peak_rss_mib" in m else "."),
        f"Command: `{m['command']}`",
        "",
        "Pairs and their ground truth (read from the converter's output on tracer values):",
        "",
        pairs_table(report["pairs"]),
        "",
        *errata(report["pairs"]),
        f"Totals per way (`{strategy}`; baseline `{BASELINE}`):",
        "",
        summary(report["pairs"]),
        "",
        f"Per pair and way (`{strategy}`; baseline `{BASELINE}`, the positional matcher):",
        "",
        results_table(report["pairs"]),
    ])


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _zoo_versions() -> dict[str, str]:
    out = _versions()
    try:
        import importlib.metadata as md

        out["torchtune"] = md.version("torchtune")
    except Exception:  # noqa: BLE001
        out["torchtune"] = "not installed"
    return out


def main(argv: Sequence[str] | None = None) -> int:
    names = [p.name for p in ZOO]
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy.zoo", description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", choices=names, default=names, metavar="NAME",
                        help=f"pairs to run (default all): {', '.join(names)}")
    parser.add_argument("--ways", default=",".join(WAYS),
                        help=f"comma-separated subset of {','.join(WAYS)} (default all)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON,
                        help=f"where to write results (default {DEFAULT_JSON.relative_to(REPO_ROOT)})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategy", default=STRATEGY, choices=("best_match", "greedy", "conservative"),
                        help=f"the strategy scored (default {STRATEGY}); the baseline is always {BASELINE}")
    parser.add_argument("--compare", type=Path, metavar="OLD_JSON",
                        help="also print every (pair, way) whose counts differ from a saved run")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine more threads make it far slower)")
    parser.add_argument("--update-readme", action="store_true", help="rewrite the zoo table in benchmarks/README.md")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="print (and with --update-readme paste) the tables of a saved run instead of running")
    args = parser.parse_args(argv)
    if args.render is not None:
        report = json.loads(args.render.read_text())
        text = render(report)
        print(text)
        if args.compare is not None:
            print("\nChanges against " + str(args.compare) + ":\n" + compare(json.loads(args.compare.read_text()), report))
        if args.update_readme:
            replace_between(README, _BEGIN, _END, text)
            print(f"updated {README}")
        return 0
    for path in (args.compare, args.render):
        if path is not None and not path.is_file():
            parser.error(f"{path}: no such file (a JSON written by --json)")
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    unknown = [w for w in ways if w not in WAYS]
    if unknown:
        parser.error(f"unknown way(s) {unknown}; choose from {','.join(WAYS)}")

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    records = []
    for pair in (p for p in ZOO if p.name in args.pairs):
        missing = _missing(pair)
        if missing:
            print(f"[{pair.name}] skipped: {', '.join(missing)} not importable", file=sys.stderr)
            records.append({"name": pair.name, "skipped": f"{', '.join(missing)} not importable"})
            continue
        print(f"[{pair.name}] running ...", file=sys.stderr, flush=True)
        records.append(run_zoo_pair(pair, ways, seed=args.seed, strategy=args.strategy))
        records[-1]["peak_rss_mib"] = _peak_rss_mib()
        print(f"[{pair.name}] done in {records[-1]['total_s']:.1f} s (peak RSS so far {records[-1]['peak_rss_mib']:.0f} MiB)",
              file=sys.stderr, flush=True)
        gc.collect()

    argv_shown = " ".join(sys.argv[1:]) if argv is None else " ".join(argv)
    report = {
        "meta": {
            "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "machine": _machine(), "versions": _zoo_versions(), "git": git_state(),
            "command": f"{_interpreter()} -m benchmarks.accuracy.zoo {argv_shown}".strip(),
            "ways": ways, "strategy": args.strategy, "baseline": BASELINE, "seed": args.seed,
            "total_s": time.perf_counter() - start, "peak_rss_mib": _peak_rss_mib(),
        },
        "pairs": records,
    }
    text = render(report)
    print(text)
    print("\nCrashes and unflagged wrong entries (first few per pair and way):\n" + failures(records))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"\nwrote {args.json}")
    if args.compare is not None:
        print("\nChanges against " + str(args.compare) + ":\n" + compare(json.loads(args.compare.read_text()), report))
    if args.update_readme:
        replace_between(README, _BEGIN, _END, text)
        print(f"updated {README}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
