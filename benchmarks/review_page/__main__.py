"""``python -m benchmarks.review_page``: see :mod:`benchmarks.review_page.run`."""

from benchmarks.review_page.run import main

raise SystemExit(main())
