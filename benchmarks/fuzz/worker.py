"""A fuzz worker: runs the cases the runner sends it, one at a time, under a memory limit.

Protocol (stdin/stdout, binary): the runner sends a 4-byte length and a pickled
``(case, folder)``; the worker answers one JSON line with :func:`~benchmarks.fuzz.harness.run_case`'s
result. The runner kills the worker on a timeout or when its RSS passes the limit, and starts
another.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import struct
import sys
from pathlib import Path


def _vm_size() -> int:
    for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    seed_dir = Path(sys.argv[1])
    headroom = int(float(sys.argv[2]) * 2**30) if len(sys.argv) > 2 else 2 * 2**30
    import torch  # noqa: F401 - imported before the limit is set: its own mappings are not the case's

    import weight_mapper.cli  # noqa: F401
    from benchmarks.fuzz.harness import run_case

    # Address space beyond what is mapped now: a blow-up becomes MemoryError, not the OOM killer.
    limit = _vm_size() + headroom
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # stray prints must not corrupt the protocol
    stdout.write(b"ready\n")  # imports done: a case's time starts now
    stdout.flush()
    while True:
        head = stdin.read(4)
        if len(head) < 4:
            return
        case, folder = pickle.loads(stdin.read(struct.unpack("<I", head)[0]))
        result = run_case(case, Path(folder), seed_dir)
        stdout.write(json.dumps(result).encode() + b"\n")
        stdout.flush()


if __name__ == "__main__":
    main()
