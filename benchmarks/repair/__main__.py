"""``python -m benchmarks.repair``: see :mod:`benchmarks.repair.run`."""

from benchmarks.repair.run import main

raise SystemExit(main())
