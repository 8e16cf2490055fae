"""The zoo's timm pairs: original-repository checkpoints -> timm, through timm's ``checkpoint_filter_fn``s.

Two pairs read a JAX ``.npz``: BiT through ``resnetv2._load_weights``, which permutes every conv
kernel from [H, W, in, out] to [out, in, H, W] (no rename or transpose reproduces that), and an
AugReg ViT through ``vision_transformer._load_weights``, which flattens, transposes and
concatenates the per-head q / k / v kernels into ``qkv``.

Where the source model is installed (torchvision's RegNets, which timm's ``regnet._filter_fn``
converts), its own state dict is the source. Otherwise the original models (Facebook's ConvNeXt, Microsoft's Swin, OpenAI's CLIP, Meta's DINOv2 and
I-JEPA, the PVT-v2, PoolFormer, DaViT, EfficientFormer, EdgeNeXt and MViTv2 repositories) are not installed, so the source checkpoint is
built by *inverting* the filter: for each target key of the timm model, :data:`TIMM` names the
source key (and, where the filter reshapes, the source shape) the original repository uses,
plus the tensors the filter drops (``mask_token``, ``relative_position_index`` buffers, a CLIP
text tower). This inverse is only a way to *construct* the input: the ground truth is read from
what timm's filter does with it on tracer values, and the zoo reports any key or shape the
filter produces that the timm model does not have (the inverse would then be wrong).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TIMM", "TimmSpec", "timm_pairs"]

Invert = Callable[[str, tuple[int, ...]], tuple[str, tuple[int, ...]] | None]


@dataclass(frozen=True)
class TimmSpec:
    """One timm pair.

    Attributes:
        name, source: Zoo id and the original repository's layout.
        model: timm model name; ``kwargs`` make it small.
        filter_fn: ``module:function`` of the timm filter.
        invert: target key, target shape -> the original key and shape (None: the filter makes
            that target from nothing, e.g. a zero bias).
        extra: model -> tensors the original checkpoint has and the filter drops.
        wrap: The checkpoint as the filter receives it (an envelope such as ``{"encoder": sd}``).
        source_model: ``module:function`` building the source model, where it is installed
            (torchvision): its state dict is the source, and ``invert`` is not used.
        with_model: The filter takes ``(state_dict, model)``; else ``(state_dict)``.
    """

    name: str
    source: str
    model: str
    kwargs: Mapping[str, Any]
    filter_fn: str
    invert: Invert
    extra: Callable[[Any], dict[str, torch.Tensor]] = lambda model: {}
    wrap: Callable[[dict], dict] = lambda sd: sd
    source_model: str | None = None
    with_model: bool = True


def _rules(*rules: tuple[str, Any]) -> Callable[[str], str]:
    """First fully matching ``(pattern, replacement)`` rewrites the key; no match keeps it."""
    compiled = [(re.compile(p), r) for p, r in rules]

    def rename(key: str) -> str:
        for pattern, repl in compiled:
            if pattern.fullmatch(key):
                return pattern.sub(repl, key, count=1)
        return key

    return rename


def _same_shape(rename: Callable[[str], str]) -> Invert:
    return lambda key, shape: (rename(key), shape)


# --------------------------------------------------------------------------- ConvNeXt (facebookresearch)
_convnext = _same_shape(_rules(
    (r"stem\.(.*)", r"downsample_layers.0.\1"),
    (r"stages\.(\d+)\.downsample\.(.*)", r"downsample_layers.\1.\2"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.(.*)", r"stages.\1.\2.dwconv.\3"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc(\d)\.(.*)", r"stages.\1.\2.pwconv\3.\4"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.(.*)", r"stages.\1.\2.\3"),
    (r"head\.norm\.(.*)", r"norm.\1"),
    (r"head\.fc\.(.*)", r"head.\1"),
))


def _convnext_invert(key: str, shape: tuple[int, ...]):
    src, _ = _convnext(key, shape)
    # the original's pointwise convs are nn.Linear: 2-D; timm's conv_mlp variant holds 1x1 convs
    if ".pwconv" in src and src.endswith("weight") and len(shape) == 4:
        return src, shape[:2]
    return src, shape


# --------------------------------------------------------------------------- Swin (microsoft)
def _swin_invert(key: str, shape: tuple[int, ...]):
    m = re.fullmatch(r"layers\.(\d+)\.downsample\.(.*)", key)
    if m:  # the original downsamples at the end of the previous stage
        return f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}", shape
    if key.startswith("head.fc."):
        return "head." + key[len("head.fc."):], shape
    return key, shape


def _swin_extra(model) -> dict[str, torch.Tensor]:
    """The original checkpoints keep every attention's ``relative_position_index`` (and ``attn_mask``)."""
    out = {}
    for name, buf in model.named_buffers():
        if name.endswith("relative_position_index") or (name.endswith("attn_mask") and buf is not None):
            out[name] = buf.clone()
    return out


