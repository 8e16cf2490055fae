"""Conversion memory and throughput on a multi-GB sharded safetensors checkpoint (issue 16).

    python -m benchmarks.scale.convert                        # 8 shards of 288 MiB (2.4 GB), then deleted
    python -m benchmarks.scale.convert --shards 4 --shard-mib 64 --repeats 1   # a quick look

Generates a sharded safetensors checkpoint of random float32 data (a Llama-like layout, two
layers a shard, an index json) in a temporary folder, then runs, each in a fresh interpreter:

- **plain copy**: ``safetensors.torch.load_file`` + ``save_file`` of every shard, each output
  file fsynced (the durability our atomic writer gives), nothing renamed;
- **weight_mapper**: ``WeightRenamer(folder).rename_keys(plan).save(out)`` with a plan that
  renames every tensor (``layers.N.x`` -> ``model.layers.N.x``), writing a sharded folder.

Before each run the source files are dropped from the page cache (``posix_fadvise
DONTNEED``), so both read from disk. The parent samples the child's ``/proc/PID/status`` every
5 ms (``VmRSS``, ``RssAnon``, ``RssFile``) and reads its ``ru_maxrss`` from ``wait4``; the
child times its own work (imports excluded). The checkpoint is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["generate", "measure", "main"]

REPO_ROOT = Path(__file__).resolve().parents[2]
_MIB = 2**20
_DIM = 2048  # every matrix [_DIM, _DIM] float32 = 16 MiB
_MATRICES = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
             "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "feed_forward.w4", "feed_forward.w5")
_SAMPLE_S = 0.005
TARGET_EXTRA_MIB, TARGET_RATIO = 0.6 * 1024, 0.8  # done when: peak <= 2 shards + 0.6 GiB; >= 80 % of the plain copy


# ---------------------------------------------------------------------------- the checkpoint
def generate(folder: Path, *, shards: int, shard_mib: int, seed: int = 0) -> dict[str, Any]:
    """Write ``shards`` safetensors shards of about ``shard_mib`` MiB of random data, plus an index."""
    import safetensors.torch
    import torch

    gen = torch.Generator().manual_seed(seed)
    per_layer = len(_MATRICES) * _DIM * _DIM * 4
    if shard_mib * _MIB >= per_layer:
        dim, layers_per_shard = _DIM, round(shard_mib * _MIB / per_layer)
    else:  # small shards: one layer of smaller matrices
        dim, layers_per_shard = max(64, int((shard_mib * _MIB / (len(_MATRICES) * 4)) ** 0.5)), 1
    weight_map, total = {}, 0
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for j in range(layers_per_shard):
            layer = s * layers_per_shard + j
            for m in _MATRICES:
                tensors[f"layers.{layer}.{m}.weight"] = torch.randn(dim, dim, generator=gen)
            tensors[f"layers.{layer}.attention_norm.weight"] = torch.randn(dim, generator=gen)
            tensors[f"layers.{layer}.ffn_norm.weight"] = torch.randn(dim, generator=gen)
        safetensors.torch.save_file(tensors, str(folder / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    files = sorted(folder.glob("*.safetensors"))
    return {"n_shards": shards, "n_tensors": len(weight_map), "tensor_bytes": total,
            "file_bytes": sum(p.stat().st_size for p in files),
            "largest_shard_bytes": max(p.stat().st_size for p in files)}


def _drop_cache(paths) -> None:
    """Flush and drop files from the page cache, so the next read comes from disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------- the child
def _rss_kib() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0])
    return out


