"""The review views of ``weight_mapper.views`` and the ``map`` flags that show them.

Views render to plain text at a fixed width with colours off, compared with exact strings
(trailing spaces stripped: rich pads table lines to the console width). The HTML report is
opened in headless Chromium where ``/usr/bin/chromium`` exists.
"""

import dataclasses
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

from benchmarks.review_page.cdp import FETCH_HINT, Browser, find_chromium
from cli_factories import OldNet
from fixture_models import BatchNormed, BatchNormedRenamed, OldModel, PartiallyCompatible
from weight_mapper import MappingError, MappingPlan, PlanEntry, PlanError, TensorTable, WeightMapper
from weight_mapper.cli import main
from weight_mapper.views import MappingView, ScoreBreakdownView, _sub_weights, export_html, score_bar

_WIDTH = 100
_FACTORY = "cli_factories:new_net"


def render(method, *args, **kwargs) -> str:
    """What ``method(..., console=...)`` prints, as plain text without trailing spaces."""
    console = Console(color_system=None, width=_WIDTH, record=True, file=io.StringIO())
    method(*args, console=console, **kwargs)
    return "".join(line.rstrip() + "\n" for line in console.export_text().splitlines())


def render_view(view) -> str:
    """A renderable as :func:`render` shows it."""
    return render(lambda console: console.print(view))


def partial() -> WeightMapper:
    """OldModel -> PartiallyCompatible: one conv lost its bias, one layer is new."""
    mapper = WeightMapper(OldModel(), PartiallyCompatible())
    mapper.suggest_mapping()
    return mapper


def batchnormed(**options) -> WeightMapper:
    """BatchNormed -> BatchNormedRenamed: running statistics travel with their layer."""
    mapper = WeightMapper(BatchNormed(), BatchNormedRenamed())
    mapper.suggest_mapping(**options)
    return mapper


def norms(**options) -> WeightMapper:
    """Two norms that only their names tell apart, from an unordered (safetensors-like) source."""
    source = TensorTable.from_state_dict(
        {"layers.0.in_norm.weight": (8,), "layers.0.post_norm.weight": (8,), "layers.0.attn.weight": (8, 16)},
        natural_order=True, label="hf.safetensors")
    target = {"layers.0.sa_norm.weight": (8,), "layers.0.mlp_norm.weight": (8,), "layers.0.attention.weight": (8, 16)}
    mapper = WeightMapper(source, target)
    mapper.suggest_mapping(**options)
    return mapper


# ------------------------------------------------------------------------------------ expected views

MAPPING_PARTIAL = """\
╭─ Mapping review ─────────────────────────────────────────────────────────╮
│ models            OldModel -> PartiallyCompatible                        │
│ coverage          ████████████████░░░░ 7/9 target tensors filled (77.8%) │
│ matched           7: 6 GROUP, 1 INDIV; 0 ambiguous                       │
│ transforms        7 exact                                                │
│ review            0 flagged, 0 repaired, 7 unproved, 0 proved            │
│ unmatched         1 source, 2 target                                     │
│ threshold         0.60                                                   │
│ strategy          best_match                                             │
│ hierarchy rounds  2 group-level + 2 tensor-level, converged              │
╰──────────────────────────────────────────────────────────────────────────╯

Matches, riskiest first
source               target               score  margin  transform  level  shape
─────────────────────────────────────────────────────────────────────────────────────────
classifier.2.weight  classifier.2.weight  0.987   0.987  exact      GROUP  [10, 64]
classifier.2.bias    classifier.2.bias    0.987   0.987  exact      GROUP  [10]
classifier.0.weight  classifier.0.weight  0.989   0.989  exact      GROUP  [64, 32]
classifier.0.bias    classifier.0.bias    0.989   0.989  exact      GROUP  [64]
backbone.2.weight    backbone.2.weight    0.991   0.991  exact      GROUP  [32, 16, 3, 3]
backbone.2.bias      backbone.2.bias      0.991   0.991  exact      GROUP  [32]
backbone.0.weight    backbone.0.weight    1.000   1.000  exact      INDIV  [16, 3, 3, 3]
score: green > 0.8, yellow 0.6-0.8, red < 0.6; margin: score minus the runner-up's

Unmatched
source (1)       shape  target (2)    shape
─────────────────────────────────────────────
backbone.0.bias  [16]   extra.weight  [3, 10]
                        extra.bias    [3]
"""

