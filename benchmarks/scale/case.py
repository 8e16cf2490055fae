"""Run ONE scale case in this process and print its record as JSON (the last stdout line).

    python -m benchmarks.scale.case family moe 100000 best_match
    python -m benchmarks.scale.case full deepseek_v3 best_match --profile 25

:mod:`benchmarks.scale.run` starts one fresh interpreter per case, so that the peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, read at the end) belongs to that case alone.
The clock starts when this module is first executed, before ``torch``, ``transformers`` and
``weight_mapper`` are imported, so a full-size case's ``total_s`` is end to end.
"""

from __future__ import annotations

import time

_T_START = time.perf_counter()

import argparse  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pstats  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from collections.abc import Mapping, Sequence  # noqa: E402
from typing import Any  # noqa: E402

__all__ = ["evaluate", "run_family", "run_full", "main"]

_WARMUP_SIZE = 100  # a tiny match first, so lazy imports and first-call costs stay out of the timing
_MAX_REPEATS = 3  # a family case is timed up to 3 times, the fastest run kept ...
_REPEAT_BUDGET_S = 5.0  # ... while the runs so far took less than this in all
_EXAMPLES = 5  # wrong / missed tensors kept per case


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _template(key: str) -> str:
    from benchmarks.scale.full_size import abstract_key

    return abstract_key(key)[0]