# --------------------------------------------------------------------------- PVT-v2 (whai362)
def _pvt_invert(key: str, shape: tuple[int, ...]):
    k = key
    m = re.fullmatch(r"stages\.(\d+)\.downsample\.(.*)", k)
    if m:
        return f"patch_embed{int(m.group(1)) + 1}.{m.group(2)}", shape
    if k.startswith("patch_embed."):
        return "patch_embed1." + k[len("patch_embed."):], shape
    k = k.replace("mlp.dwconv.", "mlp.dwconv.dwconv.")
    k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)", lambda x: f"block{int(x.group(1)) + 1}.{x.group(2)}", k)
    k = re.sub(r"^stages\.(\d+)\.norm", lambda x: f"norm{int(x.group(1)) + 1}", k)
    return k, shape


# --------------------------------------------------------------------------- PoolFormer v1 (sail-sg)
def _poolformer_invert(key: str, shape: tuple[int, ...]):
    k = key
    if k.startswith("stem.conv."):
        return "patch_embed.proj." + k[len("stem.conv."):], shape
    m = re.fullmatch(r"stages\.(\d+)\.downsample\.conv\.(.*)", k)
    if m:
        return f"network.{2 * int(m.group(1)) - 1}.proj.{m.group(2)}", shape
    m = re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.*)", k)
    if m:
        rest = m.group(3)
        ls = re.fullmatch(r"layer_scale(\d)\.scale", rest)
        if ls:  # the original's layer scale is [C]; timm's [C, 1, 1]
            return f"network.{2 * int(m.group(1))}.{m.group(2)}.layer_scale_{ls.group(1)}", (shape[0],)
        return f"network.{2 * int(m.group(1))}.{m.group(2)}.{rest}", shape
    if k.startswith("head.fc."):
        return "head." + k[len("head.fc."):], shape
    if k.startswith("head.norm."):
        return "norm." + k[len("head.norm."):], shape
    return k, shape


# --------------------------------------------------------------------------- CLIP (openai)
_CLIP_SWAPS = (
    (r"patch_embed\.proj\.(.*)", r"conv1.\1"),
    (r"norm_pre\.(.*)", r"ln_pre.\1"),
    (r"norm\.(.*)", r"ln_post.\1"),
    (r"blocks\.(\d+)\.norm(\d)\.(.*)", r"transformer.resblocks.\1.ln_\2.\3"),
    (r"blocks\.(\d+)\.attn\.qkv\.(.*)", r"transformer.resblocks.\1.attn.in_proj_\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(.*)", r"transformer.resblocks.\1.attn.out_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(.*)", r"transformer.resblocks.\1.mlp.c_fc.\2"),
    (r"blocks\.(\d+)\.mlp\.fc2\.(.*)", r"transformer.resblocks.\1.mlp.c_proj.\2"),
)
_clip_rename = _rules(*_CLIP_SWAPS)


def _clip_invert(key: str, shape: tuple[int, ...]):
    if key == "cls_token":
        return "visual.class_embedding", (shape[-1],)
    if key == "pos_embed":
        return "visual.positional_embedding", tuple(shape[1:])
    if key == "head.weight":  # CLIP's projection [width, embed], transposed by the filter
        return "visual.proj", (shape[1], shape[0])
    if key == "head.bias":
        return None  # the filter makes a zero bias
    return "visual." + _clip_rename(key), shape


