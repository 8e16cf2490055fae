"""Run one fuzz case in this process and judge what it did.

:func:`run_case` calls one entry point on a case's files and says how it ended: ``accepted``
(no error), ``ours`` (a :class:`~weight_mapper.errors.WeightMapperError`, or exit code 1 with
our one-line message for the CLI) or ``foreign`` (anything else: a traceback a user would
see). :func:`judge` then compares the case folder with its snapshot from before the run:
an output left after a failure, a temporary file left at all, a changed input, or the marker
file a code-running payload writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import stat
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

from benchmarks.fuzz.cases import Case

__all__ = ["run_case", "snapshot", "judge", "OUTPUTS"]

#: Files an accepted run may create.
OUTPUTS = {"out.safetensors", "plan_out.json", "review.html", "rules.json"}
_TMP_MARK = "weight_mapper-tmp-"

_SEED_TENSORS: dict[str, Any] = {}


def _seed_tensors(seed_dir: Path, name: str) -> Any:
    """The unmutated tensors a plan case's plan belongs to (its apply step reads them)."""
    if name not in _SEED_TENSORS:
        from safetensors.torch import load_file

        _SEED_TENSORS[name] = load_file(seed_dir / name)
    return _SEED_TENSORS[name]


def _run_entry(case: Case, folder: Path, seed_dir: Path) -> tuple[str, str]:
    """Call the entry point; return ('accepted', '') or raise what it raised. CLI: ('ours', message) on exit 1."""
    from weight_mapper import MappingPlan, WeightMapper, WeightRenamer, apply_plan, load_checkpoint
    from weight_mapper.cli import main

    a = case.args
    path = folder / a["checkpoint"] if "checkpoint" in a else None
    if case.entry == "loader":
        ckpt = load_checkpoint(path)
        for name in ckpt.tensors:
            ckpt.tensors[name]  # reads the data (safetensors: from the file)
        return "accepted", ""
    if case.entry == "from_checkpoint":
        target = {n: tuple(t.shape) for n, t in _seed_tensors(seed_dir, "target.safetensors").items()}
        mapper = WeightMapper.from_checkpoint(path, target)
        mapper.suggest_mapping()
        mapper.get_plan().to_json()
        return "accepted", ""
    if case.entry == "renamer":
        renamer = WeightRenamer(path)
        renamer.rename_keys({n: "renamed." + n for n in renamer.tensors})
        renamer.save(folder / "out.safetensors")
        return "accepted", ""
    if case.entry == "from_json":
        plan = MappingPlan.from_json(folder / a["plan"])
        tensors = _seed_tensors(seed_dir, a["source"])
        converted = apply_plan(plan, tensors)
        apply_plan(plan.inverse(), converted)
        return "accepted", ""
    if case.entry == "cli_inspect":
        argv = ["inspect", str(path), *a.get("extra", [])]
    elif case.entry == "cli_map":
        extra = [str(folder / x) if x.endswith((".html", ".json")) else x for x in a.get("extra", [])]
        argv = ["map", str(path), str(folder / a["target"]), "-o", str(folder / "plan_out.json"), *extra]
    elif case.entry == "cli_apply":
        source = folder / a.get("source", a.get("checkpoint"))
        argv = ["apply", str(source), str(folder / a["plan"]), "-o", str(folder / "out.safetensors")]
    else:
        raise ValueError(case.entry)
    code, err = _run_cli(main, argv)
    if code == 0:
        return "accepted", ""
    errors = [line for line in err.splitlines() if line.startswith("weight-mapper: error:")]
    if code == 1 and errors:  # our one-line message (after any warnings)
        return "ours", errors[0][:300]
    raise _ForeignExit(f"exit {code}: {err[-300:]}")


class _ForeignExit(Exception):
    """The CLI ended with an exit code or message that is not ours."""


def _run_cli(main: Any, argv: list[str]) -> tuple[int, str]:
    """``main(argv)`` with stdout and stderr strict UTF-8 (as a terminal is), captured."""
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        code = main(argv)
    finally:
        sys.stdout, sys.stderr = old
    err.flush()
    return code, err.buffer.getvalue().decode("utf-8", "replace")


def run_case(case: Case, folder: Path, seed_dir: Path) -> dict[str, Any]:
    """Run ``case`` on the files in ``folder``; return ``{"outcome", "error", "place"}``."""
    from weight_mapper.errors import WeightMapperError

    with warnings.catch_warnings(record=True) as caught, contextlib.chdir(folder):
        warnings.simplefilter("always")
        try:
            (outcome, error), place = _run_entry(case, folder, seed_dir), ""
        except WeightMapperError as e:
            outcome, error, place = "ours", f"{type(e).__name__}: {str(e)[:300]}", ""
        except MemoryError:
            outcome, error, place = "memory", "MemoryError", _place(sys.exc_info()[2])
        except BaseException as e:  # noqa: BLE001 - a foreign exception is what this looks for
            if isinstance(e, (KeyboardInterrupt, SystemExit)) and not isinstance(e, SystemExit):
                raise
            outcome, error, place = "foreign", f"{type(e).__name__}: {str(e)[:300]}", _place(e.__traceback__)
    return {"outcome": outcome, "error": error, "place": place,
            "warned": sorted({str(w.message)[:120] for w in caught})[:3]}


def _place(tb: Any) -> str:
    """Where an exception left weight_mapper: the last frame in our package (else the last)."""
    frames = traceback.extract_tb(tb)
    ours = [f for f in frames if "/weight_mapper/" in f.filename]
    frame = (ours or frames or [None])[-1]
    return "" if frame is None else f"{Path(frame.filename).name}:{frame.lineno}"


def snapshot(folder: Path) -> dict[str, str]:
    """``relative path -> digest`` of every entry under ``folder`` (symlinks and FIFOs not followed)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in [*dirs, *files]:
            path = Path(root) / name
            mode = path.lstat().st_mode
            rel = str(path.relative_to(folder))
            if stat.S_ISREG(mode):
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(mode):
                out[rel] = "link:" + os.readlink(path)
            elif stat.S_ISDIR(mode):
                out[rel] = "dir"
            else:
                out[rel] = "special"
    return out


def judge(before: dict[str, str], folder: Path, outcome: str, marker: Path) -> list[str]:
    """What went wrong besides the outcome: 'output left', 'source changed', 'code executed'."""
    after = snapshot(folder)
    problems = []
    if any(before.get(k) != v for k, v in after.items() if k in before) or set(before) - set(after):
        problems.append("source changed")
    created = set(after) - set(before)
    allowed = OUTPUTS if outcome == "accepted" else set()
    if any(_TMP_MARK in k or k not in allowed for k in created):
        problems.append("output left")
    if marker.exists():
        problems.append("code executed")
    return problems