def evaluate(plan: Any, truth: Mapping[str, str], not_1to1: Mapping[str, Any] | None = None,
             transforms: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Score a plan against the ground truth.

    A 1:1 source is correct when its entry puts it onto its truth with the transform the truth
    asks for: ``transforms`` maps a source template (``layers.{}.attention.wq.weight``) to it
    (a rotary permutation), and a source it does not name must be copied untransformed. A
    not-1:1 target is *recovered* when one entry builds it with the truth's op from exactly
    the truth's sources in order (``stack``, or ``stack_concat`` along ``concat_dim=1``). Everything
    else a plan does with those sources is wrong.
    """
    not_1to1 = not_1to1 or {}
    correct, wrong = 0, []
    recovered, wrong_combined = 0, []
    not_1to1_sources = {s for n in not_1to1.values() for s in n.sources}
    copied_elsewhere = 0  # a not-1:1 source copied 1:1 somewhere
    mapped = set()
    for e in plan.entries:
        if e.level == "alias":
            continue
        if len(e.source) == 1:
            s = e.source[0]
            mapped.add(s)
            want = (transforms or {}).get(_template(s))
            if s in truth and e.target == truth[s] and (e.transform == want if want else e.transform in (None, "identity")):
                correct += 1
            elif s in truth:
                wrong.append([s, e.target, truth[s], e.transform])
            else:
                copied_elsewhere += s in not_1to1_sources
                wrong.append([s, e.target, None, e.transform])
            continue
        mapped.update(e.source)
        want = not_1to1.get(e.target)
        if (want is not None and want.op == e.transform and tuple(e.source) == want.sources
                and e.args.get("dim", 0) == 0 and e.args.get("concat_dim", 1) == 1):
            recovered += 1
        else:
            wrong_combined.append([list(e.source[:3]) + (["..."] if len(e.source) > 3 else []), e.target, e.transform])
    missed = [[s, t] for s, t in truth.items() if s not in mapped]
    return {
        "n_truth": len(truth),
        "correct": correct,
        "fraction_correct": correct / max(len(truth), 1),
        "n_wrong": len(wrong) + len(wrong_combined),
        "n_missed": len(missed),
        "all_1to1_correct": correct == len(truth),
        "n_not_1to1_targets": len(not_1to1),
        "n_not_1to1_sources": len(not_1to1_sources),
        "not_1to1_recovered": recovered,
        "not_1to1_copied_1to1": copied_elsewhere,
        "wrong_examples": (wrong + wrong_combined)[:_EXAMPLES],
        "missed_examples": missed[:_EXAMPLES],
    }


def _plan_scores(plan: Any) -> dict[str, float]:
    """Total score of the plan, and the same without the hierarchy context (``base``)."""
    weights = dict(plan.weights) if getattr(plan, "weights", None) else {"shape": 0.5, "name": 0.3, "hierarchy": 0.2}
    total = base = 0.0
    for e in plan.entries:
        total += e.score
        c = e.components
        if all(k in c and c[k] == c[k] for k in weights):
            base += sum(w * c[k] for k, w in weights.items())
        else:
            base = float("nan")
    return {"total_score": total, "base_score": base}


def _match(src: Any, tgt: Any, strategy: str) -> tuple[Any, float, float]:
    from weight_mapper import WeightMapper

    t0 = time.perf_counter()
    mapper = WeightMapper(src, tgt)
    t1 = time.perf_counter()
    mapper.suggest_mapping(strategy=strategy)
    return mapper, t1 - t0, time.perf_counter() - t1


def _cpu_s() -> float:
    """CPU seconds of this process (user + system): on a shared machine the wall time also
    counts the time other processes held the cores."""
    return time.process_time()


def _profiled(fn, top: int):
    """``(fn(), cProfile summary)``: the ``top`` functions by cumulative and by own time."""
    profiler = cProfile.Profile()
    result = profiler.runcall(fn)
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs()
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return result, out.getvalue()


def _assignment_facts(mapper: Any) -> dict[str, Any]:
    a = mapper._assignment
    return {"largest_bucket": list(a.largest_bucket), "rounds": list(a.rounds), "converged": bool(a.converged)}


def run_family(family: str, size: int, strategy: str, *, profile: int = 0) -> dict[str, Any]:
    """Generate one synthetic family at ``size`` tensors and time its matching."""
    from benchmarks.scale.families import FAMILIES, positional_baseline

    t0 = time.perf_counter()
    src, tgt, truth = FAMILIES[family](size)
    generate_s = time.perf_counter() - t0
    warm_src, warm_tgt, _ = FAMILIES[family](_WARMUP_SIZE)
    _match(warm_src, warm_tgt, strategy)
    rss_before = _peak_rss_mib()

    # The plan is evaluated from the first run, whose mapper is then released: the repeats (the
    # same deterministic plan) only time, so the peak RSS is one matching's however many run.
    runs, profile_text, cpu, facts = [], None, [], None
    while not runs or (len(runs) < _MAX_REPEATS and sum(r[0] + r[1] for r in runs) < _REPEAT_BUDGET_S and not profile):
        if profile:
            (mapper, setup_s, suggest_s), profile_text = _profiled(lambda: _match(src, tgt, strategy), profile)
        else:
            c0 = _cpu_s()
            mapper, setup_s, suggest_s = _match(src, tgt, strategy)
            cpu.append(_cpu_s() - c0)
        runs.append((setup_s, suggest_s))
        if facts is None:
            plan = mapper.get_plan()
            facts = {
                **_plan_scores(plan), **_assignment_facts(mapper), **evaluate(plan, truth),
                "fraction_positional": positional_baseline(src, tgt, truth),
                "n_order_only": sum("order_only" in e.flags for e in plan.entries),
            }
            del plan
        del mapper
    setup_s, suggest_s = min(runs, key=lambda r: r[0] + r[1])
    record = {
        "kind": "family", "case": family, "size": size, "strategy": strategy,
        "n_source": len(src), "n_target": len(tgt),
        "generate_s": generate_s, "setup_s": setup_s, "suggest_s": suggest_s, "match_s": setup_s + suggest_s,
        "match_runs_s": [r[0] + r[1] for r in runs],
        "match_cpu_s": min(cpu) if cpu else None, "load_average_1min": os.getloadavg()[0],
        **facts,
        "rss_before_mib": rss_before,
    }
    del runs
    record["peak_rss_mib"] = _peak_rss_mib()
    if profile_text:
        record["profile"] = profile_text
    return record


def run_full(name: str, strategy: str, *, profile: int = 0) -> dict[str, Any]:
    """Build a full-size meta model and its reference-named source, map, check."""
    t0 = time.perf_counter()
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import weight_mapper  # noqa: F401
    from benchmarks.scale.full_size import CASES, build_case

    t_import = time.perf_counter()
    case = CASES[name]
    model = case.build_target()
    t_build = time.perf_counter()
    built = build_case(case, model=model)
    t_source = time.perf_counter()
    rss_before = _peak_rss_mib()
    if profile:
        (mapper, setup_s, suggest_s), profile_text = _profiled(lambda: _match(built.source, built.target, strategy), profile)
    else:
        (mapper, setup_s, suggest_s), profile_text = _match(built.source, built.target, strategy), None
    t_match = time.perf_counter()
    plan = mapper.get_plan()
    record = {
        "kind": "full", "case": name, "description": case.description, "strategy": strategy,
        "n_source": len(built.source), "n_target": built.n_target,
        "target_is_module": not isinstance(built.target, dict),
        "import_s": t_import - t0 + (t0 - _T_START), "build_s": t_build - t_import, "source_s": t_source - t_build,
        "setup_s": setup_s, "suggest_s": suggest_s, "match_s": setup_s + suggest_s,
        "total_s": t_match - _T_START,  # end to end: interpreter up to a finished plan
        "time_target_s": case.time_target_s,
        **_plan_scores(plan), **_assignment_facts(mapper), **evaluate(plan, built.truth, built.not_1to1, case.transforms),
        "not_1to1": _summarise_not_1to1(built.not_1to1),
        "rss_before_mib": rss_before,
        "peak_rss_mib": _peak_rss_mib(),
    }
    if profile_text:
        record["profile"] = profile_text
    return record


def _summarise_not_1to1(not_1to1: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The not-1:1 targets by template: ``{target, op, count, sources per target}``."""
    from benchmarks.scale.full_size import abstract_key

    out: dict[tuple[str, str], dict[str, Any]] = {}
    for target, n in not_1to1.items():
        template = abstract_key(target)[0]
        row = out.setdefault((template, n.op), {"target": template, "op": n.op, "count": 0,
                                                "sources_each": len(n.sources),
                                                "source_templates": sorted({abstract_key(s)[0] for s in n.sources})})
        row["count"] += 1
    return list(out.values())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale.case", description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["family", "full"])
    parser.add_argument("name", help="family (cnn, transformer, moe, ambiguous, anonymous) or full-size case (deepseek_v3, ...)")
    parser.add_argument("rest", nargs="+", help="family: SIZE STRATEGY; full: STRATEGY")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="profile the matching with cProfile and keep the top N functions")
    args = parser.parse_args(argv)
    if args.kind == "family":
        size, strategy = args.rest
        record = run_family(args.name, int(size), strategy, profile=args.profile)
    else:
        (strategy,) = args.rest
        record = run_full(args.name, strategy, profile=args.profile)
    if record.get("profile"):
        print(record["profile"], file=sys.stderr)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