TREES_PARTIAL = """\
source: OldModel                                  target: PartiallyCompatible
────────────────────────────────────────────────────────────────────────────────────────────────────
OldModel ◐  (8 tensors)                           PartiallyCompatible ◐  (9 tensors)
├── backbone ◐                                    ├── backbone ✓
│   ├── 0 Conv2d ◐ -> backbone.0  W[16,3,3,3]     │   ├── 0 Conv2d ✓ <- backbone.0  W[16,3,3,3]
│   │   B[16]                                     │   └── 2 Conv2d ✓ <- backbone.2  W[32,16,3,3]
│   └── 2 Conv2d ✓ -> backbone.2  W[32,16,3,3]    │       B[32]
│       B[32]                                     ├── classifier ✓
└── classifier ✓                                  │   ├── 0 Linear ✓ <- classifier.0  W[64,32]
    ├── 0 Linear ✓ -> classifier.0  W[64,32]      │   │   B[64]
    │   B[64]                                     │   └── 2 Linear ✓ <- classifier.2  W[10,64]
    └── 2 Linear ✓ -> classifier.2  W[10,64]      │       B[10]
        B[10]                                     └── extra Linear ✗  W[3,10]  B[3]

W weight, B bias, buf persistent buffer, … deeper modules not shown
✓ all tensors under the module matched, ◐ some, ✗ none; -> / <- where its tensors go / come from
"""

WHY_NO_SHAPE = """\
╭─ Why is backbone.0.bias not in the plan? ────────────────────────────────────────────────────────╮
│ backbone.0.bias stayed unmatched: no target tensor had a compatible shape (or incompatible_pairs │
│ forbade them all).                                                                               │
╰──────────────────────────────────────────────────────────────────────────────────────────────────╯
"""

MAPPING_BN_TOP4 = """\
╭─ Mapping review ────────────────────────────────────────────────────────────╮
│ models            BatchNormed -> BatchNormedRenamed                         │
│ coverage          ████████████████████ 14/14 target tensors filled (100.0%) │
│ matched           14: 14 GROUP; 0 ambiguous                                 │
│ transforms        14 exact                                                  │
│ review            0 flagged, 0 repaired, 14 unproved, 0 proved              │
│ unmatched         0 source, 0 target                                        │
│ threshold         0.60                                                      │
│ strategy          best_match                                                │
│ hierarchy rounds  2 group-level + 1 tensor-level, converged                 │
╰─────────────────────────────────────────────────────────────────────────────╯

Matches, riskiest first
source            target                  score  margin  transform  level  shape
────────────────────────────────────────────────────────────────────────────────
bn1.weight        stem.norm.weight        0.827   0.071  exact      GROUP  [8]
bn1.bias          stem.norm.bias          0.827   0.071  exact      GROUP  [8]
bn1.running_mean  stem.norm.running_mean  0.827   0.071  exact      GROUP  [8]
bn1.running_var   stem.norm.running_var   0.827   0.071  exact      GROUP  [8]
4 of 14 shown; the other 10: 10 unproved, margin >= 0.071
score: green > 0.8, yellow 0.6-0.8, red < 0.6; margin: score minus the runner-up's
"""