def _clip_text_tower(model) -> dict[str, torch.Tensor]:
    """A one-layer CLIP text tower (the filter drops it): names the vision tower shares under ``visual.``."""
    width, embed, vocab, ctx = 48, model.head.weight.shape[0], 64, 16
    out = {"positional_embedding": torch.randn(ctx, width), "text_projection": torch.randn(width, embed),
           "logit_scale": torch.ones(()), "token_embedding.weight": torch.randn(vocab, width)}
    pre = "transformer.resblocks.0."
    out.update({
        pre + "attn.in_proj_weight": torch.randn(3 * width, width), pre + "attn.in_proj_bias": torch.randn(3 * width),
        pre + "attn.out_proj.weight": torch.randn(width, width), pre + "attn.out_proj.bias": torch.randn(width),
        pre + "ln_1.weight": torch.randn(width), pre + "ln_1.bias": torch.randn(width),
        pre + "mlp.c_fc.weight": torch.randn(4 * width, width), pre + "mlp.c_fc.bias": torch.randn(4 * width),
        pre + "mlp.c_proj.weight": torch.randn(width, 4 * width), pre + "mlp.c_proj.bias": torch.randn(width),
        pre + "ln_2.weight": torch.randn(width), pre + "ln_2.bias": torch.randn(width),
        "ln_final.weight": torch.randn(width), "ln_final.bias": torch.randn(width),
    })
    return out


# --------------------------------------------------------------------------- DINOv2 (facebookresearch)
def _dinov2_invert(key: str, shape: tuple[int, ...]):
    return re.sub(r"^(blocks\.\d+\.mlp)\.fc1\.", r"\1.w12.", re.sub(r"^(blocks\.\d+\.mlp)\.fc2\.", r"\1.w3.", key)), shape


def _dinov2_extra(model) -> dict[str, torch.Tensor]:
    return {"mask_token": torch.zeros(1, model.embed_dim)}


# --------------------------------------------------------------------------- DaViT (dingmyu/davit, Microsoft)
def _davit_invert(key: str, shape: tuple[int, ...]):
    k = key
    m = re.fullmatch(r"stem\.(conv|norm)\.(.*)", k)
    if m:
        return f"patch_embeds.0.{'proj' if m.group(1) == 'conv' else 'norm'}.{m.group(2)}", shape
    m = re.fullmatch(r"stages\.(\d+)\.downsample\.(conv|norm)\.(.*)", k)
    if m:
        return f"patch_embeds.{m.group(1)}.{'proj' if m.group(2) == 'conv' else 'norm'}.{m.group(3)}", shape
    k = re.sub(r"^stages\.(\d+)\.blocks\.", r"main_blocks.\1.", k)
    k = k.replace(".cpe1.", ".cpe.0.").replace(".cpe2.", ".cpe.1.")
    if k.startswith("head.fc."):
        return "head." + k[len("head.fc."):], shape
    if k.startswith("head.norm."):
        return "norms." + k[len("head.norm."):], shape
    return k, shape


# --------------------------------------------------------------------------- EfficientFormer (snap-research)
def _efficientformer_invert(key: str, shape: tuple[int, ...]):
    """Flat ``network.N`` (stage blocks and downsamplings interleaved), ``patch_embed.0/1/3/4`` stem."""
    k = key
    m = re.fullmatch(r"stem\.(conv|norm)(\d)\.(.*)", k)
    if m:
        index = {("conv", "1"): 0, ("norm", "1"): 1, ("conv", "2"): 3, ("norm", "2"): 4}[(m.group(1), m.group(2))]
        return f"patch_embed.{index}.{m.group(3)}", shape
    m = re.fullmatch(r"stages\.(\d+)\.downsample\.(conv|norm)\.(.*)", k)
    if m:
        return f"network.{2 * int(m.group(1)) - 1}.{'proj' if m.group(2) == 'conv' else 'norm'}.{m.group(3)}", shape
    m = re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.*)", k)
    if m:
        rest = re.sub(r"^ls(\d)\.gamma$", r"layer_scale_\1", m.group(3))
        return f"network.{2 * int(m.group(1))}.{m.group(2)}.{rest}", shape
    if k.startswith("head_dist."):
        return "dist_head." + k[len("head_dist."):], shape
    return k, shape


