"""The long fuzz profile: ``python -m benchmarks.fuzz --cases 5000 [--seed 0] [--kills 20]``.

Draws ``--cases`` structure-aware cases (:mod:`benchmarks.fuzz.cases`) from ``--seed``, runs
each in a worker process (:mod:`benchmarks.fuzz.worker`) under an address-space limit, a
timeout and an RSS watch, judges the case folder afterwards (:mod:`benchmarks.fuzz.harness`),
then SIGKILLs ``--kills`` CLI ``apply`` runs mid-write and checks the next run cleans up.
Prints a table of runs per entry point and outcome, the distinct foreign exceptions, and
writes every result to ``benchmarks/results/fuzz-<seed>.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

from benchmarks.fuzz.cases import ENTRY_POINTS, build_seeds, make_case, write_case
from benchmarks.fuzz.harness import judge, snapshot
from benchmarks.runinfo import REPO_ROOT, cpu_model, git_state

OUTCOMES = ("accepted", "ours", "foreign", "memory", "time", "output left", "source changed", "code executed")
_HEADERS = ("accepted", "our error", "foreign exception", "memory", "time", "output left", "source changed",
            "code executed")


class _Worker:
    """One worker process; restarted after a kill and every ``recycle`` cases."""

    def __init__(self, seed_dir: Path, headroom_gib: float):
        self.args = [sys.executable, "-m", "benchmarks.fuzz.worker", str(seed_dir), str(headroom_gib)]
        self.proc: subprocess.Popen | None = None
        self.n_cases = 0

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO_ROOT,
                                     stderr=subprocess.DEVNULL)
        self.n_cases = 0
        # Importing torch on a loaded machine can take a while: it is not part of any case's time.
        ready, _, _ = select.select([self.proc.stdout], [], [], 600)
        if not ready or self.proc.stdout.readline() != b"ready\n":
            raise RuntimeError("the fuzz worker did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def rss(self) -> int:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except (OSError, AttributeError):
            pass
        return 0

    def run(self, case, folder: Path, *, timeout: float, rss_limit: int, recycle: int) -> tuple[dict, int]:
        """Send one case; return (result, peak RSS seen while it ran)."""
        if self.proc is None or self.n_cases >= recycle:
            self.stop()
            self.start()
        self.n_cases += 1
        data = pickle.dumps((case, str(folder)))
        self.proc.stdin.write(struct.pack("<I", len(data)) + data)
        self.proc.stdin.flush()
        start, peak = time.monotonic(), 0
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.02)
            peak = max(peak, self.rss())
            if ready:
                line = self.proc.stdout.readline()
                if not line:  # the worker died (a crash in C code, the OOM killer)
                    self.stop()
                    return {"outcome": "foreign", "error": "worker process died", "place": ""}, peak
                return json.loads(line), peak
            if peak > rss_limit:
                self.stop()
                return {"outcome": "memory", "error": f"RSS above {rss_limit / 2**30:.1f} GiB", "place": ""}, peak
            if time.monotonic() - start > timeout:
                self.stop()
                return {"outcome": "time", "error": f"no answer in {timeout:.0f} s", "place": ""}, peak


def _kill_runs(n: int, seed: int, work: Path) -> dict[str, int]:
    """SIGKILL ``apply`` mid-write ``n`` times; count partial outputs and temporaries a next run leaves."""
    import torch
    from safetensors.torch import save_file

    folder = work / "kills"
    folder.mkdir()
    gen = torch.Generator().manual_seed(seed)
    big = {f"layers.{i}.weight": torch.randn(1024, 2048, generator=gen) for i in range(12)}  # ~100 MB
    save_file(big, folder / "big.safetensors")
    plan = {"format": "weight_mapper.plan", "version": 1, "entries": [
        {"source": [n], "target": "m." + n, "transform": None, "source_shape": [1024, 2048],
         "target_shape": [1024, 2048]} for n in big]}
    (folder / "plan.json").write_text(json.dumps(plan))
    rng = random.Random(seed)
    counts = Counter()
    cmd = [sys.executable, "-m", "weight_mapper", "apply", "big.safetensors", "plan.json", "-o", "out.safetensors"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}  # the weight_mapper under test, whatever is installed
    inputs = {"big.safetensors", "plan.json"}

    def leftovers() -> int:
        return sum(p.name not in inputs and p.name != "out.safetensors" for p in folder.iterdir())

    for _ in range(n):
        (folder / "out.safetensors").unlink(missing_ok=True)
        proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # wait until the temporary output exists, then kill at a random moment of the write
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if leftovers():
                time.sleep(rng.uniform(0, 0.3))
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        counts["kills"] += 1
        out = folder / "out.safetensors"
        if out.exists():
            counts["output complete" if out.stat().st_size == (folder / "big.safetensors").stat().st_size
                   else "output partial"] += 1
        if leftovers():
            counts["temporary left by the kill"] += 1
    # the next run in the folder finishes and removes what the killed ones left
    (folder / "out.safetensors").unlink(missing_ok=True)
    subprocess.run(cmd, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    counts["temporaries left after the next run"] = leftovers()
    return dict(counts)


def _payload_liveness(n: int, seed: int, seeds: dict, work: Path) -> tuple[int, int]:
    """How many of ``n`` payload cases run their code under plain ``torch.load(weights_only=False)``.

    The payloads must be live for their refusal to mean anything. Each is loaded in a child
    process (the code only touches a marker file in the work folder).
    """
    executed = 0
    for i in range(n):
        rng = random.Random(f"liveness-{seed}-{i}")
        folder, marker = work / f"live{i}", work / f"live{i}.marker"
        folder.mkdir()
        case = make_case(rng, seeds, entry="loader", mutation="payload", marker=str(marker))
        write_case(case, folder)
        files = [str(folder / rel) for rel in case.files if rel.endswith((".pt", ".ckpt", ".bin"))]
        code = ("import sys, torch\nfor p in sys.argv[1:]:\n    try: torch.load(p, weights_only=False)\n"
                "    except Exception: pass")
        subprocess.run([sys.executable, "-c", code, *files], cwd=folder, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=120)
        executed += marker.exists()
    return executed, n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLed apply runs (0: none)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a case counts as a hang")
    parser.add_argument("--rss-limit-gib", type=float, default=1.0, help="peak RSS that counts as a blow-up")
    parser.add_argument("--recycle", type=int, default=200, help="cases per worker process")
    parser.add_argument("--entry", choices=ENTRY_POINTS, default=None, help="only this entry point")
    parser.add_argument("--mutation", default=None, help="only this mutation family")
    parser.add_argument("--keep", action="store_true", help="keep the case folders of failing cases")
    parser.add_argument("--liveness", type=int, default=0,
                        help="also load N payload cases with weights_only=False, to show they do run code")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="weight_mapper_fuzz_"))
    results_dir = REPO_ROOT / "benchmarks" / "results"
    results_dir.mkdir(exist_ok=True)
    log = (results_dir / f"fuzz-{args.seed}.jsonl").open("w")
    seeds = build_seeds(work / "seeds")
    worker = _Worker(work / "seeds", headroom_gib=2.0)
    table: dict[str, Counter] = defaultdict(Counter)
    foreign: dict[tuple[str, str], list[str]] = defaultdict(list)
    peak_rss, started = 0, time.monotonic()
    try:
        for i in range(args.cases):
            rng = random.Random(f"{args.seed}-{i}")
            folder = work / f"case{i}"
            folder.mkdir()
            marker = work / f"marker{i}"
            case = make_case(rng, seeds, entry=args.entry, mutation=args.mutation, marker=str(marker))
            write_case(case, folder)
            before = snapshot(folder)
            result, peak = worker.run(case, folder, timeout=args.timeout, rss_limit=int(args.rss_limit_gib * 2**30),
                                      recycle=args.recycle)
            peak_rss = max(peak_rss, peak)
            problems = judge(before, folder, result["outcome"], marker)
            table[case.entry]["runs"] += 1
            table[case.entry][result["outcome"]] += 1
            for p in problems:
                table[case.entry][p] += 1
            if result["outcome"] == "foreign":
                foreign[(result["error"].split(":")[0], result["place"])].append(f"{case.mutation}: {case.detail}")
            log.write(json.dumps({"i": i, "entry": case.entry, "mutation": case.mutation, "detail": case.detail,
                                  **result, "problems": problems, "peak_rss": peak}) + "\n")
            bad = result["outcome"] not in ("accepted", "ours") or problems
            if not (bad and args.keep):
                shutil.rmtree(folder, ignore_errors=True)
            marker.unlink(missing_ok=True)
            if (i + 1) % 250 == 0:
                print(f"  {i + 1}/{args.cases} cases, {time.monotonic() - started:.0f} s", file=sys.stderr)
    finally:
        worker.stop()
        log.close()
    kills = _kill_runs(args.kills, args.seed, work) if args.kills else {}
    liveness = _payload_liveness(args.liveness, args.seed, seeds, work) if args.liveness else None
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - started
    print(f"## Fuzz: {args.cases} cases, seed {args.seed} ({git_state()}, {cpu_model()}, {elapsed:.0f} s)\n")
    print("| entry point | runs | " + " | ".join(_HEADERS) + " |")
    print("|---|" + "---:|" * (len(_HEADERS) + 1))
    total: Counter = Counter()
    for entry in ENTRY_POINTS:
        if table[entry]["runs"]:
            total.update(table[entry])
            print(f"| {entry} | {table[entry]['runs']} | " + " | ".join(str(table[entry][o]) for o in OUTCOMES) + " |")
    print(f"| **all** | {total['runs']} | " + " | ".join(str(total[o]) for o in OUTCOMES) + " |")
    print(f"\npeak worker RSS over all cases: {peak_rss / 2**20:.0f} MiB (limit {args.rss_limit_gib:.1f} GiB)")
    by_mutation = Counter()
    with (results_dir / f"fuzz-{args.seed}.jsonl").open() as f:
        for line in f:
            r = json.loads(line)
            by_mutation[(r["mutation"], r["outcome"])] += 1
    print("\n| mutation | " + " | ".join(OUTCOMES[:5]) + " |")
    print("|---|" + "---:|" * 5)
    for m in sorted({m for m, _ in by_mutation}):
        print(f"| {m} | " + " | ".join(str(by_mutation[(m, o)]) for o in OUTCOMES[:5]) + " |")
    if foreign:
        print(f"\n{len(foreign)} distinct foreign exceptions:")
        for (error, place), examples in sorted(foreign.items(), key=lambda kv: -len(kv[1])):
            print(f"- {error} at {place or '?'} ({len(examples)} runs), e.g. {examples[0][:150]}")
    if liveness:
        print(f"\npayload files (drawn like the payload cases) that run their code under plain "
              f"torch.load(weights_only=False): {liveness[0]} of {liveness[1]}")
    if kills:
        print("\nSIGKILL during `apply` (~100 MB output): " + ", ".join(f"{k}: {v}" for k, v in kills.items()))
    clean = (total["foreign"] + total["memory"] + total["time"] + total["output left"] + total["source changed"]
             + total["code executed"] == 0 and not kills.get("output partial")
             and not kills.get("temporaries left after the next run"))
    print(f"\n{'CLEAN' if clean else 'NOT CLEAN'}")
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
