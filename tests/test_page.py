"""The review page of ``weight_mapper.page``: its data, its file, and the page in a real browser.

The browser tests drive headless Chromium over the DevTools protocol
(``benchmarks/review_page/cdp.py``); they are skipped where no Chromium is found (fetch one with
``benchmarks/review_page/fetch_chromium.sh``: ``apt-get download`` + ``dpkg -x``, no install).
"""

import json
import re
import time

import pytest

from benchmarks.review_page.cdp import FETCH_HINT, Browser, find_chromium
from fixture_models import BatchNormed, BatchNormedRenamed, OldModel, PartiallyCompatible
from weight_mapper import CheckpointError, MappingError, MappingPlan, PlanEntry, TensorTable, WeightMapper
from weight_mapper.page import PAGE_STATUSES, breakdown_candidates, export_review_page, review_data

_CHROMIUM = find_chromium()
needs_browser = pytest.mark.skipif(_CHROMIUM is None, reason=f"no headless Chromium: {FETCH_HINT}")


def _entry(target: str, *, source: str | None = None, score: float = 0.9, margin: float = 0.5, flags=(),
           provenance: str = "matched", level: str = "tensor") -> PlanEntry:
    return PlanEntry((source or f"old.{target}",), target, None, score, margin, level, (4,), (4,),
                     {"shape": 1.0, "name": 0.5, "hierarchy": 0.8, "context": float("nan")},
                     flags=tuple(flags), provenance=provenance)


def review_plan() -> MappingPlan:
    """One entry of each kind a reviewer meets, in target order."""
    return MappingPlan(
        entries=(
            _entry("a.proved", margin=0.001, provenance="proved"),
            _entry("a.sure", margin=0.4),
            _entry("a.close", margin=0.001),
            _entry("a.repaired", margin=0.3, provenance="repaired"),
            _entry("a.order", margin=0.2, flags=("order_only",)),
            PlanEntry(("q.w", "k.w", "v.w"), "qkv.w", "concat", 0.8, 0.3, "combined", (4, 4), (12, 4),
                      args={"dim": 0, "sizes": [4, 4, 4], "source_shapes": [[4, 4]] * 3}),
        ),
        ambiguous=(_entry("a.withheld", margin=-0.002),),
        unmatched_source=("old.extra",),
        unmatched_target=("a.new",),
        weights={"shape": 0.5, "name": 0.3, "hierarchy": 0.2},
        source_label="old.pt", target_label="New",
    )


def _names(side: dict) -> list[str]:
    """Tensor names of a side of :func:`review_data`, rebuilt as the page does."""
    nodes, paths = side["nodes"], [""]
    for i in range(1, len(nodes["parent"])):
        parent = paths[nodes["parent"][i]]
        paths.append(f"{parent}.{nodes['name'][i]}" if parent else nodes["name"][i])
    t = side["tensors"]
    return [f"{paths[n]}.{side['leaves'][leaf]}" if paths[n] else side["leaves"][leaf] for n, leaf in zip(t["node"], t["leaf"])]


# ------------------------------------------------------------------------------------ data


def test_rows_carry_every_entry_withheld_and_unmatched_tensor_with_its_status():
    data = review_data(review_plan())
    rows, src, tgt = data["rows"], _names(data["source"]), _names(data["target"])
    targets = [tgt[t] if t >= 0 else None for t in rows["tgt"]]
    assert targets == ["a.proved", "a.sure", "a.close", "a.repaired", "a.order", "qkv.w", "a.withheld", None, "a.new"]
    statuses = [PAGE_STATUSES[s] for s in rows["status"]]
    assert statuses == ["proved", "unproved", "flagged", "repaired", "flagged", "unproved", "flagged", "unmatched",
                        "unmatched"]
    assert src[rows["src"][7]] == "old.extra" and rows["src"][8] == -1
    assert [src[i] for i in data["sources"][5]] == ["q.w", "k.w", "v.w"]
    assert data["withheld"] == [6]
    assert data["meta"]["flags"] == ["order_only"] and data["flags"] == {4: [0]}
    assert data["meta"]["flag_descriptions"]["order_only"].startswith("decided by order alone")
    assert rows["score"][0] == 900 and rows["margin"][2] == 1 and rows["components"][:4] == [1000, 500, 800, None]


