"""What every benchmark records about the run: the CPU and the git state of the matcher."""

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