# --------------------------------------------------------------------------- EdgeNeXt (mmaaz60/EdgeNeXt)
def _edgenext_invert(key: str, shape: tuple[int, ...]):
    k = key
    if k.startswith("stem."):
        return "downsample_layers.0." + k[len("stem."):], shape
    m = re.fullmatch(r"stages\.(\d+)\.downsample\.(.*)", k)
    if m:
        return f"downsample_layers.{m.group(1)}.{m.group(2)}", shape
    m = re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.*)", k)
    if m:
        rest = m.group(3).replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        return f"stages.{m.group(1)}.{m.group(2)}.{rest}", shape
    if k.startswith("head.fc."):
        return "head." + k[len("head.fc."):], shape
    if k.startswith("head.norm."):
        return "norm." + k[len("head.norm."):], shape
    return k, shape


# --------------------------------------------------------------------------- MViTv2 (facebookresearch/mvit)
_MVIT_DEPTHS = (1, 2, 5, 2)  # mvitv2_tiny


def _mvitv2_invert(key: str, shape: tuple[int, ...]):
    """One flat ``blocks.N`` across the stages; the attention-expanding shortcut is ``blocks.N.proj``."""
    m = re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.*)", key)
    if m:
        index = sum(_MVIT_DEPTHS[:int(m.group(1))]) + int(m.group(2))
        rest = "proj." + m.group(3)[len("shortcut_proj_attn."):] if m.group(3).startswith("shortcut_proj_attn.") \
            else m.group(3)
        return f"blocks.{index}.{rest}", shape
    if key.startswith("head.fc."):
        return "head.projection." + key[len("head.fc."):], shape
    return key, shape


_VIT = {"embed_dim": 48, "depth": 2, "num_heads": 3}

