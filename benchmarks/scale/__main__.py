"""``python -m benchmarks.scale``: see :mod:`benchmarks.scale.run`."""

from benchmarks.scale.run import main

raise SystemExit(main())