def test_the_page_reads_the_score_components_off_the_registry():
    """Components, sub-scores, labels and share tables travel from score.SCORE_COMPONENTS, so that
    the page's breakdown rescales the shares as score.py does (the ``ordinal`` name sub-score too)."""
    from weight_mapper.score import KEY2COMPONENT, REPORTED_COMPONENTS, SUB_SCORE_LABELS, SUB_SCORES

    meta = review_data(review_plan())["meta"]
    assert meta["components"] == list(REPORTED_COMPONENTS) and meta["base_components"] == list(REPORTED_COMPONENTS[:-1])
    assert meta["sub_scores"] == list(SUB_SCORES) and "ordinal" in meta["sub_scores"]
    assert meta["sub_labels"] == SUB_SCORE_LABELS and meta["component_short_labels"]["hierarchy"] == "hier."
    assert set(meta["shares"]) == {"name", "hierarchy"}
    for component, tables in meta["shares"].items():
        for present in ({"depth", "order"}, {"depth", "sibling", "order", "exec"}, set(SUB_SCORES) - {"ordinal"}):
            # the page's rule: the first table whose sub-score is present (None: always)
            table = next(t for when, t in tables if when is None or when in present)
            shares = {k: w for k, w in table.items() if k in present}
            total = sum(shares.values())
            expected = KEY2COMPONENT[component].rescaled_shares(present)
            assert {k: w / total for k, w in shares.items()} == pytest.approx(expected)


def test_risk_rank_puts_flagged_then_unmatched_then_repaired_unproved_proved():
    data = review_data(review_plan())
    by_rank = sorted(range(len(data["rows"]["risk"])), key=data["rows"]["risk"].__getitem__)
    tgt = _names(data["target"])
    names = [tgt[data["rows"]["tgt"][r]] if data["rows"]["tgt"][r] >= 0 else "-" for r in by_rank]
    # flagged by margin (withheld -0.002, close 0.001, order 0.2); unmatched; repaired; unproved by margin; proved
    assert names == ["a.withheld", "a.close", "a.order", "-", "a.new", "a.repaired", "qkv.w", "a.sure", "a.proved"]


def test_sides_from_the_tables_know_types_buffers_and_unmatched_shapes():
    mapper = WeightMapper(OldModel(), PartiallyCompatible())
    plan = mapper.get_plan()
    data = review_data(plan, source_table=mapper.source_table, target_table=mapper.target_table)
    target = data["target"]
    names = _names(target)
    assert names == list(mapper.target_table.names)  # every tensor, in definition order
    extra = names.index("extra.weight")
    assert target["shapes"][target["tensors"]["shape"][extra]] == "3,10"
    assert "Linear" in target["types"]
    bn = review_data(WeightMapper(BatchNormed(), BatchNormedRenamed()).get_plan())
    assert bn["source"]["tensors"]["buffers"] == []  # from the plan alone: no module knowledge
    mapper = WeightMapper(BatchNormed(), BatchNormedRenamed())
    data = review_data(mapper.get_plan(), source_table=mapper.source_table)
    buffers = {_names(data["source"])[i] for i in data["source"]["tensors"]["buffers"]}
    assert buffers == {f"bn{k}.{leaf}" for k in (1, 2) for leaf in ("running_mean", "running_var", "num_batches_tracked")}


def test_breakdowns_go_to_the_riskiest_first_and_match_explain():
    mapper = WeightMapper(BatchNormed(), BatchNormedRenamed())
    plan = mapper.get_plan()
    names = breakdown_candidates(plan, limit=3)
    assert len(names) == 3
    risky = sorted(plan.entries, key=lambda e: (e.margin, e.score))
    assert names[0] == risky[0].source[0]
    explanation = mapper.explain(names[0])
    data = review_data(plan, explanations={names[0]: explanation})
    (row, breakdown), = data["breakdowns"].items()
    assert _names(data["source"])[data["rows"]["src"][row]] == names[0]
    level, candidate, target_label, sub, alternatives = breakdown
    assert (level, candidate, target_label) == (explanation["level"], explanation["candidate"],
                                                explanation["target_label"])
    assert sub[data["meta"]["sub_scores"].index("edit")] == round(explanation["sub_scores"]["edit"] * 1000)
    assert [a[0] for a in alternatives] == [a["label"] for a in explanation["alternatives"]]
    assert alternatives[0][1] == round(explanation["alternatives"][0]["score"] * 1000)