TIMM: tuple[TimmSpec, ...] = (
    TimmSpec("timm_convnext_fb", "facebookresearch/ConvNeXt (`downsample_layers`, `dwconv`, `pwconv1/2`, Linear MLP)",
             "convnext_atto", {}, "timm.models.convnext:checkpoint_filter_fn", _convnext_invert),
    TimmSpec("timm_swin_ms", "microsoft/Swin-Transformer (downsample at the end of each stage, buffers kept)",
             "swin_tiny_patch4_window7_224", {"embed_dim": 32, "depths": (1, 1, 2, 1), "num_heads": (1, 2, 4, 8)},
             "timm.models.swin_transformer:checkpoint_filter_fn", _swin_invert, _swin_extra),
    TimmSpec("timm_pvt_v2", "whai362/PVT v2 (`patch_embed1..4`, `block1..4`, `norm1..4`, `dwconv.dwconv`)",
             "pvt_v2_b0", {}, "timm.models.pvt_v2:checkpoint_filter_fn", _pvt_invert),
    TimmSpec("timm_poolformer_v1", "sail-sg/poolformer (flat `network.N`, stages and downsamplings interleaved)",
             "poolformer_s12", {}, "timm.models.metaformer:checkpoint_filter_fn", _poolformer_invert),
    TimmSpec("timm_vit_openai_clip", "openai/CLIP, whole model (`visual.*` + a text tower the filter drops)",
             "vit_base_patch32_clip_224", dict(_VIT, embed_dim=64, num_heads=4, num_classes=32, img_size=64),
             "timm.models.vision_transformer:checkpoint_filter_fn", _clip_invert, _clip_text_tower),
    TimmSpec("timm_vit_dinov2", "facebookresearch/dinov2, SwiGLU as in ViT-g (`mlp.w12` / `w3`, `mask_token` dropped)",
             "vit_small_patch14_dinov2", {**_VIT, "img_size": 56, "mlp_ratio": 2.66667 * 2, "mlp_layer": "swiglu"},
             "timm.models.vision_transformer:checkpoint_filter_fn", _dinov2_invert, _dinov2_extra),
    TimmSpec("timm_deit3_fb", "facebookresearch/deit, DeiT III (layer scale as `blocks.N.gamma_1/2`)",
             "deit3_small_patch16_224", {**_VIT, "img_size": 64},
             "timm.models.deit:checkpoint_filter_fn(adapt_layer_scale=True)",
             lambda k, s: (re.sub(r"^(blocks\.\d+)\.ls(\d)\.gamma$", r"\1.gamma_\2", k), s)),
    TimmSpec("timm_beit_unilm", "microsoft/unilm BEiT (every attention's `relative_position_index` kept)",
             "beit_base_patch16_224", {**_VIT, "img_size": 64},
             "timm.models.beit:checkpoint_filter_fn", lambda k, s: (k, s), _swin_extra),
    TimmSpec("timm_regnety_tv", "torchvision regnet_y_400mf (`trunk_output.blockS.blockS-B`, `f.a/b/c`, `proj`)",
             "regnety_004", {}, "timm.models.regnet:_filter_fn", lambda k, s: (k, s),
             source_model="torchvision.models:regnet_y_400mf", with_model=False),
    TimmSpec("timm_regnetx_tv", "torchvision regnet_x_400mf (`trunk_output.blockS.blockS-B`, `f.a/b/c`, `proj`)",
             "regnetx_004_tv", {}, "timm.models.regnet:_filter_fn", lambda k, s: (k, s),
             source_model="torchvision.models:regnet_x_400mf", with_model=False),
    TimmSpec("timm_vit_ijepa", "facebookresearch/ijepa (`{'encoder': {'module.' + key}}`)",
             "vit_huge_patch14_gap_224", dict(_VIT, img_size=56),
             "timm.models.vision_transformer:checkpoint_filter_fn", lambda k, s: ("module." + k, s),
             wrap=lambda sd: {"encoder": sd}),
    # added after the matcher was tuned (not tuned on)
    TimmSpec("timm_davit_ms", "dingmyu/davit (`patch_embeds.S.proj/norm`, `main_blocks.S.B.N`, `cpe.0/1`, `norms`)",
             "davit_tiny", {"embed_dims": (16, 32, 64, 128), "num_heads": (1, 2, 4, 8), "depths": (1, 1, 2, 1)},
             "timm.models.davit:checkpoint_filter_fn", _davit_invert),
    TimmSpec("timm_efficientformer_snap", "snap-research/EfficientFormer (flat `network.N`, `patch_embed.0/1/3/4`, "
             "`layer_scale_1/2`, `dist_head`)", "efficientformer_l1",
             {"depths": (1, 1, 2, 2), "embed_dims": (16, 32, 48, 64), "num_vit": 1},
             "timm.models.efficientformer:checkpoint_filter_fn", _efficientformer_invert),
    TimmSpec("timm_edgenext_orig", "mmaaz60/EdgeNeXt (`downsample_layers`, `dwconv`, `pwconv1/2`, `norm` -> `head.norm`)",
             "edgenext_xx_small", {}, "timm.models.edgenext:checkpoint_filter_fn", _edgenext_invert),
    TimmSpec("timm_mvitv2_fb", "facebookresearch/mvit MViTv2 (flat `blocks.N` across stages, `proj` shortcut, "
             "`head.projection`)", "mvitv2_tiny", {"img_size": 64},
             "timm.models.mvitv2:checkpoint_filter_fn", _mvitv2_invert),
)


def _load(path: str):
    """``module:function`` or ``module:function(keyword=True)`` (a partial with literal keywords)."""
    import ast
    import functools

    module, fn = path.split(":")
    kwargs = {}
    if "(" in fn:
        fn, args = fn[:-1].split("(", 1)
        kwargs = {k: ast.literal_eval(v) for k, v in (a.split("=") for a in args.split(","))}
    f = getattr(__import__(module, fromlist=[fn]), fn)
    return functools.partial(f, **kwargs) if kwargs else f