TREES_BN_DEPTH1 = """\
source: BatchNormed                                     target: BatchNormedRenamed
─────────────────────────────────────────────────────────────────────────────────────────
BatchNormed  (14 tensors)                               BatchNormedRenamed  (14 tensors)
├── conv1 Conv2d  W[8,3,3,3]                            ├── stem
├── bn1 BatchNorm2d  W[8]  B[8]  buf[8]  buf[8]  buf[]  │   └── … 1 more level, 6 tensors
├── conv2 Conv2d  W[8,8,3,3]                            ├── block
├── bn2 BatchNorm2d  W[8]  B[8]  buf[8]  buf[8]  buf[]  │   └── … 1 more level, 6 tensors
└── fc Linear  W[4,8]  B[4]                             └── head Linear  W[4,8]  B[4]

W weight, B bias, buf persistent buffer, … deeper modules not shown
"""

WHY_BN1_RUNNING_MEAN = """\
╭─ Why bn1.running_mean -> stem.norm.running_mean? ─────────────────╮
│ Matched as part of module bn1 -> stem.norm, score 0.827           │
│ It beats the runner-up block.norm by 0.087                        │
│                                                                   │
│ score component       weight  score                          adds │
│ ───────────────────────────────────────────────────────────────── │
│ shape                   0.50  1.000  ████████████████████   0.500 │
│ name                    0.30  0.406  ████████░░░░░░░░░░░░   0.122 │
│   token overlap         0.30  0.500  ██████████░░░░░░░░░░   0.045 │
│   edit distance         0.20  0.444  █████████░░░░░░░░░░░   0.027 │
│   common subsequence    0.15  0.444  █████████░░░░░░░░░░░   0.020 │
│   numeric indices       0.25  0.000  ░░░░░░░░░░░░░░░░░░░░   0.000 │
│   leaf type             0.10  1.000  ████████████████████   0.030 │
│ hierarchy               0.20  0.812  ████████████████░░░░   0.163 │
│   depth                 0.15  0.500  ██████████░░░░░░░░░░   0.015 │
│   sibling position      0.15  0.250  █████░░░░░░░░░░░░░░░   0.007 │
│   definition order      0.20  1.000  ████████████████████   0.040 │
│   execution order       0.50  1.000  ████████████████████   0.100 │
│                                                                   │
│ base                          0.784  ████████████████░░░░   0.784 │
│ context                 0.20  1.000  ████████████████████  +0.043 │
│                                                                   │
│ score                         0.827  █████████████████░░░   0.827 │
│ weight of a sub-score: its share of the component                 │
│ adds: its part of the score                                       │
│ score = 0.80 × base + 0.20 × max(base, context)                   │
│                                                                   │
│ Alternatives (best first)                                         │
│ candidate   score  vs chosen  shape   name  hierarchy  context    │
│ ──────────────────────────────────────────────────────────────    │
│ block.norm  0.740     -0.087  1.000  0.390      0.291    1.000    │
╰───────────────────────────────────────────────────────────────────╯
"""

