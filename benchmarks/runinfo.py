"""What every benchmark shares: the CPU and git state it records, and how it pastes its table."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's model name and core count, e.g. ``"AMD EPYC, 2 cores"``."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def git_state() -> str:
    """The short commit, marked when ``weight_mapper/`` has uncommitted changes."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "weight_mapper"], cwd=REPO_ROOT,
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return rev + (" (weight_mapper/ has uncommitted changes)" if dirty else "")


def replace_between(path: Path, begin: str, end: str, text: str) -> None:
    """Replace what lies between the ``begin`` and ``end`` markers of ``path`` with ``text``."""
    readme = path.read_text()
    if begin not in readme or end not in readme:
        raise SystemExit(f"{path} has no {begin} ... {end} markers; add them where the table goes")
    head, rest = readme.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{text}\n{end}{tail}")