def _child_plain(src: Path, out: Path) -> None:
    import safetensors.torch

    out.mkdir()
    for shard in sorted(src.glob("*.safetensors")):
        tensors = safetensors.torch.load_file(str(shard))
        safetensors.torch.save_file(tensors, str(out / shard.name), metadata={"format": "pt"})
        del tensors
        fd = os.open(out / shard.name, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    shutil.copy(src / "model.safetensors.index.json", out)


def _child_convert(src: Path, out: Path) -> None:
    from weight_mapper import WeightRenamer
    from weight_mapper.plan import MappingPlan, PlanEntry

    renamer = WeightRenamer(src)
    shapes = renamer.tensors.shapes()
    plan = MappingPlan(tuple(PlanEntry((n,), f"model.{n}", None, 1.0, 1.0, "tensor", s, s) for n, s in shapes.items()))
    renamer.rename_keys(plan)
    renamer.save(out)


def _child(mode: str, src: Path, out: Path) -> None:
    import safetensors.torch  # noqa: F401  (imports outside the timing)
    import torch  # noqa: F401

    import weight_mapper  # noqa: F401

    before = _rss_kib()
    t0 = time.perf_counter()
    (_child_plain if mode == "plain" else _child_convert)(src, out)
    work_s = time.perf_counter() - t0
    print(json.dumps({"work_s": work_s, "rss_before_kib": before}))


# ---------------------------------------------------------------------------- the parent
def _sample(pid: int, peaks: dict[str, int], stop: threading.Event) -> None:
    path = f"/proc/{pid}/status"
    while not stop.is_set():
        try:
            text = Path(path).read_text()
        except OSError:
            return
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                peaks[key] = max(peaks.get(key, 0), int(value.split()[0]))
        stop.wait(_SAMPLE_S)


def measure(mode: str, src: Path, out: Path) -> dict[str, Any]:
    """Run one child (``plain`` or ``convert``) from a cold page cache; time and memory."""
    _drop_cache(sorted(src.glob("*.safetensors")))
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.scale.convert", "--child", mode, str(src), str(out)],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks: dict[str, int] = {}
    stop = threading.Event()
    sampler = threading.Thread(target=_sample, args=(proc.pid, peaks, stop), daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    stop.set()
    sampler.join()
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed (exit {proc.returncode}):\n{stderr[-2000:]}")
    record = json.loads(stdout.strip().splitlines()[-1])
    written = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    shutil.rmtree(out)
    return {"mode": mode, "work_s": record["work_s"], "written_bytes": written,
            "peak_rss_mib": usage.ru_maxrss / 1024, "peak_sampled_rss_mib": peaks.get("VmRSS", 0) / 1024,
            "peak_anon_mib": peaks.get("RssAnon", 0) / 1024, "peak_file_mib": peaks.get("RssFile", 0) / 1024,
            "rss_before_mib": record["rss_before_kib"]["VmRSS"] / 1024,
            "anon_before_mib": record["rss_before_kib"]["RssAnon"] / 1024}


def run(*, shards: int, shard_mib: int, repeats: int, workdir: Path | None) -> dict[str, Any]:
    """Generate the checkpoint, time both ways ``repeats`` times (alternating), delete it."""
    tmp = Path(tempfile.mkdtemp(prefix="wm-convert-bench-", dir=workdir))
    try:
        src = tmp / "source"
        src.mkdir()
        t0 = time.perf_counter()
        info = generate(src, shards=shards, shard_mib=shard_mib)
        info["generate_s"] = time.perf_counter() - t0
        runs = []
        for i in range(repeats):
            for mode in ("plain", "convert"):
                r = measure(mode, src, tmp / f"out-{mode}-{i}")
                r["gb_per_s"] = info["file_bytes"] / r["work_s"] / 1e9
                runs.append(r)
                print(f"[{mode} {i + 1}/{repeats}] {r['work_s']:.2f} s, {r['gb_per_s']:.2f} GB/s, peak RSS "
                      f"{r['peak_rss_mib']:.0f} MiB (anon {r['peak_anon_mib']:.0f}, file {r['peak_file_mib']:.0f})",
                      file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summarise(info, runs)


def summarise(info: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Best time of each mode, worst peaks, the ratio and the two targets."""
    best = {m: min((r for r in runs if r["mode"] == m), key=lambda r: r["work_s"]) for m in ("plain", "convert")}
    worst_rss = {m: max(r["peak_rss_mib"] for r in runs if r["mode"] == m) for m in ("plain", "convert")}
    worst_anon = {m: max(r["peak_anon_mib"] for r in runs if r["mode"] == m) for m in ("plain", "convert")}
    shard_mib = info["largest_shard_bytes"] / _MIB
    limit = 2 * shard_mib + TARGET_EXTRA_MIB
    ratio = best["convert"]["gb_per_s"] / best["plain"]["gb_per_s"]
    return {"checkpoint": info, "runs": runs, "best": best, "worst_peak_rss_mib": worst_rss,
            "worst_peak_anon_mib": worst_anon, "rss_limit_mib": limit, "ratio": ratio,
            "rss_met": worst_rss["convert"] <= limit, "ratio_met": ratio >= TARGET_RATIO}


def render(s: dict[str, Any]) -> str:
    info, best = s["checkpoint"], s["best"]
    rows = ["| run | s (best) | GB/s | peak RSS MiB | peak anonymous MiB | peak file-backed MiB | RSS before MiB |",
            "|---|---|---|---|---|---|---|"]
    for mode, label in (("plain", "plain copy (load_file + save_file + fsync)"),
                        ("convert", "weight_mapper (WeightRenamer.rename_keys(plan).save(folder))")):
        b = best[mode]
        rows.append(f"| {label} | {b['work_s']:.2f} | {b['gb_per_s']:.2f} | {s['worst_peak_rss_mib'][mode]:,.0f} "
                    f"| {s['worst_peak_anon_mib'][mode]:,.0f} | {b['peak_file_mib']:,.0f} | {b['rss_before_mib']:,.0f} |")
    mark = {True: "met", False: "**MISSED**"}
    return "\n".join([
        f"Checkpoint: {info['n_shards']} shards, {info['n_tensors']} float32 tensors, {info['file_bytes'] / 1e9:.2f} GB "
        f"({info['file_bytes'] / 2**30:.2f} GiB), largest shard {info['largest_shard_bytes'] / _MIB:.0f} MiB; "
        f"generated in {info['generate_s']:.0f} s, deleted after the run. {len(s['runs']) // 2} run(s) of each, "
        "alternating, each from a cold page cache; best time, highest peaks.",
        "", *rows, "",
        f"- peak RSS of the conversion {s['worst_peak_rss_mib']['convert']:,.0f} MiB <= two shards + 0.6 GiB "
        f"= {s['rss_limit_mib']:,.0f} MiB: {mark[s['rss_met']]}",
        f"- throughput {best['convert']['gb_per_s']:.2f} GB/s = {s['ratio']:.0%} of the plain copy's "
        f"{best['plain']['gb_per_s']:.2f} GB/s (>= {TARGET_RATIO:.0%}: {mark[s['ratio_met']]})",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale.convert", description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--shard-mib", type=int, default=288)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="where to generate the checkpoint (default: $TMPDIR)")
    parser.add_argument("--json", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "convert.json")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "SRC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        mode, src, out = args.child
        _child(mode, Path(src), Path(out))
        return 0
    summary = run(shards=args.shards, shard_mib=args.shard_mib, repeats=args.repeats, workdir=args.dir)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=1) + "\n")
    print(render(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