WHY_UNDER_THRESHOLD = """\
╭─ Why is bn1.weight not in the plan? ─────────────────────────────────────────────────────────────╮
│ Matched as part of module bn1 -> stem.norm, score 0.827                                          │
│ The assignment chose it, but its score is under the threshold 0.90: it is not in the plan (nor   │
│ is the rest of its module).                                                                      │
│ It beats the runner-up block.norm by 0.087                                                       │
│                                                                                                  │
│ score component       weight  score                          adds                                │
│ ─────────────────────────────────────────────────────────────────                                │
│ shape                   0.50  1.000  ████████████████████   0.500                                │
│ name                    0.30  0.406  ████████░░░░░░░░░░░░   0.122                                │
│   token overlap         0.30  0.500  ██████████░░░░░░░░░░   0.045                                │
│   edit distance         0.20  0.444  █████████░░░░░░░░░░░   0.027                                │
│   common subsequence    0.15  0.444  █████████░░░░░░░░░░░   0.020                                │
│   numeric indices       0.25  0.000  ░░░░░░░░░░░░░░░░░░░░   0.000                                │
│   leaf type             0.10  1.000  ████████████████████   0.030                                │
│ hierarchy               0.20  0.812  ████████████████░░░░   0.163                                │
│   depth                 0.15  0.500  ██████████░░░░░░░░░░   0.015                                │
│   sibling position      0.15  0.250  █████░░░░░░░░░░░░░░░   0.007                                │
│   definition order      0.20  1.000  ████████████████████   0.040                                │
│   execution order       0.50  1.000  ████████████████████   0.100                                │
│                                                                                                  │
│ base                          0.784  ████████████████░░░░   0.784                                │
│ context                 0.20  1.000  ████████████████████  +0.043                                │
│                                                                                                  │
│ score                         0.827  █████████████████░░░   0.827                                │
│ weight of a sub-score: its share of the component                                                │
│ adds: its part of the score                                                                      │
│ score = 0.80 × base + 0.20 × max(base, context)                                                  │
│                                                                                                  │
│ Alternatives (best first)                                                                        │
│ candidate   score  vs chosen  shape   name  hierarchy  context                                   │
│ ──────────────────────────────────────────────────────────────                                   │
│ block.norm  0.740     -0.087  1.000  0.390      0.291    1.000                                   │
╰──────────────────────────────────────────────────────────────────────────────────────────────────╯
"""

MAPPING_AMBIGUOUS = """\
╭─ Mapping review ──────────────────────────────────────────────────────────╮
│ models            hf.safetensors -> target state_dict                     │
│ coverage          ████████████████████ 3/3 target tensors filled (100.0%) │
│ matched           3: 3 GROUP; 2 ambiguous                                 │
│ transforms        3 exact                                                 │
│ review            2 flagged, 0 repaired, 1 unproved, 0 proved             │
│ unmatched         0 source, 0 target                                      │
│ threshold         0.60                                                    │
│ strategy          best_match                                              │
│ hierarchy rounds  2 group-level + 1 tensor-level, converged               │
╰───────────────────────────────────────────────────────────────────────────╯

Matches, riskiest first
source                 target                 score  margin  transform  level  shape    review
────────────────────────────────────────────────────────────────────────────────────────────────────
layers.0.in_norm.weig  layers.0.sa_norm.weig  0.932  -0.016  exact      GROUP  [8]      ⚠ order_only
ht                     ht
layers.0.post_norm.we  layers.0.mlp_norm.wei  0.948   0.000  exact      GROUP  [8]      ⚠ order_only
ight                   ght
layers.0.attn.weight   layers.0.attention.we  1.000   1.000  exact      GROUP  [8, 16]
                       ight
score: green > 0.8, yellow 0.6-0.8, red < 0.6; margin: score minus the runner-up's
⚠ ambiguous: margin under 0.02
order_only: decided by order alone: names and shapes could not tell the candidates apart
"""

MAPPING_WITHHELD = """\
╭─ Mapping review ─────────────────────────────────────────────────────────╮
│ models            hf.safetensors -> target state_dict                    │
│ coverage          ███████░░░░░░░░░░░░░ 1/3 target tensors filled (33.3%) │
│ matched           1: 1 GROUP; 0 ambiguous                                │
│ transforms        1 exact                                                │
│ review            0 flagged, 0 repaired, 1 unproved, 0 proved            │
│ unmatched         2 source, 2 target                                     │
│ withheld          2 ambiguous matches (strategy conservative)            │
│ threshold         0.75                                                   │
│ strategy          conservative                                           │
│ hierarchy rounds  2 group-level + 1 tensor-level, converged              │
╰──────────────────────────────────────────────────────────────────────────╯

Matches, riskiest first
source                target                     score  margin  transform  level  shape
─────────────────────────────────────────────────────────────────────────────────────────
layers.0.attn.weight  layers.0.attention.weight  1.000   1.000  exact      GROUP  [8, 16]
score: green > 0.8, yellow 0.6-0.8, red < 0.6; margin: score minus the runner-up's

Withheld as ambiguous (not in the plan), riskiest first
source                  target                  score  margin  transform  level  shape  review
────────────────────────────────────────────────────────────────────────────────────────────────────
layers.0.in_norm.weigh  layers.0.sa_norm.weigh  0.932  -0.016  exact      GROUP  [8]    ⚠ order_only
t                       t
layers.0.post_norm.wei  layers.0.mlp_norm.weig  0.948   0.000  exact      GROUP  [8]    ⚠ order_only
ght                     ht
score: green > 0.8, yellow 0.6-0.8, red < 0.6; margin: score minus the runner-up's
⚠ ambiguous: margin under 0.02
order_only: decided by order alone: names and shapes could not tell the candidates apart

Unmatched
source (2)                 shape  target (2)                shape
─────────────────────────────────────────────────────────────────
layers.0.in_norm.weight    [8]    layers.0.sa_norm.weight   [8]
layers.0.post_norm.weight  [8]    layers.0.mlp_norm.weight  [8]
"""