def test_export_writes_one_self_contained_page(tmp_path):
    plan = review_plan()
    plan = MappingPlan(plan.entries + (_entry("evil</script><script>alert(1)</script>"),), source_label="<b>old</b>")
    path = export_review_page(plan, tmp_path / "review.html")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert "<title>weight_mapper review: &lt;b&gt;old&lt;/b&gt; -&gt; target</title>" in text
    for external in ("<link", " src=", "href=", "http://", "https://", "@import", "url("):
        assert external not in text
    assert text.count("</script>") == 2  # the data block and the page's script: no name can close them
    payload = re.search(r'<script type="application/json" id="wm-data">(.*?)</script>', text, re.S).group(1)
    data = json.loads(payload)
    assert "evil</script><script>alert(1)</script>" in _names(data["target"])


def test_export_is_atomic_and_never_overwrites_a_protected_file(tmp_path):
    plan_file = tmp_path / "plan.json"
    plan_file.write_text("{}")
    with pytest.raises(CheckpointError, match="plan.json"):
        export_review_page(review_plan(), plan_file, protected=[plan_file])
    assert plan_file.read_text() == "{}"
    with pytest.raises(CheckpointError, match="does not exist"):
        export_review_page(review_plan(), tmp_path / "missing" / "review.html")


def test_mapper_page_embeds_the_explained_tensors_and_names_a_wrong_one(tmp_path):
    mapper = WeightMapper(BatchNormed(), BatchNormedRenamed())
    path = mapper.export_review_page(tmp_path / "review.html", explain=["fc.bias"], max_breakdowns=0)
    data = json.loads(re.search(r'id="wm-data">(.*?)</script>', path.read_text(encoding="utf-8"), re.S).group(1))
    assert data["meta"]["n_breakdowns"] == 1
    (row,) = data["breakdowns"]
    assert _names(data["source"])[data["rows"]["src"][int(row)]] == "fc.bias"
    with pytest.raises(MappingError, match="'fc.nope' is not a source tensor"):
        mapper.export_review_page(tmp_path / "other.html", explain=["fc.nope"])
    assert not (tmp_path / "other.html").exists()


# ------------------------------------------------------------------------------------ in a browser


def norms_and_strays() -> WeightMapper:
    """Two norms only their names tell apart (flagged), a sure match, and a stray tensor on each side."""
    source = TensorTable.from_state_dict(
        {"layers.0.in_norm.weight": (8,), "layers.0.post_norm.weight": (8,), "layers.0.attn.weight": (8, 16),
         "layers.0.extra.bias": (3,)}, natural_order=True, label="hf.safetensors")
    target = {"layers.0.sa_norm.weight": (8,), "layers.0.mlp_norm.weight": (8,), "layers.0.attention.weight": (8, 16),
              "head.weight": (5, 8)}
    mapper = WeightMapper(source, target)
    mapper.suggest_mapping()
    plan = mapper.get_plan()
    assert sum(e.flagged for e in plan.entries) == 2 and plan.unmatched_source and plan.unmatched_target
    return mapper


@pytest.fixture(scope="module")
def browser():
    with Browser(_CHROMIUM) as b:
        yield b


