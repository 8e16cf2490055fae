"""The quick, fixed-seed profile of our fuzz suite (the long one: ``python -m benchmarks.fuzz``).

Every case damages a well-formed input the way :mod:`benchmarks.fuzz.cases` knows how
(truncation, byte flips, header edits, pickle edits, code-running payloads, hostile names,
index files, plan JSON edits), runs one entry point on it in this process, and checks that
it ended in acceptance or our own error, left no output behind, changed no input and ran no
code. Hypothesis draws the cases; CI derandomises it (tests/conftest.py), so every run
explores the same ones.
"""

from __future__ import annotations

import json
import random
import resource
import signal
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.fuzz.cases import build_seeds, make_case, write_case
from benchmarks.fuzz.harness import judge, run_case, snapshot
from weight_mapper import MappingPlan, apply_plan
from weight_mapper.errors import PlanError

_FUZZ = settings(max_examples=40, derandomize=True, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
_CHECKPOINT_MUTATIONS = ["bytes", "header", "pickle", "payload", "structure", "names", "index", "fifo"]


@pytest.fixture(scope="module")
def seed_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seeds")
    return folder, build_seeds(folder)


@contextmanager
def _bounded(seconds: int, extra_bytes: int = 2 * 2**30):
    """A hang (a FIFO opened) or a memory blow-up (a name 50,000 levels deep) fails the test
    (TimeoutError, MemoryError) instead of stalling CI or waking the OOM killer."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"case still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    limit = mapped + extra_bytes if hard == resource.RLIM_INFINITY else min(mapped + extra_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.signal(signal.SIGALRM, previous)


def _run(seed_dir, tmp_path_factory, seed: int, entry: str, mutation: str):
    folder_seeds, seeds = seed_dir
    rng = random.Random(seed)
    work = tmp_path_factory.mktemp("case")
    marker = work / "marker"
    folder = work / "files"
    folder.mkdir()
    case = make_case(rng, seeds, entry=entry, mutation=mutation, marker=str(marker))
    write_case(case, folder)
    before = snapshot(folder)
    with _bounded(60):
        result = run_case(case, folder, folder_seeds)
    where = f"{case.entry} on {case.mutation}: {case.detail}"
    assert result["outcome"] in ("accepted", "ours"), f"{where}: {result['error']} at {result['place']}"
    assert judge(before, folder, result["outcome"], marker) == [], where
    return case, result


@_FUZZ
@given(seed=st.integers(0, 2**32 - 1), entry=st.sampled_from(["loader", "cli_inspect", "renamer"]),
       mutation=st.sampled_from(_CHECKPOINT_MUTATIONS))
def test_damaged_checkpoints_get_our_error(seed_dir, tmp_path_factory, seed, entry, mutation):
    _run(seed_dir, tmp_path_factory, seed, entry, mutation)


@_FUZZ
@given(seed=st.integers(0, 2**32 - 1), entry=st.sampled_from(["from_json", "cli_apply"]))
def test_damaged_plans_get_our_error(seed_dir, tmp_path_factory, seed, entry):
    _run(seed_dir, tmp_path_factory, seed, entry, "plan")


@settings(_FUZZ, max_examples=12)
@given(seed=st.integers(0, 2**32 - 1), entry=st.sampled_from(["cli_map", "from_checkpoint"]),
       mutation=st.sampled_from(["header", "names", "structure", "index"]))
def test_mapping_damaged_checkpoints_gets_our_error(seed_dir, tmp_path_factory, seed, entry, mutation):
    _run(seed_dir, tmp_path_factory, seed, entry, mutation)


@pytest.mark.parametrize("placement", range(12))
def test_code_running_pickles_stay_refused(seed_dir, tmp_path_factory, placement):
    # payload cases cover six functions in six placements; each runs the loader and the CLI
    case, result = _run(seed_dir, tmp_path_factory, placement, "loader" if placement % 2 else "cli_inspect",
                        "payload")
    assert result["outcome"] == "ours", case.detail
    assert "arbitrary code" in result["error"] or "could not be read" in result["error"], result["error"]


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                     max_leaves=8)


@_FUZZ
@given(entry=st.integers(0, 4), field=st.sampled_from(["source", "target", "transform", "score", "margin", "level",
                                                        "source_shape", "target_shape", "components", "args",
                                                        "flags", "provenance"]),
       arg=st.sampled_from([None, "dim", "sizes", "parts", "concat_dim", "shape", "source_shapes"]), value=_JSON)
def test_any_plan_field_replaced_gets_a_plan_error(seed_dir, entry, field, arg, value):
    _, seeds = seed_dir
    data = json.loads(seeds["combo_plan.json"])
    target = data["entries"][entry]
    if arg is not None and field == "args":
        target["args"][arg] = value
    else:
        target[field] = value
    try:
        plan = MappingPlan.from_json(json.dumps(data))
    except PlanError:
        return
    from safetensors.torch import load_file

    tensors = load_file(seed_dir[0] / "combo.safetensors")
    try:
        plan.inverse()
        apply_plan(plan, tensors)
    except PlanError:
        pass