# ------------------------------------------------------------------------------------ mapping


def test_mapping_view_shows_summary_matches_and_unmatched_with_shapes():
    assert render(partial().visualize_mapping) == MAPPING_PARTIAL


def test_mapping_view_keeps_the_lowest_scores_when_truncated():
    assert render(batchnormed().visualize_mapping, max_matches=4) == MAPPING_BN_TOP4


def test_mapping_view_flags_ambiguous_matches():
    assert render(norms().visualize_mapping, show_unmatched=False) == MAPPING_AMBIGUOUS


def test_mapping_view_lists_matches_withheld_as_ambiguous():
    assert render(norms(strategy="conservative").visualize_mapping) == MAPPING_WITHHELD


def test_mapping_view_takes_a_plan_or_the_last_mapping():
    mapper = partial()
    assert render(mapper.visualize_mapping, mapper.get_mapping_dict()) == MAPPING_PARTIAL
    assert "PartiallyCompatible -> OldModel" in render(mapper.visualize_mapping, mapper.get_plan().inverse())
    # an edited dict is shown (issue 13); a pair whose shapes no transform fixes is refused
    with pytest.raises(PlanError, match="'backbone.0.weight' .* cannot fill 'extra.weight'"):
        mapper.visualize_mapping({"backbone.0.weight": "extra.weight"})


def test_mapping_view_finds_the_shapes_of_prefixed_source_keys():
    mapper = WeightMapper({"module.fc.weight": (3, 2), "module.extra.weight": (5,)}, {"fc.weight": (3, 2)})
    mapper.suggest_mapping()
    text = render(mapper.visualize_mapping)
    assert "source prefix     'module.' (ignored while matching)" in text
    assert "module.extra.weight  [5]" in text
    for name in ("module.fc.weight", "fc.weight"):  # with or without the prefix
        assert "Why module.fc.weight -> fc.weight?" in render(mapper.visualize_score_breakdown, name)


def test_mapping_view_of_a_loaded_plan_lists_unmatched_names_without_shapes():
    plan = MappingPlan.from_json(partial().get_plan().to_json())
    assert "backbone.0.bias  extra.weight\n" in render_view(MappingView(plan))


# ------------------------------------------------------------------------------------ hierarchies


def test_hierarchies_side_by_side_with_matches():
    assert render(partial().visualize_hierarchies, show_matches=True) == TREES_PARTIAL


def test_hierarchies_depth_limited_with_buffer_badges():
    assert render(batchnormed().visualize_hierarchies, max_depth=1) == TREES_BN_DEPTH1


# ------------------------------------------------------------------------------------ breakdown


def test_breakdown_shows_weighted_scores_and_the_runner_up():
    assert render(batchnormed().visualize_score_breakdown, "bn1.running_mean") == WHY_BN1_RUNNING_MEAN