def _kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Model keyword arguments; ``mlp_layer="swiglu"`` is ViT-g's packed SwiGLU (``SwiGLUPacked``, SiLU)."""
    out = dict(kwargs)
    if out.get("mlp_layer") == "swiglu":
        from timm.layers import SwiGLUPacked

        out["mlp_layer"] = SwiGLUPacked
        out["act_layer"] = torch.nn.SiLU
    return out


def _builder(spec: TimmSpec, ZooCase):
    def build():
        import timm

        torch.manual_seed(0)
        kwargs = _kwargs(spec.kwargs)
        target = timm.create_model(spec.model, pretrained=False, **kwargs).eval()
        filter_fn = _load(spec.filter_fn)
        source_sd: dict[str, torch.Tensor] = {}
        source_model = None
        if spec.source_model is not None:
            source_model = _load(spec.source_model)().eval()
            source_sd = dict(source_model.state_dict())
        for key, value in target.state_dict().items() if source_model is None else ():
            inv = spec.invert(key, tuple(value.shape))
            if inv is None:
                continue
            src_key, src_shape = inv
            if src_key in source_sd:
                raise ValueError(f"{spec.name}: two target keys invert to {src_key!r}")
            source_sd[src_key] = (torch.randn(src_shape) if value.is_floating_point()
                                  else value.clone().reshape(src_shape))
        for key, value in spec.extra(target).items():
            source_sd.setdefault(key, value)
        model_for_filter = timm.create_model(spec.model, pretrained=False, **kwargs).eval()

        def convert(sd: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
            if spec.with_model:
                return filter_fn(spec.wrap(dict(sd)), model_for_filter)
            return filter_fn(spec.wrap(dict(sd)))

        return ZooCase(source_sd, target, convert, source_model)

    return build


# --------------------------------------------------------------------------- BiT (google-research, JAX .npz)
def _bit_model():
    """A small BiT ResNetV2 (weight-standardised convs, GroupNorm, conv head), as timm's ``resnetv2_*_bit``."""
    import functools

    from timm.layers import StdConv2d
    from timm.models.resnetv2 import ResNetV2

    torch.manual_seed(0)
    return ResNetV2(layers=[1, 1, 1, 1], channels=(128, 256, 512, 1024), num_classes=10, stem_type="fixed",
                    conv_layer=functools.partial(StdConv2d, eps=1e-8)).eval()


def _hwio(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The JAX kernel layout [H, W, in, out] of a torch conv weight [out, in, H, W]."""
    o, i, h, w = shape
    return h, w, i, o


def _bit_layout(model, prefix: str = "resnet/") -> dict[str, tuple[int, ...]]:
    """The keys and shapes of a BiT ``.npz`` for ``model``: what ``resnetv2._load_weights`` reads."""
    out = {f"{prefix}root_block/standardized_conv2d/kernel": _hwio(tuple(model.stem.conv.weight.shape))}
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage.blocks):
            bp = f"{prefix}block{i + 1}/unit{j + 1:02d}/"
            for part, n in (("a", 1), ("b", 2), ("c", 3)):
                out[f"{bp}{part}/standardized_conv2d/kernel"] = _hwio(tuple(getattr(block, f"conv{n}").weight.shape))
                norm = getattr(block, f"norm{n}")
                out[f"{bp}{part}/group_norm/gamma"] = tuple(norm.weight.shape)
                out[f"{bp}{part}/group_norm/beta"] = tuple(norm.bias.shape)
            if block.downsample is not None:
                out[f"{bp}a/proj/standardized_conv2d/kernel"] = _hwio(tuple(block.downsample.conv.weight.shape))
    out[f"{prefix}group_norm/gamma"] = tuple(model.norm.weight.shape)
    out[f"{prefix}group_norm/beta"] = tuple(model.norm.bias.shape)
    out[f"{prefix}head/conv2d/kernel"] = _hwio(tuple(model.head.fc.weight.shape))
    out[f"{prefix}head/conv2d/bias"] = tuple(model.head.fc.bias.shape)
    return out


# --------------------------------------------------------------------------- ViT (google-research/vision_transformer, JAX .npz)
def _vit_jax_model():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", pretrained=False, embed_dim=48, depth=2, num_heads=3,
                             img_size=32, patch_size=8, num_classes=10).eval()


def _vit_jax_layout(model) -> dict[str, tuple[int, ...]]:
    """The keys and shapes of an AugReg ViT ``.npz`` for ``model``: what ``vision_transformer._load_weights`` reads."""
    d = model.embed_dim
    heads = model.blocks[0].attn.num_heads
    hd = d // heads
    hidden = model.blocks[0].mlp.fc1.weight.shape[0]
    out = {"embedding/kernel": _hwio(tuple(model.patch_embed.proj.weight.shape)), "embedding/bias": (d,),
           "cls": tuple(model.cls_token.shape),
           "Transformer/posembed_input/pos_embedding": tuple(model.pos_embed.shape)}
    for i in range(len(model.blocks)):
        bp = f"Transformer/encoderblock_{i}/"
        mha = bp + "MultiHeadDotProductAttention_1/"
        out.update({bp + "LayerNorm_0/scale": (d,), bp + "LayerNorm_0/bias": (d,)})
        for n in ("query", "key", "value"):
            out[f"{mha}{n}/kernel"] = (d, heads, hd)
            out[f"{mha}{n}/bias"] = (heads, hd)
        out.update({mha + "out/kernel": (heads, hd, d), mha + "out/bias": (d,),
                    bp + "LayerNorm_2/scale": (d,), bp + "LayerNorm_2/bias": (d,),
                    bp + "MlpBlock_3/Dense_0/kernel": (d, hidden), bp + "MlpBlock_3/Dense_0/bias": (hidden,),
                    bp + "MlpBlock_3/Dense_1/kernel": (hidden, d), bp + "MlpBlock_3/Dense_1/bias": (d,)})
    out.update({"Transformer/encoder_norm/scale": (d,), "Transformer/encoder_norm/bias": (d,),
                "head/kernel": (d, model.head.weight.shape[0]), "head/bias": (model.head.weight.shape[0],)})
    return out


def _npz_builder(ZooCase, make_model, layout, loader: str):
    """A JAX ``.npz`` checkpoint in ``layout(model)``, loaded by timm's ``loader(model, path)``."""

    def build():
        import tempfile
        from pathlib import Path

        import numpy as np

        load_weights = _load(loader)
        target = make_model()
        source_sd = {k: torch.randn(shape) for k, shape in layout(target).items()}

        def convert(sd: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
            model = make_model().double()
            with tempfile.TemporaryDirectory(prefix="zoo_npz_") as tmp:
                path = Path(tmp) / "checkpoint.npz"
                np.savez(path, **{k: v.numpy() for k, v in sd.items()})
                with torch.no_grad():
                    load_weights(model, str(path))
            return model.state_dict()

        return ZooCase(source_sd, target, convert, None)

    return build


def timm_pairs(ZooPair, ZooCase) -> list:
    pairs = [ZooPair(s.name, "timm", s.source, f"timm {s.model}", s.filter_fn.replace(":", "."), _builder(s, ZooCase),
                     ("timm", "torchvision") if s.source_model else ("timm",)) for s in TIMM]
    pairs.append(ZooPair(
        "timm_bit_jax", "timm", "google-research/big_transfer JAX `.npz` (`resnet/block1/unit01/a/standardized_conv2d/kernel`, "
        "HWIO kernels)", "timm ResNetV2 (BiT, 4 blocks)", "timm.models.resnetv2._load_weights (HWIO -> OIHW permute)",
        _npz_builder(ZooCase, _bit_model, _bit_layout, "timm.models.resnetv2:_load_weights"), ("timm",)))
    pairs.append(ZooPair(
        "timm_vit_jax", "timm", "google-research/vision_transformer AugReg JAX `.npz` (`Transformer/encoderblock_0/"
        "MultiHeadDotProductAttention_1/query/kernel` [d, heads, head_dim]...)", "timm vit_base_patch16_224 (small)",
        "timm.models.vision_transformer._load_weights (q, k, v kernels flattened, transposed and concatenated)",
        _npz_builder(ZooCase, _vit_jax_model, _vit_jax_layout, "timm.models.vision_transformer:_load_weights"),
        ("timm",)))
    return pairs
