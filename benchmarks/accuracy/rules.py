"""Ground truth as data: rename tables from one architecture's keys to another's.

Each table is a tuple of ``(pattern, replacement)`` or ``(pattern, replacement, transform)``
rules in the spirit of torchtune's ``_FROM_HF`` dicts. :func:`rename_all` applies one table to
every source key: the first rule whose pattern *fully* matches a key rewrites it (``re.sub``
syntax, or a callable taking the match). A key that no rule matches is an error, so a table
either covers the whole source state dict or says loudly which key it forgot.

:func:`build_truth` turns a table (plus the targets built from several sources: concatenated
or stacked) into the ground truth the benchmark scores against, keyed by target:
``{target_key: (source_keys, transform)}`` with ``transform`` one of ``None`` (copy),
``"transpose"``, ``"reshape"``, ``"concat"`` or ``"stack"``, as in a weight_mapper plan entry.
``concat`` and ``stack`` are always along dim 0 here (:data:`COMBINE_DIM`).

Nothing here looks at the matcher: the tables were written from the two libraries' module
definitions, and each one is *proved* by :mod:`benchmarks.accuracy.run` (convert the source
through the truth, load it into the target with ``strict=True``, compare outputs).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence

Replacement = str | Callable[[re.Match], str]
Rule = tuple[str, Replacement] | tuple[str, Replacement, str | None]
Rules = Sequence[Rule]
TruthEntry = tuple[tuple[str, ...], str | None]  # (source keys in order, transform)
Truth = dict[str, TruthEntry]  # target key -> where it comes from

TRANSFORMS = (None, "transpose", "reshape", "concat", "stack")
COMBINE_DIM = 0  # the dim every ground-truth concat / stack joins along

__all__ = [
    "rename_all",
    "build_truth",
    "Truth",
    "TruthEntry",
    "COMBINE_DIM",
    "IDENTITY",
    "TV_VIT_TO_TIMM",
    "TV_REGNET_TO_TIMM",
    "tv_mobilenet_v2_to_timm",
]


def _compiled(rules: Rules) -> list[tuple[re.Pattern, Replacement, str | None]]:
    return [(re.compile(rule[0]), rule[1], rule[2] if len(rule) > 2 else None) for rule in rules]


def _rewrite(keys: Iterable[str], rules: Rules) -> dict[str, tuple[str, str | None]]:
    compiled = _compiled(rules)
    out: dict[str, tuple[str, str | None]] = {}
    for key in keys:
        for pattern, replacement, transform in compiled:
            if pattern.fullmatch(key):
                out[key] = (pattern.sub(replacement, key, count=1), transform)
                break
        else:
            raise KeyError(f"no ground-truth rule matches source key {key!r}")
    return out


def rename_all(keys: Iterable[str], rules: Rules) -> dict[str, str]:
    """``{source_key: target_key}`` for every key, by the first fully matching rule.

    Raises:
        KeyError: If a key matches no rule (the table is incomplete).

    >>> rename_all(["a.0.w"], [(r"a\\.(\\d+)\\.(.*)", r"b.\\1.\\2")])
    {'a.0.w': 'b.0.w'}
    """
    return {k: t for k, (t, _) in _rewrite(keys, rules).items()}


def build_truth(keys: Sequence[str], rules: Rules, combined: Mapping[str, TruthEntry] | None = None) -> Truth:
    """The ground truth ``{target_key: (source_keys, transform)}`` for the source ``keys``.

    Every source key in ``combined`` (targets made of several sources) is taken from there;
    every other key must match a rule of ``rules``, whose optional third element is the
    transform (``None``: a plain copy).

    Raises:
        KeyError: If a key matches no rule, or ``combined`` names a key the source lacks.
        ValueError: If two entries fill one target, or a transform is unknown.

    >>> build_truth(["a.w", "q", "k"], [(r"a\\.(.*)", r"b.\\1", "transpose")], {"qk": (("q", "k"), "concat")})
    {'b.w': (('a.w',), 'transpose'), 'qk': (('q', 'k'), 'concat')}
    """
    combined = dict(combined or {})
    in_combined = {s for srcs, _ in combined.values() for s in srcs}
    absent = sorted(in_combined - set(keys))
    if absent:
        raise KeyError(f"combined ground-truth entries name source keys the model lacks: {absent[:5]}")
    truth: Truth = {}
    for source, (target, transform) in _rewrite([k for k in keys if k not in in_combined], rules).items():
        if target in truth:
            raise ValueError(f"two source keys map to {target!r}: {truth[target][0][0]!r} and {source!r}")
        truth[target] = ((source,), transform)
    for target, (sources, transform) in combined.items():
        if target in truth:
            raise ValueError(f"{target!r} is both renamed and combined")
        truth[target] = (tuple(sources), transform)
    bad = {t: e[1] for t, e in truth.items() if e[1] not in TRANSFORMS}
    if bad:
        raise ValueError(f"unknown transforms in the ground truth: {bad}")
    return truth


# torchvision resnet50 -> timm resnet50: the two libraries use the same names.
IDENTITY: Rules = ((r"(.*)", r"\1"),)

# torchvision vit_b_16 -> timm vit_base_patch16_224. Both keep q/k/v fused as one [3d, d]
# projection in the same (q, k, v) order, so every tensor maps 1:1.
TV_VIT_TO_TIMM: Rules = (
    (r"class_token", "cls_token"),
    (r"conv_proj\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.pos_embedding", "pos_embed"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.ln_1\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.ln_2\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.0\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.3\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"encoder\.ln\.(weight|bias)", r"norm.\1"),
    (r"heads\.head\.(weight|bias)", r"head.\1"),
)

# torchvision regnet_y_400mf -> timm regnety_004. torchvision counts blocks from 0
# (block2-0) and defines the shortcut (proj) first; timm counts from 1 (s2.b1) and defines
# the shortcut (downsample) last.
_REGNET_BLOCK = r"trunk_output\.block(\d+)\.block\1-(\d+)\."


def _regnet_block(leaf: str) -> Callable[[re.Match], str]:
    return lambda m: f"s{m[1]}.b{int(m[2]) + 1}.{leaf}.{m[3]}"


TV_REGNET_TO_TIMM: Rules = (
    (r"stem\.0\.(.*)", r"stem.conv.\1"),
    (r"stem\.1\.(.*)", r"stem.bn.\1"),
    (_REGNET_BLOCK + r"proj\.0\.(.*)", _regnet_block("downsample.conv")),
    (_REGNET_BLOCK + r"proj\.1\.(.*)", _regnet_block("downsample.bn")),
    (_REGNET_BLOCK + r"f\.a\.0\.(.*)", _regnet_block("conv1.conv")),
    (_REGNET_BLOCK + r"f\.a\.1\.(.*)", _regnet_block("conv1.bn")),
    (_REGNET_BLOCK + r"f\.b\.0\.(.*)", _regnet_block("conv2.conv")),
    (_REGNET_BLOCK + r"f\.b\.1\.(.*)", _regnet_block("conv2.bn")),
    (_REGNET_BLOCK + r"f\.se\.fc1\.(.*)", _regnet_block("se.fc1")),
    (_REGNET_BLOCK + r"f\.se\.fc2\.(.*)", _regnet_block("se.fc2")),
    (_REGNET_BLOCK + r"f\.c\.0\.(.*)", _regnet_block("conv3.conv")),
    (_REGNET_BLOCK + r"f\.c\.1\.(.*)", _regnet_block("conv3.bn")),
    (r"fc\.(weight|bias)", r"head.fc.\1"),
)

# torchvision convnext_tiny -> timm convnext_tiny. torchvision numbers stages and downsamplings
# in one flat `features` (stem 0, stages 1/3/5/7, downsamplings 2/4/6) and keeps each block's
# layers in a `block` Sequential (0 dwconv, 2 LayerNorm, 3/5 Linear) with a [C, 1, 1]
# `layer_scale`; timm names them and keeps the scale as a [C] `gamma`: a reshape.
_CONVNEXT_BLOCK = {"block.0": "conv_dw", "block.2": "norm", "block.3": "mlp.fc1", "block.5": "mlp.fc2"}


def _convnext_stage(m: re.Match) -> int:
    return (int(m[1]) - 1) // 2


TV_CONVNEXT_TO_TIMM: Rules = (
    (r"features\.0\.(\d)\.(weight|bias)", r"stem.\1.\2"),
    (r"features\.([246])\.(\d)\.(weight|bias)", lambda m: f"stages.{int(m[1]) // 2}.downsample.{m[2]}.{m[3]}"),
    *((rf"features\.([1357])\.(\d+)\.{re.escape(tv)}\.(weight|bias)",
       (lambda tm: lambda m: f"stages.{_convnext_stage(m)}.blocks.{m[2]}.{tm}.{m[3]}")(tm))
      for tv, tm in _CONVNEXT_BLOCK.items()),
    (r"features\.([1357])\.(\d+)\.layer_scale", lambda m: f"stages.{_convnext_stage(m)}.blocks.{m[2]}.gamma",
     "reshape"),
    (r"classifier\.0\.(weight|bias)", r"head.norm.\1"),
    (r"classifier\.2\.(weight|bias)", r"head.fc.\1"),
)

# torchvision efficientnet_b0 -> timm efficientnet_b0. torchvision: `features.0` stem,
# `features.1..7` stages of MBConv blocks whose layers are numbered in `block` (expand,
# depthwise, squeeze-excitation, project; stage 1 has no expand), `features.8` head conv.
# timm names them (`conv_pw`, `bn1`, `conv_dw`, `bn2`, `se.conv_reduce/expand`, `conv_pwl`,
# `bn3`; stage 0 `conv_dw`, `bn1`, `se`, `conv_pw`, `bn2`) under `blocks.<stage - 1>.<block>`.
_EFFNET_FIRST = {"block.0.0": "conv_dw", "block.0.1": "bn1", "block.1.fc1": "se.conv_reduce",
                 "block.1.fc2": "se.conv_expand", "block.2.0": "conv_pw", "block.2.1": "bn2"}
_EFFNET_BLOCK = {"block.0.0": "conv_pw", "block.0.1": "bn1", "block.1.0": "conv_dw", "block.1.1": "bn2",
                 "block.2.fc1": "se.conv_reduce", "block.2.fc2": "se.conv_expand", "block.3.0": "conv_pwl",
                 "block.3.1": "bn3"}


def _effnet_rule(stages: str, tv: str, tm: str) -> tuple[str, Replacement]:
    return (rf"features\.([{stages}])\.(\d+)\.{re.escape(tv)}\.(.*)",
            lambda m: f"blocks.{int(m[1]) - 1}.{m[2]}.{tm}.{m[3]}")


TV_EFFICIENTNET_TO_TIMM: Rules = (
    (r"features\.0\.0\.(.*)", r"conv_stem.\1"),
    (r"features\.0\.1\.(.*)", r"bn1.\1"),
    *(_effnet_rule("1", tv, tm) for tv, tm in _EFFNET_FIRST.items()),
    *(_effnet_rule("234567", tv, tm) for tv, tm in _EFFNET_BLOCK.items()),
    (r"features\.8\.0\.(.*)", r"conv_head.\1"),
    (r"features\.8\.1\.(.*)", r"bn2.\1"),
    (r"classifier\.1\.(.*)", r"classifier.\1"),
)

# torchvision vgg16_bn -> timm vgg16_bn. The same `features`; torchvision's classifier is three
# Linears over the flattened [512, 7, 7] map, timm's `pre_logits` a ConvMlp whose first layer
# is a 7x7 conv ([4096, 25088] -> [4096, 512, 7, 7]) and whose second a 1x1 conv.
TV_VGG_TO_TIMM: Rules = (
    (r"(features\..*)", r"\1"),
    (r"classifier\.0\.weight", "pre_logits.fc1.weight", "reshape"),
    (r"classifier\.0\.bias", "pre_logits.fc1.bias"),
    (r"classifier\.3\.weight", "pre_logits.fc2.weight", "reshape"),
    (r"classifier\.3\.bias", "pre_logits.fc2.bias"),
    (r"classifier\.6\.(weight|bias)", r"head.fc.\1"),
)

# MobileNetV2's inverted-residual settings: blocks per stage (torchvision and timm agree).
MOBILENET_V2_BLOCKS = (1, 2, 3, 4, 3, 3, 1)

# Inside one block. The first block has no expansion (timm: DepthwiseSeparableConv).
_MBV2_FIRST_BLOCK = {"conv.0.0": "conv_dw", "conv.0.1": "bn1", "conv.1": "conv_pw", "conv.2": "bn2"}
_MBV2_BLOCK = {
    "conv.0.0": "conv_pw", "conv.0.1": "bn1",
    "conv.1.0": "conv_dw", "conv.1.1": "bn2",
    "conv.2": "conv_pwl", "conv.3": "bn3",
}


def tv_mobilenet_v2_to_timm(blocks_per_stage: Sequence[int] = MOBILENET_V2_BLOCKS) -> Rules:
    """Rules for torchvision ``mobilenet_v2`` -> timm ``mobilenetv2_100``.

    torchvision numbers every layer in one flat ``features`` Sequential (stem = 0, blocks =
    1..17, head conv = 18); timm nests the blocks as ``blocks.<stage>.<block>`` and names
    the stem and head.
    """
    rules: list[tuple[str, Replacement]] = [
        (r"features\.0\.0\.(.*)", r"conv_stem.\1"),
        (r"features\.0\.1\.(.*)", r"bn1.\1"),
    ]
    feature = 1
    for stage, n_blocks in enumerate(blocks_per_stage):
        for block in range(n_blocks):
            inner = _MBV2_FIRST_BLOCK if feature == 1 else _MBV2_BLOCK
            for tv, tm in inner.items():
                rules.append((rf"features\.{feature}\.{re.escape(tv)}\.(.*)", rf"blocks.{stage}.{block}.{tm}.\1"))
            feature += 1
    rules += [
        (rf"features\.{feature}\.0\.(.*)", r"conv_head.\1"),
        (rf"features\.{feature}\.1\.(.*)", r"bn2.\1"),
        (r"classifier\.1\.(.*)", r"classifier.\1"),
    ]
    return tuple(rules)