def test_breakdown_of_a_tensor_without_candidates():
    assert render(partial().visualize_score_breakdown, "backbone.0.bias") == WHY_NO_SHAPE


def test_breakdown_of_a_tensor_under_the_threshold():
    assert render(batchnormed(threshold=0.9).visualize_score_breakdown, "bn1.weight") == WHY_UNDER_THRESHOLD


@pytest.mark.parametrize("make", [partial, batchnormed, norms])
def test_breakdown_weights_recompose_the_component_scores(make):
    """The shares shown for sub-scores are the ones score.py combines (hierarchy rescaled when partial)."""
    mapper = make()
    for name in mapper.get_mapping_dict():
        ex = mapper.explain(name)
        for component in ("name", "hierarchy"):
            shares = _sub_weights(component, ex["sub_scores"])
            assert sum(shares.values()) == pytest.approx(1.0)
            assert sum(w * ex["sub_scores"][k] for k, w in shares.items()) == pytest.approx(ex["components"][component])


def test_breakdown_of_an_unknown_tensor_names_it():
    with pytest.raises(MappingError, match="'backbone.9.weight' is not a source tensor"):
        partial().visualize_score_breakdown("backbone.9.weight", console=Console(file=io.StringIO()))


def test_breakdown_renders_a_withheld_match():
    text = render(norms(strategy="conservative").visualize_score_breakdown, "layers.0.in_norm.weight")
    assert "Why is layers.0.in_norm.weight not in the plan?" in text
    assert "withheld as ambiguous" in text and "(ambiguous: check it)" in text


FUSED_WHY = """\
╭─ Why attn.k.weight -> attn.in_proj_weight? ───────────────────────────────────────╮
│ Combined (concat) from attn.q.weight, attn.k.weight, attn.v.weight, score 0.810   │
│ The set is scored as one match, its first tensor standing for its name and place. │
│                                                                                   │
│ score component  weight  score                          adds                      │
│ ────────────────────────────────────────────────────────────                      │
│ shape              0.50  1.000  ████████████████████   0.500                      │
│ name               0.30  0.500  ██████████░░░░░░░░░░   0.150                      │
│ hierarchy          0.20  0.800  ████████████████░░░░   0.160                      │
│                                                                                   │
│ base                     0.810  ████████████████░░░░   0.810                      │
│ context            0.20  0.250  █████░░░░░░░░░░░░░░░  +0.000                      │
│                                                                                   │
│ score                    0.810  ████████████████░░░░   0.810                      │
│ adds: its part of the score                                                       │
│ score = 0.80 × base + 0.20 × max(base, context)                                   │
╰───────────────────────────────────────────────────────────────────────────────────╯
"""


def test_fused_entries_show_every_source_and_their_own_components():
    """A target built from several sources (concat): all source shapes, the FUSED badge, the set's scores."""
    if "args" not in {f.name for f in dataclasses.fields(PlanEntry)}:
        pytest.skip("plan entries without transform arguments")
    entry = PlanEntry(("attn.q.weight", "attn.k.weight", "attn.v.weight"), "attn.in_proj_weight", "concat", 0.81, 0.5,
                      "combined", (4, 4), (12, 4), {"shape": 1.0, "name": 0.5, "hierarchy": 0.8, "context": 0.25},
                      args={"dim": 0, "sizes": [4, 4, 4], "source_shapes": [[4, 4]] * 3})
    plan = MappingPlan((entry,), weights={"shape": 0.5, "name": 0.3, "hierarchy": 0.2})
    mapping = render_view(MappingView(plan, show_unmatched=False))
    assert "1: 1 FUSED; 0 ambiguous" in mapping and "1 concat" in mapping
    assert "0.810   0.500  concat     FUSED  [4, 4] + [4, 4] + [4, 4] -> [12, 4]" in mapping  # one line
    # What WeightMapper.explain says of a tensor the 1:1 assignment did not match.
    explanation = {"source": "attn.k.weight", "target": "attn.in_proj_weight", "level": None, "candidate": None,
                   "target_label": None, "score": None, "components": None, "sub_scores": {}, "alternatives": [],
                   "weights": {"shape": 0.5, "name": 0.3, "hierarchy": 0.2}}
    assert render_view(ScoreBreakdownView.from_plan(explanation, plan)) == FUSED_WHY


