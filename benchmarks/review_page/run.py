"""How fast does the review page load in a real browser, at scale?

Builds a plan with the real matcher on a generated model (the scale benchmark's families),
writes its review page (:meth:`WeightMapper.export_review_page`), opens it in headless
Chromium and prints the file size, the page's load time (Navigation Timing: from the start of
navigation to the end of the load event, and to the table being drawn) and the time of a
search, a filter and a sort, measured in the page with ``performance.now()``.

    python -m benchmarks.review_page                      # 50,000 entries (transformer family)
    python -m benchmarks.review_page --entries 5000 --family cnn --screenshots docs/img

Needs a headless Chromium: ``benchmarks/review_page/fetch_chromium.sh`` fetches Debian's
``chromium-headless-shell`` with ``apt-get download`` and unpacks it without installing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.review_page.cdp import FETCH_HINT, Browser, find_chromium
from benchmarks.scale.families import cnn_stack, moe_stack, transformer_stack

FAMILIES = {"transformer": transformer_stack, "cnn": cnn_stack, "moe": moe_stack}
LOAD_BUDGET_MS = 2000.0


def build_page(n_entries: int, path: Path, *, family: str = "transformer") -> dict[str, Any]:
    """Match a generated model of about ``n_entries`` tensors and write its review page."""
    from weight_mapper import TensorTable, WeightMapper

    source, target, _ = FAMILIES[family](n_entries)
    start = time.perf_counter()
    mapper = WeightMapper(TensorTable.from_state_dict(source, natural_order=True, label=f"{family} source"),
                          TensorTable.from_state_dict(target, natural_order=True, label=f"{family} target"))
    mapper.suggest_mapping()
    match_s = time.perf_counter() - start
    start = time.perf_counter()
    mapper.export_review_page(path)
    plan = mapper.get_plan()
    return {"family": family, "entries": len(plan.entries), "rows": len(plan.entries) + len(plan.ambiguous)
            + len(plan.unmatched_source) + len(plan.unmatched_target), "match_s": match_s,
            "write_s": time.perf_counter() - start, "bytes": path.stat().st_size}


# Timings taken inside the page: Navigation Timing for the load, performance.now() around each verb.
_LOAD_JS = """(() => {
  const nav = performance.getEntriesByType("navigation")[0];
  return new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(() => done({
    load_event_ms: nav.loadEventEnd, dom_content_loaded_ms: nav.domContentLoadedEventEnd,
    script_ms: reviewPage.readyMs, first_frame_ms: performance.now(), rows: reviewPage.rows,
    rows_in_dom: reviewPage.visibleRows()}))));
})()"""
_VERBS_JS = """(() => {
  const t = (f) => { const s = performance.now(); const v = f(); return [performance.now() - s, v]; };
  const [search_ms, n_search] = t(() => reviewPage.search("layers.1"));
  reviewPage.search("");
  const [filter_ms, n_filter] = t(() => reviewPage.setStatus("flagged", false));
  reviewPage.setStatus("flagged", true);
  const [sort_ms] = t(() => reviewPage.sort("target"));
  reviewPage.sort("risk");
  const [select_ms] = t(() => reviewPage.select(reviewPage.order()[0]));
  return {search_ms, n_search, filter_ms, n_filter, sort_ms, select_ms, rows_in_dom: reviewPage.visibleRows()};
})()"""


def measure(browser: Browser, path: Path, *, repeats: int = 3) -> dict[str, Any]:
    """Open the page ``repeats`` times; the median of each figure, and the verbs' timings once."""
    loads = []
    for _ in range(repeats):
        wall = browser.open(path)
        loads.append({**browser.evaluate(_LOAD_JS), "wall_ms": wall * 1000})
    out = {key: statistics.median(load[key] for load in loads) for key in loads[0]}
    out.update({f"verbs_{k}": v for k, v in browser.evaluate(_VERBS_JS).items()})
    return out


def screenshots(browser: Browser, path: Path, folder: Path) -> list[Path]:
    """The table with a flagged entry's breakdown open, and both module trees partly open."""
    folder.mkdir(parents=True, exist_ok=True)
    browser.open(path)
    browser.evaluate("reviewPage.select(reviewPage.order()[2])")
    shots = [browser.screenshot(folder / "review_page_table.png")]
    browser.evaluate("""(() => { reviewPage.showTab("trees");
        for (const box of document.querySelectorAll(".treebox")) {
          const nodes = box.querySelectorAll(".node"); if (nodes[2]) nodes[2].click();
          const deeper = box.querySelectorAll(".node"); if (deeper[3]) deeper[3].click();
        } })()""")
    shots.append(browser.screenshot(folder / "review_page_trees.png"))
    return shots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.review_page", description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=50_000)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="transformer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--screenshots", type=Path, default=None, metavar="FOLDER")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args(argv)
    found = find_chromium()
    if found is None:
        print(f"no headless Chromium: {FETCH_HINT}")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "review.html"
        built = build_page(args.entries, path, family=args.family)
        print(f"{built['family']}: {built['entries']:,} entries, {built['rows']:,} rows; matched in "
              f"{built['match_s']:.1f} s, page written in {built['write_s']:.1f} s, "
              f"{built['bytes'] / 1e6:.2f} MB")
        with Browser(found, width=args.width, height=args.height) as browser:
            figures = measure(browser, path, repeats=args.repeats)
            for key, value in figures.items():
                print(f"  {key:24s} {value:,.1f}" if isinstance(value, float) else f"  {key:24s} {value:,}")
            load = max(figures["load_event_ms"], figures["first_frame_ms"])
            print(f"loaded and drawn in {load:,.0f} ms (median of {args.repeats}): "
                  f"{'within' if load < LOAD_BUDGET_MS else 'OVER'} the {LOAD_BUDGET_MS:,.0f} ms budget")
            if args.screenshots:
                for shot in screenshots(browser, path, args.screenshots):
                    print(f"screenshot {shot}")
    return 0