@needs_browser
def test_page_sorts_filters_searches_and_explains_in_a_browser(browser, tmp_path):
    mapper = norms_and_strays()
    path = mapper.export_review_page(tmp_path / "review.html")
    browser.open(path)
    page = "reviewPage"
    n = browser.evaluate(f"{page}.rows")
    plan = mapper.get_plan()
    assert n == len(plan.entries) + len(plan.ambiguous) + len(plan.unmatched_source) + len(plan.unmatched_target)
    rows = lambda: browser.evaluate(f"{page}.order().map((r) => {page}.row(r))")  # noqa: E731
    risk = rows()
    assert [r["risk"] for r in risk] == list(range(n))  # risk order by default
    statuses = [r["status"] for r in risk]
    assert statuses == sorted(statuses, key=PAGE_STATUSES.index)
    browser.evaluate(f"{page}.sort('score')")
    scores = [r["score"] for r in rows() if r["score"] is not None]
    assert scores == sorted(scores) and scores
    browser.evaluate(f"{page}.sort('margin', true)")
    margins = [r["margin"] for r in rows()]
    n_entries = len(plan.entries) + len(plan.ambiguous)
    assert margins[:n_entries] == sorted(margins[:n_entries], reverse=True)  # negative margins too
    assert margins[n_entries:] == [None] * (n - n_entries)  # the unmatched last, either way
    assert min(margins[:n_entries]) < 0
    browser.evaluate(f"{page}.sort('target')")
    targets = [r["target"] for r in rows() if r["target"]]
    assert targets == sorted(targets)
    # filters: the unmatched only
    for status in PAGE_STATUSES:
        browser.evaluate(f"{page}.setStatus('{status}', {'true' if status == 'unmatched' else 'false'})")
    assert {r["status"] for r in rows()} == {"unmatched"}
    assert len(rows()) == len(plan.unmatched_source) + len(plan.unmatched_target)
    for status in PAGE_STATUSES:
        browser.evaluate(f"{page}.setStatus('{status}', true)")
    # search by name substring, case-insensitive, on either side
    assert browser.evaluate(f"{page}.search('STEM.NORM')") == sum(
        "stem.norm" in e.target for e in (*plan.entries, *plan.ambiguous)) + sum(
        "stem.norm" in t for t in plan.unmatched_target)
    assert all("stem.norm" in r["target"] for r in rows())
    browser.evaluate(f"{page}.search('')")
    # a click on a row shows its breakdown: components, sub-scores, alternatives
    browser.evaluate(f"{page}.sort('risk')")
    browser.evaluate("document.querySelector('#spacer .row').click()")
    details = browser.evaluate("document.getElementById('details').innerText")
    first = rows()[0]
    assert first["breakdown"]
    name = first["target"] or first["source"]
    assert name in details and "component" in details and "token overlap" in details
    assert "Alternatives (best first)" in details or "Best candidates" in details
    # the trees: open, expand a module, click a tensor badge -> its row
    browser.evaluate(f"{page}.showTab('trees')")
    assert browser.evaluate("document.querySelectorAll('.treebox').length") == 2
    browser.evaluate("[...document.querySelectorAll('.treebox')[1].querySelectorAll('.node')]"
                     ".find((n) => n.querySelector('b').textContent === 'head').click()")
    badge = browser.evaluate("(() => { const b = document.querySelectorAll('.treebox')[1].querySelector('.tb');"
                             " b.click(); return [b.title, b.className]; })()")
    assert badge == ["head.weight", "tb off"]  # unmatched: struck through
    assert browser.evaluate("document.getElementById('entries').classList.contains('on')")
    assert [(r["target"], r["status"]) for r in rows()] == [("head.weight", "unmatched")]
    assert "no source fills" in browser.evaluate("document.getElementById('details').innerText")


@needs_browser
def test_page_of_50000_entries_loads_in_under_2_seconds(browser, tmp_path):
    """A real matcher run on a generated 50,000-tensor model; load timed by the browser itself."""
    from benchmarks.review_page.run import LOAD_BUDGET_MS, build_page, measure

    path = tmp_path / "review.html"
    built = build_page(50_000, path)
    assert built["rows"] >= 49_990
    start = time.perf_counter()
    figures = measure(browser, path, repeats=1)
    print(f"\nreview page: {built['rows']:,} rows, {built['bytes'] / 1e6:.2f} MB; load event "
          f"{figures['load_event_ms']:.0f} ms, first frame {figures['first_frame_ms']:.0f} ms, script "
          f"{figures['script_ms']:.0f} ms; search {figures['verbs_search_ms']:.0f} ms, filter "
          f"{figures['verbs_filter_ms']:.0f} ms, sort {figures['verbs_sort_ms']:.0f} ms "
          f"(measured in {time.perf_counter() - start:.1f} s)")
    assert figures["rows"] == built["rows"]
    assert max(figures["load_event_ms"], figures["first_frame_ms"]) < LOAD_BUDGET_MS
    assert figures["rows_in_dom"] < 100  # virtualised: only the rows in view
    assert figures["verbs_n_search"] > 0 and figures["verbs_n_filter"] < built["rows"]
    assert built["bytes"] < 12e6