def test_score_bar_is_proportional():
    assert [score_bar(v, width=4).plain for v in (0.0, 0.5, 1.0, 1.7)] == ["░░░░", "██░░", "████", "████"]


def test_core_never_imports_rich():
    code = ("import sys, weight_mapper, weight_mapper.apply, weight_mapper.renamer; "
            "from weight_mapper import WeightMapper; "
            "print(sorted(m for m in sys.modules if m == 'rich' or m.startswith('rich.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------ CLI and HTML


@pytest.fixture(scope="module")
def old_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("views") / "old.pt"
    torch.manual_seed(0)
    torch.save(OldNet().state_dict(), path)
    return path


def test_map_prints_the_trees_and_the_breakdowns_asked_for(old_checkpoint, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    argv = ["map", str(old_checkpoint), _FACTORY, "-o", str(plan), "--tree",
            "--explain", "backbone.1.weight", "--explain", "classifier.2.bias"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "target tensors filled: 12/12" in out  # print_analysis, as before
    assert "source: old.pt" in out and "target: NewNet" in out and "✓ <- backbone.1" in out
    assert "Why backbone.1.weight -> stem.norm.weight?" in out
    assert "Why classifier.2.bias -> head.logits.bias?" in out
    assert plan.exists()


def test_map_explain_takes_names_with_or_without_the_wrapper_prefix(old_checkpoint, tmp_path, capsys):
    lightning = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in torch.load(old_checkpoint).items()}, "epoch": 1}, lightning)
    argv = ["map", str(lightning), _FACTORY, "-o", str(tmp_path / "plan.json"),
            "--explain", "backbone.1.weight", "--explain", "model.classifier.2.bias"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Why model.backbone.1.weight -> stem.norm.weight?" in out
    assert "Why model.classifier.2.bias -> head.logits.bias?" in out


def test_map_explain_names_close_matches_of_a_misspelt_tensor(old_checkpoint, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(["map", str(old_checkpoint), _FACTORY, "-o", str(plan), "--explain", "backbone.1.weigth"]) == 1
    err = capsys.readouterr().err
    assert "--explain 'backbone.1.weigth'" in err and "did you mean 'backbone.1.weight'" in err
    assert not plan.exists()


def test_map_tree_with_json_is_a_usage_error(old_checkpoint, tmp_path, capsys):
    assert main(["map", str(old_checkpoint), _FACTORY, "-o", str(tmp_path / "p.json"), "--json", "--tree"]) == 2
    assert "--html REPORT" in capsys.readouterr().err


def _visible(html_text: str) -> str:
    """The text a browser shows: tags removed, entities decoded."""
    import html
    import re

    return html.unescape(re.sub(r"<[^>]+>", "", html_text))


def _html(old_checkpoint, tmp_path, capsys, *extra) -> tuple[str, str]:
    html = tmp_path / "review.html"
    argv = ["map", str(old_checkpoint), _FACTORY, "-o", str(tmp_path / "plan.json"), "--html", str(html), *extra]
    assert main(argv) == 0
    return html.read_text(encoding="utf-8"), capsys.readouterr().out


def test_map_html_is_one_self_contained_page(old_checkpoint, tmp_path, capsys):
    text, out = _html(old_checkpoint, tmp_path, capsys, "--explain", "backbone.1.weight")
    assert "Review written to" in out and "riskiest first" in out
    assert text.startswith("<!DOCTYPE html>")
    assert "<title>weight_mapper review: old.pt -&gt; NewNet</title>" in text
    data = json.loads(re.search(r'id="wm-data">(.*?)</script>', text, re.S).group(1))
    plan = MappingPlan.from_json(tmp_path / "plan.json")
    assert data["meta"]["source_label"] == "old.pt" and data["meta"]["n_matched"] == len(plan.entries)
    # every entry's breakdown (there are fewer than MAX_BREAKDOWNS), the --explain one among them
    assert len(data["breakdowns"]) == sum(e.level != "alias" for e in plan.entries) + len(plan.unmatched_source)
    explained = next(r for r, src in enumerate(data["rows"]["src"][:len(plan.entries)])
                     if plan.entries[r].source == ("backbone.1.weight",))
    assert str(explained) in data["breakdowns"]
    for external in ("<link", " src=", "href=", "http://", "https://", "@import"):
        assert external not in text


def test_map_html_leaves_the_json_output_unchanged(old_checkpoint, tmp_path, capsys):
    assert main(["map", str(old_checkpoint), _FACTORY, "-o", str(tmp_path / "a.json"), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["map", str(old_checkpoint), _FACTORY, "-o", str(tmp_path / "b.json"), "--json",
                 "--html", str(tmp_path / "review.html")]) == 0
    with_html = json.loads(capsys.readouterr().out)
    assert {**with_html, "plan": None} == {**plain, "plan": None}
    assert (tmp_path / "review.html").stat().st_size > 0


@pytest.mark.parametrize(("html", "why"), [
    ("plan.json", "Refusing to overwrite the plan"),
    ("missing/review.html", "does not exist; create it first"),
])
def test_map_html_fails_before_writing_anything(old_checkpoint, tmp_path, capsys, html, why):
    plan = tmp_path / "plan.json"
    assert main(["map", str(old_checkpoint), _FACTORY, "-o", str(plan), "--html", str(tmp_path / html)]) == 1
    assert why in capsys.readouterr().err
    assert not plan.exists()


@pytest.mark.skipif(find_chromium() is None, reason=f"no headless Chromium: {FETCH_HINT}")
def test_html_opens_in_headless_chromium(tmp_path):
    mapper = batchnormed()
    html = export_html([MappingView(mapper.get_plan(), source_table=mapper.source_table,
                                    target_table=mapper.target_table),
                        ScoreBreakdownView(mapper.explain("bn1.weight"))], tmp_path / "review.html")
    with Browser(find_chromium()) as browser:
        browser.open(html)
        shot = browser.screenshot(tmp_path / "shot.png")
        text = browser.evaluate("document.body.innerText")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Mapping review" in text
    assert "Why bn1.weight -> stem.norm.weight?" in text


def test_breakdown_of_a_tensor_whose_group_is_under_the_threshold():
    """At 0.85 the BatchNorm group scores under the threshold: its tensors are left out together,
    not matched one by one (issue 13: groups move together), and the breakdown says so."""
    mapper = batchnormed(threshold=0.85)
    text = render(mapper.visualize_score_breakdown, "bn1.weight")
    assert text.startswith("╭─ Why is bn1.weight not in the plan?") and "under the threshold 0.85" in text
    assert not any(k.startswith("bn1.") for k in mapper.get_mapping_dict())


def test_a_combined_entry_with_many_sources_is_one_short_line():
    """256 experts must not print 512 names: the first two, the last, the count; shapes run-length."""
    from reference_encoders import ExpertList, FusedExperts

    mapper = WeightMapper(ExpertList(8, 16, 4), FusedExperts(8, 16, 4))
    mapper.suggest_mapping()
    console = Console(color_system=None, width=120, record=True, file=io.StringIO())
    mapper.visualize_mapping(console=console)
    text = console.export_text()
    assert "8 x [16, 8] -> [4, 32, 8]" in text
    assert "experts.1.w1.weight, …," in text and "experts.3.w3.weight (8" in text
    assert "experts.2.w1.weight" not in text
    assert "experts.2.w2.weight," in text  # 4 sources are still listed
