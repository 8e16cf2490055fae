"""The zoo's pairs: a source checkpoint layout, a target model, and the converter its maintainers wrote.

Every pair is a :class:`ZooPair` in :data:`ZOO`. Its ``build()`` returns a :class:`ZooCase`:

- ``source_sd``: the source checkpoint (random values) in the layout the converter reads, in the
  order its own model defines the tensors where that model is at hand;
- ``target``: the target model, random init (the model the matcher is asked to fill);
- ``convert``: the maintainers' converter, as code: ``state dict in the source layout ->
  state dict in the target layout``. The benchmark runs it on tracer values
  (:mod:`benchmarks.accuracy.tracer`) to read the ground truth;
- ``source_model``: the model the source checkpoint comes from, where it is at hand.

Families (where the ground truth comes from):

- ``torchvision``: a classification model's checkpoint, fed to torchvision's *public* detection /
  segmentation builders as their ``weights_backbone`` (the builder's download is replaced by our
  state dict; everything else is torchvision's code). The target has heads the classifier lacks:
  a partial target.
- ``transformers``: transformers 5 saves the *legacy* on-disk layout of a model
  (``save_pretrained``'s ``revert_weight_conversion``) and converts it back when loading; we save
  that layout in a local folder and ``from_pretrained`` it (per-expert MoE -> fused experts,
  BERT-era attention names -> ``q_proj``...).
- ``torchtune``: torchtune 0.6.1's ``convert_weights`` (``hf_to_tune``, ``meta_to_tune``,
  ``tune_to_hf``, ``qwen2_hf_to_tune``, ``phi3_hf_to_tune``...), including the rotary permutation of
  q/k between Hugging Face and Meta / torchtune layouts that no rename can reproduce. Black
  Forest Labs' Flux autoencoder is not installed: its layout is built by inverting
  ``flux_ae_hf_to_tune`` (:func:`_flux_bfl_key`), as the timm layouts are.
- ``timm``: timm's ``checkpoint_filter_fn``s, which take the original repositories' checkpoints.
  The original models are not installed, so the source layout is built by inverting the filter
  (:mod:`benchmarks.accuracy.zoo_timm`); the benchmark checks that running the filter on it gives
  back the target's keys and shapes exactly, and reads the ground truth from the filter alone.

Small configurations throughout, so the zoo runs in minutes on 2 cores.

Pairs marked "added after the matcher was tuned" were put in the zoo after the matcher reached
zero unflagged wrong entries on the others, to test whether that holds on pairs it was not
tuned on (see the zoo section of ``benchmarks/README.md``).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["ZOO", "ZooCase", "ZooPair", "zoo_pairs"]


@dataclass
class ZooCase:
    """One pair, built: see the module docstring."""

    source_sd: dict[str, torch.Tensor]
    target: nn.Module
    convert: Callable[[dict[str, torch.Tensor]], Mapping[str, torch.Tensor]]
    source_model: nn.Module | None = None
    # target keys the converter leaves to the target's own init although they are not heads
    # (buffers recomputed at load); informational only
    notes: list[str] = field(default_factory=list)
    # Where the converter is demonstrably wrong and ``convert`` corrects it: what was corrected,
    # and the forward-pass evidence measured when the case was built (see _tt_gemma2).
    errata: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ZooPair:
    """One zoo pair.

    Attributes:
        name: Id on the command line.
        family: ``torchvision``, ``transformers``, ``torchtune`` or ``timm``.
        source, target: What the two layouts are.
        truth: The converter the ground truth comes from (a dotted name or a call).
        build: Returns a fresh :class:`ZooCase`.
        requires: Modules that must import.
    """

    name: str
    family: str
    source: str
    target: str
    truth: str
    build: Callable[[], ZooCase]
    requires: tuple[str, ...] = ()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _as_float64(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(v.dtype == torch.float64 for v in sd.values())


# ============================================================================ torchvision
@contextlib.contextmanager
def _serving(state_dict: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Make every torchvision ``Weights.get_state_dict()`` return ``state_dict`` instead of downloading."""
    from torchvision.models._api import WeightsEnum

    original = WeightsEnum.get_state_dict
    WeightsEnum.get_state_dict = lambda self, *a, **k: {k2: v.clone() for k2, v in state_dict.items()}
    try:
        yield
    finally:
        WeightsEnum.get_state_dict = original


@contextlib.contextmanager
def _zero_init() -> Iterator[None]:
    """Initialise new parameters with zeros instead of random draws (the heads of a 40M-parameter
    detector take seconds to draw). The values of the target model never matter here: the mapper
    reads its names, shapes and structure, and the converter's output is read for tracer values,
    which zeros are not."""
    from torch.nn import init

    names = [n for n in dir(init) if n.endswith("_") and not n.startswith("_") and callable(getattr(init, n))]
    saved = {n: getattr(init, n) for n in names}

    def zero(tensor, *args, **kwargs):
        with torch.no_grad():
            return tensor.zero_()

    for n in names:
        setattr(init, n, zero)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(init, n, f)


def _torchvision(classifier: str, weights: str, builder: str, **kwargs: Any) -> Callable[[], ZooCase]:
    """``classifier`` weights as ``weights_backbone`` of the public ``builder`` (detection / segmentation)."""

    def build() -> ZooCase:
        import torchvision.models as tvm
        import torchvision.models.detection as tvd
        import torchvision.models.segmentation as tvs

        make = getattr(tvd, builder, None) or getattr(tvs, builder)
        weights_enum = getattr(tvm, weights).IMAGENET1K_V1
        source_model = getattr(tvm, classifier)()
        source_model.eval()
        source_sd = source_model.state_dict()

        def run(sd: Mapping[str, torch.Tensor]) -> nn.Module:
            with _default_dtype(torch.float64 if _as_float64(sd) else torch.float32), _serving(sd), _zero_init():
                model = make(weights=None, weights_backbone=weights_enum, **kwargs)
            return model.eval()

        target = run(source_sd)
        return ZooCase(dict(source_sd), target, lambda sd: run(sd).state_dict(), source_model)

    return build


_TV = [
    ("tv_fasterrcnn_r50", "resnet50", "ResNet50_Weights", "fasterrcnn_resnet50_fpn", {}),
    ("tv_maskrcnn_r50", "resnet50", "ResNet50_Weights", "maskrcnn_resnet50_fpn", {}),
    ("tv_keypointrcnn_r50", "resnet50", "ResNet50_Weights", "keypointrcnn_resnet50_fpn", {}),
    ("tv_retinanet_r50", "resnet50", "ResNet50_Weights", "retinanet_resnet50_fpn", {}),
    ("tv_fcos_r50", "resnet50", "ResNet50_Weights", "fcos_resnet50_fpn", {}),
    ("tv_fcn_r50", "resnet50", "ResNet50_Weights", "fcn_resnet50", {}),
    ("tv_deeplabv3_r50", "resnet50", "ResNet50_Weights", "deeplabv3_resnet50", {}),
    ("tv_fasterrcnn_mbv3", "mobilenet_v3_large", "MobileNet_V3_Large_Weights", "fasterrcnn_mobilenet_v3_large_fpn", {}),
    ("tv_deeplabv3_mbv3", "mobilenet_v3_large", "MobileNet_V3_Large_Weights", "deeplabv3_mobilenet_v3_large", {}),
    ("tv_lraspp_mbv3", "mobilenet_v3_large", "MobileNet_V3_Large_Weights", "lraspp_mobilenet_v3_large", {}),
    ("tv_ssdlite_mbv3", "mobilenet_v3_large", "MobileNet_V3_Large_Weights", "ssdlite320_mobilenet_v3_large", {}),
    # added after the matcher was tuned (not tuned on): the v2 builders keep trainable BatchNorm
    # (running statistics and num_batches_tracked in the target) and add convs / norms to the heads
    ("tv_fasterrcnn_r50_v2", "resnet50", "ResNet50_Weights", "fasterrcnn_resnet50_fpn_v2", {}),
    ("tv_maskrcnn_r50_v2", "resnet50", "ResNet50_Weights", "maskrcnn_resnet50_fpn_v2", {}),
    ("tv_retinanet_r50_v2", "resnet50", "ResNet50_Weights", "retinanet_resnet50_fpn_v2", {}),
]


# ============================================================================ transformers
def _hf_legacy(config_cls: str, model_cls: str, **config: Any) -> Callable[[], ZooCase]:
    """transformers 5's legacy on-disk layout of ``model_cls`` -> the model, via ``from_pretrained``."""

    def build() -> ZooCase:
        import transformers
        from transformers.core_model_loading import revert_weight_conversion

        cfg = getattr(transformers, config_cls)(**config)
        cls = getattr(transformers, model_cls)
        torch.manual_seed(0)
        target = cls(cfg).eval()
        legacy = revert_weight_conversion(target, dict(target.state_dict()))
        source_sd = {k: v.detach().clone().contiguous() for k, v in legacy.items()}

        def convert(sd: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
            from safetensors.torch import save_file

            with tempfile.TemporaryDirectory(prefix="zoo_hf_") as tmp:
                cfg.save_pretrained(tmp)
                save_file({k: v.contiguous() for k, v in sd.items()}, str(Path(tmp) / "model.safetensors"),
                          metadata={"format": "pt"})
                dtype = torch.float64 if _as_float64(sd) else torch.float32
                with _quiet():
                    model = cls.from_pretrained(tmp, dtype=dtype)
            return model.state_dict()

        return ZooCase(source_sd, target, convert, None)

    return build


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No loading progress bars from transformers."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


_LM = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "tie_word_embeddings": False}
_MOE = dict(_LM, moe_intermediate_size=24)
_VIT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48, "image_size": 32,
            "patch_size": 8}
_HF = [
    ("hf_mixtral", "MixtralConfig", "MixtralForCausalLM", dict(_LM, num_local_experts=4, num_experts_per_tok=2),
     "per-expert `block_sparse_moe.experts.N.w1/w2/w3` -> fused `mlp.experts.gate_up_proj` / `down_proj`"),
    ("hf_qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
     dict(_MOE, num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=40),
     "per-expert `mlp.experts.N.gate_proj/up_proj/down_proj` -> fused experts, beside a shared expert"),
    ("hf_qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(_MOE, num_experts=4, num_experts_per_tok=2),
     "per-expert -> fused experts; q_norm / k_norm"),
    ("hf_olmoe", "OlmoeConfig", "OlmoeForCausalLM", dict(_LM, num_experts=4, num_experts_per_tok=2),
     "per-expert -> fused experts"),
    ("hf_deepseek_v3", "DeepseekV3Config", "DeepseekV3ForCausalLM",
     dict(_MOE, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
          q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1,
          topk_group=1, num_key_value_heads=4),
     "per-expert -> fused experts, one dense layer first, MLA attention"),
    ("hf_phimoe", "PhimoeConfig", "PhimoeForCausalLM", dict(_LM, num_local_experts=4, num_experts_per_tok=2),
     "`block_sparse_moe` -> `mlp`, `gate` -> `router`, per-expert -> fused"),
    ("hf_granitemoe", "GraniteMoeConfig", "GraniteMoeForCausalLM", {**_LM, "num_local_experts": 4, "num_experts_per_tok": 2},
     "fused `block_sparse_moe.input_linear` / `output_linear` -> `experts.gate_up_proj` / `down_proj` (renames)"),
    ("hf_lfm2_moe", "Lfm2MoeConfig", "Lfm2MoeForCausalLM",
     {**_MOE, "num_experts": 4, "num_experts_per_tok": 2, "num_dense_layers": 1, "layer_types": ["full_attention", "conv"]},
     "per-expert `feed_forward.experts.N.w1/w2/w3` -> fused, beside short convolutions"),
    ("hf_vit", "ViTConfig", "ViTModel", dict(_VIT),
     "BERT-era names (`encoder.layer.N.attention.attention.query`...) -> `layers.N.q_proj`..."),
    ("hf_dinov2_swiglu", "Dinov2Config", "Dinov2Model", dict(_VIT, use_swiglu_ffn=True, mlp_ratio=2),
     "`attention.attention.query` -> `q_proj`...; the fused SwiGLU `weights_in` is split into gate / up"),
    ("hf_vitmae", "ViTMAEConfig", "ViTMAEForPreTraining",
     dict(_VIT, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
          decoder_intermediate_size=24),
     "encoder and decoder layers renamed alike"),
    ("hf_swin", "SwinConfig", "SwinModel",
     {"image_size": 32, "patch_size": 4, "embed_dim": 16, "depths": [1, 2], "num_heads": [2, 4], "window_size": 4},
     "`attention.self.query` -> `attention.q_proj`..., relative position bias table moved"),
    ("hf_segformer", "SegformerConfig", "SegformerModel",
     {"num_encoder_blocks": 2, "depths": [1, 1], "sr_ratios": [2, 1], "hidden_sizes": [16, 32], "num_attention_heads": [1, 2],
          "patch_sizes": [7, 3], "strides": [4, 2], "mlp_ratios": [2, 2], "decoder_hidden_size": 32},
     "per-stage lists (`encoder.block.S.B`) -> `stages.S.blocks.B`; `layer_norm_1/2` -> `layernorm_before/after`"),
    ("hf_gpt_neox", "GPTNeoXConfig", "GPTNeoXForCausalLM",
     {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
          "tie_word_embeddings": False},
     "`embed_out` -> `lm_head`: one rename"),
    # added after the matcher was tuned (not tuned on)
    ("hf_glm4_moe", "Glm4MoeConfig", "Glm4MoeForCausalLM",
     dict(_MOE, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
          topk_group=1, head_dim=8),
     "per-expert -> fused experts, one dense layer first, a shared expert"),
    ("hf_ernie4_5_moe", "Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM",
     dict(_MOE, moe_num_experts=4, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1),
     "per-expert -> fused experts; `gate.moe_statics.e_score_correction_bias` moved"),
    ("hf_videomae", "VideoMAEConfig", "VideoMAEModel", dict(_VIT, num_frames=4, tubelet_size=2),
     "`attention.attention.q_bias` / `v_bias` (bare parameters) -> `query.bias` / `value.bias` (the key has no bias)"),
    ("hf_llava", "LlavaConfig", "LlavaForConditionalGeneration",
     {"text_config": dict(_LM, model_type="llama"), "image_token_index": 95, "tie_word_embeddings": False,
      "vision_config": dict(_VIT, model_type="clip_vision_model", intermediate_size=64, projection_dim=16)},
     ("`language_model.model.*` -> `model.language_model.*`, `language_model.lm_head` -> `lm_head`, "
      "`vision_tower` -> `model.vision_tower` (two towers of the same width)")),
]


# ============================================================================ torchtune
_TT = {"vocab_size": 96, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "embed_dim": 32, "max_seq_len": 64}


def _tt_llama(hf_cls: str = "LlamaForCausalLM", cfg_cls: str = "LlamaConfig"):
    import transformers

    cfg = getattr(transformers, cfg_cls)(
        vocab_size=_TT["vocab_size"], hidden_size=_TT["embed_dim"], intermediate_size=48,
        num_hidden_layers=_TT["num_layers"], num_attention_heads=_TT["num_heads"],
        num_key_value_heads=_TT["num_kv_heads"], tie_word_embeddings=False)
    torch.manual_seed(0)
    return getattr(transformers, hf_cls)(cfg).eval()


def _tune_llama3() -> nn.Module:
    from torchtune.models.llama3 import llama3

    torch.manual_seed(0)
    return llama3(intermediate_dim=48, **_TT).eval()


_HEADS = {"num_heads": _TT["num_heads"], "num_kv_heads": _TT["num_kv_heads"], "dim": _TT["embed_dim"]}


def _tt_hf_to_tune() -> ZooCase:
    from torchtune.models.convert_weights import hf_to_tune

    hf = _tt_llama()
    return ZooCase(dict(hf.state_dict()), _tune_llama3(), lambda sd: hf_to_tune(dict(sd), **_HEADS), hf)


def _tt_tune_to_hf() -> ZooCase:
    from torchtune.models.convert_weights import tune_to_hf

    tune = _tune_llama3()
    return ZooCase(dict(tune.state_dict()), _tt_llama(), lambda sd: tune_to_hf(dict(sd), **_HEADS), tune)


def _tt_meta_to_tune() -> ZooCase:
    from torchtune.models.convert_weights import meta_to_tune, tune_to_meta

    target = _tune_llama3()
    source_sd = {k: v.clone() for k, v in tune_to_meta(dict(target.state_dict())).items()}
    return ZooCase(source_sd, target, lambda sd: meta_to_tune(dict(sd)), None)


def _tt_tune_to_meta() -> ZooCase:
    """torchtune -> Meta's reference layout; the target is Meta's names as a shapes-only model."""
    from torchtune.models.convert_weights import tune_to_meta

    tune = _tune_llama3()
    meta_shapes = tune_to_meta(dict(tune.state_dict()))
    return ZooCase(dict(tune.state_dict()), _ShapesModule(meta_shapes), lambda sd: tune_to_meta(dict(sd)), tune)


def _tt_qwen2() -> ZooCase:
    from torchtune.models.qwen2 import qwen2
    from torchtune.models.qwen2._convert_weights import qwen2_hf_to_tune

    hf = _tt_llama("Qwen2ForCausalLM", "Qwen2Config")
    torch.manual_seed(0)
    target = qwen2(intermediate_dim=48, tie_word_embeddings=False, **_TT).eval()
    return ZooCase(dict(hf.state_dict()), target, lambda sd: qwen2_hf_to_tune(dict(sd), **_HEADS), hf)


def _hf_phi3() -> nn.Module:
    """A small HF Phi3ForCausalLM of the torchtune pairs' sizes (fused ``qkv_proj``, ``gate_up_proj``)."""
    import transformers

    cfg = transformers.Phi3Config(
        vocab_size=_TT["vocab_size"], hidden_size=_TT["embed_dim"], intermediate_size=48,
        num_hidden_layers=_TT["num_layers"], num_attention_heads=_TT["num_heads"],
        num_key_value_heads=_TT["num_kv_heads"], tie_word_embeddings=False, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.Phi3ForCausalLM(cfg).eval()


def _tt_phi3() -> ZooCase:
    from torchtune.models.phi3 import phi3
    from torchtune.models.phi3._convert_weights import phi3_hf_to_tune

    hf = _hf_phi3()
    torch.manual_seed(0)
    target = phi3(intermediate_dim=48, **_TT).eval()
    return ZooCase(dict(hf.state_dict()), target, lambda sd: phi3_hf_to_tune(dict(sd), **_HEADS), hf)


def _tt_gemma2() -> ZooCase:
    import transformers
    from torchtune.models.gemma2 import gemma2
    from torchtune.models.gemma2._convert_weights import gemma2_hf_to_tune

    head_dim = 8
    cfg = transformers.Gemma2Config(
        vocab_size=_TT["vocab_size"], hidden_size=_TT["embed_dim"], intermediate_size=48,
        num_hidden_layers=_TT["num_layers"], num_attention_heads=_TT["num_heads"],
        num_key_value_heads=_TT["num_kv_heads"], head_dim=head_dim, sliding_window=16)
    torch.manual_seed(0)
    hf = transformers.Gemma2ForCausalLM(cfg).eval()
    torch.manual_seed(0)
    target = gemma2(vocab_size=_TT["vocab_size"], num_layers=_TT["num_layers"], num_heads=_TT["num_heads"],
                    head_dim=head_dim, num_kv_heads=_TT["num_kv_heads"], embed_dim=_TT["embed_dim"],
                    intermediate_dim=48, max_seq_len=64, sliding_window_size=16).eval()
    def convert(sd):
        return gemma2_hf_to_tune(dict(sd), head_dim=head_dim, **_HEADS)

    erratum = _gemma2_ffn_norms_erratum(hf, target, convert)
    return ZooCase(dict(hf.state_dict()), target, lambda sd: _swap_ffn_norms(convert(sd)), hf, errata=[erratum])


def _swap_ffn_norms(converted: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each layer's ``mlp_norm`` and ``mlp_scale`` exchanged."""
    out = dict(converted)
    for key in converted:
        if key.endswith(".mlp_norm.scale"):
            other = key.replace(".mlp_norm.", ".mlp_scale.")
            out[key], out[other] = converted[other], converted[key]
    return out


def _gemma2_ffn_norms_erratum(hf: nn.Module, target: nn.Module, convert) -> str:
    """torchtune 0.6.1's ``gemma2_hf_to_tune`` swaps the feed-forward norms; prove it, or fail.

    Its table sends ``post_feedforward_layernorm`` to ``mlp_norm`` and ``pre_feedforward_layernorm``
    to ``mlp_scale``; torchtune's own layer applies ``mlp_norm`` *before* the MLP and ``mlp_scale``
    to its output (``TransformerSelfAttentionLayer.forward``), as Hugging Face applies
    ``pre_feedforward_layernorm`` before and ``post_feedforward_layernorm`` after. With the norms
    given distinct values, the logits of both models are compared under the converter's table and
    under the table with the two norms exchanged; the zoo's truth is the exchanged one only while
    that is the one that computes what the source computes (this raises otherwise, e.g. once
    torchtune fixes its table).
    """
    import copy

    src, tgt = copy.deepcopy(hf).eval(), copy.deepcopy(target).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in src.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        ids = torch.randint(0, _TT["vocab_size"], (1, 12), generator=gen)
        reference = src(ids).logits
        diffs = {}
        for label, sd in (("converter", dict(convert(src.state_dict()))),
                          ("norms exchanged", _swap_ffn_norms(convert(src.state_dict())))):
            tgt.load_state_dict({k: v for k, v in sd.items() if k in tgt.state_dict()}, strict=False)
            diffs[label] = float((tgt(ids) - reference).abs().max())
    if not diffs["norms exchanged"] * 10 < diffs["converter"]:
        raise RuntimeError(f"the Gemma-2 feed-forward norm erratum no longer holds: {diffs}")
    return ("torchtune's gemma2_hf_to_tune maps post_feedforward_layernorm -> mlp_norm (applied before the MLP) "
            "and pre_feedforward_layernorm -> mlp_scale (applied after it); the truth here exchanges them. "
            f"Max |logit difference| to the source model: {diffs['converter']:.3g} with the converter's table, "
            f"{diffs['norms exchanged']:.3g} with the norms exchanged (measured at build time, norms randomised)")


def _tt_gemma() -> ZooCase:
    """HF Gemma (tied embedding, head_dim given) -> torchtune gemma, through the generic ``hf_to_tune``
    with ``head_dim`` (what torchtune's checkpointer calls for Gemma 1). The HF checkpoint on disk has
    no ``lm_head.weight`` (tied), so the source holds none."""
    import transformers
    from torchtune.models.convert_weights import hf_to_tune
    from torchtune.models.gemma._component_builders import gemma

    head_dim = 16  # not embed_dim / num_heads (8): Gemma's head_dim is its own
    cfg = transformers.GemmaConfig(
        vocab_size=_TT["vocab_size"], hidden_size=_TT["embed_dim"], intermediate_size=48,
        num_hidden_layers=_TT["num_layers"], num_attention_heads=_TT["num_heads"],
        num_key_value_heads=_TT["num_kv_heads"], head_dim=head_dim)
    torch.manual_seed(0)
    hf = transformers.GemmaForCausalLM(cfg).eval()
    torch.manual_seed(0)
    target = gemma(vocab_size=_TT["vocab_size"], num_layers=_TT["num_layers"], num_heads=_TT["num_heads"],
                   head_dim=head_dim, num_kv_heads=_TT["num_kv_heads"], embed_dim=_TT["embed_dim"],
                   intermediate_dim=48, max_seq_len=64).eval()
    source_sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    return ZooCase(source_sd, target, lambda sd: hf_to_tune(dict(sd), head_dim=head_dim, **_HEADS), hf)


def _tt_mistral() -> ZooCase:
    from torchtune.models.convert_weights import hf_to_tune
    from torchtune.models.mistral._component_builders import mistral

    hf = _tt_llama("MistralForCausalLM", "MistralConfig")
    torch.manual_seed(0)
    target = mistral(intermediate_dim=48, **_TT).eval()
    return ZooCase(dict(hf.state_dict()), target, lambda sd: hf_to_tune(dict(sd), **_HEADS), hf)


def _tt_llama3_2() -> ZooCase:
    """HF Llama 3.2 1B/3B-style checkpoint (tied embedding: no ``lm_head.weight`` on disk) -> torchtune llama3_2."""
    import transformers
    from torchtune.models.convert_weights import hf_to_tune
    from torchtune.models.llama3_2._component_builders import llama3_2

    cfg = transformers.LlamaConfig(
        vocab_size=_TT["vocab_size"], hidden_size=_TT["embed_dim"], intermediate_size=48,
        num_hidden_layers=_TT["num_layers"], num_attention_heads=_TT["num_heads"],
        num_key_value_heads=_TT["num_kv_heads"], tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    torch.manual_seed(0)
    target = llama3_2(intermediate_dim=48, tie_word_embeddings=True, **_TT).eval()
    source_sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    return ZooCase(source_sd, target, lambda sd: hf_to_tune(dict(sd), **_HEADS), hf)


def _tt_phi3_tune_to_hf() -> ZooCase:
    """torchtune phi3 (separate q / k / v, w1 / w3) -> HF Phi3 (fused ``qkv_proj``, ``gate_up_proj``): merges."""
    from torchtune.models.phi3 import phi3
    from torchtune.models.phi3._convert_weights import phi3_tune_to_hf

    hf = _hf_phi3()
    torch.manual_seed(0)
    tune = phi3(intermediate_dim=48, **_TT).eval()
    return ZooCase(dict(tune.state_dict()), hf, lambda sd: phi3_tune_to_hf(dict(sd)), tune)


_FLUX_RESNET = {"main.0": "norm1", "main.2": "conv1", "main.3": "norm2", "main.5": "conv2", "shortcut": "nin_shortcut"}
_FLUX_ATTN = {"attn.q_proj": "q", "attn.k_proj": "k", "attn.v_proj": "v", "attn.output_proj": "proj_out", "norm": "norm"}


def _flux_bfl_key(key: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """A torchtune Flux autoencoder key -> the key and shape Black Forest Labs' ``ae.safetensors`` holds.

    Only a way to *build* the source layout (the BFL model is not installed): the zoo's truth is
    what ``flux_ae_hf_to_tune`` does with it, and the zoo reports any key or shape it produces that
    the torchtune model lacks. BFL's attention projections are 1x1 convs ([C, C, 1, 1]); its ``up``
    blocks are numbered in the reverse of torchtune's order.
    """
    side, section, rest = key.split(".", 2)
    if section == "end":
        index, leaf = rest.split(".", 1)
        return f"{side}.{'norm_out' if index == '0' else 'conv_out'}.{leaf}", shape
    if section == "conv_in":
        return key, shape

    def layer(part: str) -> tuple[str, tuple[int, ...]]:
        for table in (_FLUX_RESNET, _FLUX_ATTN):
            for ours, theirs in table.items():
                if part.startswith(ours + "."):
                    leaf = part[len(ours) + 1:]
                    conv = table is _FLUX_ATTN and ours != "norm" and leaf == "weight"
                    return f"{theirs}.{leaf}", (*shape, 1, 1) if conv else shape
        raise ValueError(f"no BFL name for {key}")

    if section == "mid":
        index, part = rest.split(".", 1)
        name, shp = layer(part)
        return f"{side}.mid.{('block_1', 'attn_1', 'block_2')[int(index)]}.{name}", shp
    level, part = rest.split(".", 1)
    if section == "up":
        level = str(3 - int(level))
    if part.startswith("layers."):
        _, j, inner = part.split(".", 2)
        name, shp = layer(inner)
        return f"{side}.{section}.{level}.block.{j}.{name}", shp
    return f"{side}.{section}.{level}.{part}", shape  # downsample / upsample: unchanged


def _tt_flux_ae() -> ZooCase:
    """Black Forest Labs' Flux autoencoder layout -> torchtune's ``flux_1_autoencoder`` (no source model)."""
    from torchtune.models.flux import flux_1_autoencoder
    from torchtune.models.flux._convert_weights import flux_ae_hf_to_tune

    torch.manual_seed(0)
    target = flux_1_autoencoder(resolution=32, ch_base=32, ch_mults=[1, 1, 2, 2], ch_z=4,
                                n_layers_per_resample_block=1).eval()
    source_sd = {}
    for key, value in target.state_dict().items():
        name, shape = _flux_bfl_key(key, tuple(value.shape))
        source_sd[name] = torch.randn(shape)
    return ZooCase(source_sd, target, lambda sd: flux_ae_hf_to_tune(dict(sd)), None)


def _tt_llama3_2_vision() -> ZooCase:
    """HF Mllama, in the on-disk layout its hub checkpoints have (``language_model.model.*``,
    ``vision_model.*``, ``multi_modal_projector``: what transformers 5 writes back with
    ``revert_weight_conversion``), -> torchtune's Llama 3.2 Vision (a ``DeepFusionModel``).

    The converter interleaves: HF's separate cross-attention layers (1 and 4 of 6) become the
    ``fusion_layer`` of torchtune's layers 1 and 3; it splits the embedding into the text
    vocabulary and 8 learned ``fusion_embedding`` rows, permutes q / k for the rotary embedding,
    and scatters the precomputed tile position embeddings (one row per aspect ratio) into a
    [tiles, tiles, ...] grid with zeros where no ratio fits. No source model: the legacy names are
    not the model's.
    """
    import transformers
    from torchtune.models.llama3_2_vision._component_builders import (
        llama3_2_vision_decoder,
        llama3_2_vision_encoder,
    )
    from torchtune.models.llama3_2_vision._convert_weights import (
        llama3_vision_hf_to_tune,
    )
    from torchtune.modules.model_fusion import DeepFusionModel
    from transformers.core_model_loading import revert_weight_conversion

    ratios = [[1, 1], [1, 2], [2, 1]]
    cross = [1, 4]
    text = {"vocab_size": _TT["vocab_size"], "hidden_size": _TT["embed_dim"], "intermediate_size": 48,
            "num_hidden_layers": 6, "cross_attention_layers": cross, "num_attention_heads": _TT["num_heads"],
            "num_key_value_heads": _TT["num_kv_heads"], "tie_word_embeddings": False, "pad_token_id": 0,
            "bos_token_id": 1, "eos_token_id": 2}
    vision = {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2, "num_global_layers": 1,
              "num_attention_heads": 4, "image_size": 16, "patch_size": 8, "max_num_tiles": 2,
              "intermediate_layers_indices": [0], "supported_aspect_ratios": ratios, "vision_output_dim": 64}
    torch.manual_seed(0)
    hf = transformers.MllamaForConditionalGeneration(transformers.MllamaConfig(text_config=text, vision_config=vision))
    legacy = revert_weight_conversion(hf.eval(), dict(hf.state_dict()))
    source_sd = {k: v.detach().clone().contiguous() for k, v in legacy.items()}
    torch.manual_seed(0)
    encoder = llama3_2_vision_encoder(patch_size=8, num_heads=4, clip_embed_dim=32, clip_num_layers=2,
                                      clip_hidden_states=[0], num_layers_projection=1,
                                      decoder_embed_dim=_TT["embed_dim"], tile_size=16, max_num_tiles=2)
    decoder = llama3_2_vision_decoder(vocab_size=_TT["vocab_size"], num_layers=4, fusion_interval=2,
                                      num_special_tokens=8, num_heads=_TT["num_heads"],
                                      num_kv_heads=_TT["num_kv_heads"], embed_dim=_TT["embed_dim"], max_seq_len=64,
                                      encoder_max_seq_len=10, intermediate_dim=48)
    target = DeepFusionModel(decoder=decoder, encoder=encoder, decoder_trainable=True, encoder_trainable=True,
                             fusion_trainable=True).eval()

    def convert(sd):
        return llama3_vision_hf_to_tune(dict(sd), vocab_size=_TT["vocab_size"], cross_attention_layers=cross,
                                        encoder_dim=32, tile_size=16, num_tiles=2, supported_aspect_ratios=ratios,
                                        **_HEADS)

    return ZooCase(source_sd, target, convert, None)


def _tt_clip_text() -> ZooCase:
    """A whole HF CLIP (text and vision towers, projections) -> torchtune's CLIP text encoder."""
    import transformers
    from torchtune.models.clip._component_builders import clip_text_encoder
    from torchtune.models.clip._convert_weights import clip_text_hf_to_tune

    text = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 16}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 32, "patch_size": 8}
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    torch.manual_seed(0)
    hf = transformers.CLIPModel(cfg).eval()
    torch.manual_seed(0)
    target = clip_text_encoder(embed_dim=32, num_heads=4, num_layers=2, vocab_size=96, max_seq_len=16).eval()
    return ZooCase(dict(hf.state_dict()), target, lambda sd: clip_text_hf_to_tune(dict(sd)), hf)


def _tt_t5_encoder() -> ZooCase:
    """A whole HF T5 (encoder, decoder, tied embedding) -> torchtune's T5 encoder."""
    import transformers
    from torchtune.models.t5._component_builders import t5_encoder
    from torchtune.models.t5._convert_weights import t5_encoder_hf_to_tune

    cfg = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(cfg).eval()
    torch.manual_seed(0)
    target = t5_encoder(embed_dim=32, mlp_dim=64, num_heads=4, head_dim=8, num_layers=2, rel_pos_num_buckets=8,
                        rel_pos_max_dist=16, vocab_size=96, norm_eps=1e-6, max_seq_len=16).eval()
    return ZooCase(dict(hf.state_dict()), target, lambda sd: t5_encoder_hf_to_tune(dict(sd)), hf)


class _ShapesModule(nn.Module):
    """A target given only as names and shapes (a reference layout whose model is not installed).

    Holds one parameter per key (nested modules from the dotted names), so it is a real
    ``nn.Module`` with the layout's state dict; it has no forward.
    """

    def __init__(self, shapes: Mapping[str, torch.Tensor]):
        super().__init__()
        for key, value in shapes.items():
            *path, leaf = key.split(".")
            module: nn.Module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, nn.Module())
                module = getattr(module, part)
            module.register_parameter(leaf, nn.Parameter(torch.zeros(value.shape, dtype=value.dtype),
                                                          requires_grad=False))


# ============================================================================ the zoo
def zoo_pairs() -> list[ZooPair]:
    pairs: list[ZooPair] = []
    for name, clf, weights, builder, kwargs in _TV:
        pairs.append(ZooPair(
            name, "torchvision", f"torchvision {clf} (classification)", f"torchvision {builder} (partial: new heads)",
            f"torchvision.models.detection/segmentation.{builder}(weights_backbone=...)",
            _torchvision(clf, weights, builder, **kwargs), ("torchvision",)))
    for name, cfg_cls, model_cls, config, what in _HF:
        pairs.append(ZooPair(
            name, "transformers", f"legacy on-disk layout of {model_cls}: {what}", f"transformers 5 {model_cls}",
            f"{model_cls}.from_pretrained(local folder)", _hf_legacy(cfg_cls, model_cls, **config), ("transformers",)))
    tt = ("torchtune", "transformers")
    pairs += [
        ZooPair("tt_hf_to_tune_llama", "torchtune", "HF LlamaForCausalLM", "torchtune llama3",
                "torchtune.models.convert_weights.hf_to_tune (q/k rotary permutation)", _tt_hf_to_tune, tt),
        ZooPair("tt_tune_to_hf_llama", "torchtune", "torchtune llama3", "HF LlamaForCausalLM",
                "torchtune.models.convert_weights.tune_to_hf (q/k rotary permutation)", _tt_tune_to_hf, tt),
        ZooPair("tt_meta_to_tune_llama", "torchtune", "Meta reference Llama layout (tune_to_meta)", "torchtune llama3",
                "torchtune.models.convert_weights.meta_to_tune", _tt_meta_to_tune, tt),
        ZooPair("tt_tune_to_meta_llama", "torchtune", "torchtune llama3", "Meta reference Llama layout (names only)",
                "torchtune.models.convert_weights.tune_to_meta", _tt_tune_to_meta, tt),
        ZooPair("tt_qwen2_hf_to_tune", "torchtune", "HF Qwen2ForCausalLM", "torchtune qwen2",
                "torchtune.models.qwen2._convert_weights.qwen2_hf_to_tune", _tt_qwen2, tt),
        ZooPair("tt_phi3_hf_to_tune", "torchtune", "HF Phi3ForCausalLM (fused qkv_proj, gate_up_proj)",
                "torchtune phi3 (separate q/k/v, w1/w3)",
                "torchtune.models.phi3._convert_weights.phi3_hf_to_tune (splits)", _tt_phi3, tt),
        ZooPair("tt_gemma2_hf_to_tune", "torchtune", "HF Gemma2ForCausalLM", "torchtune gemma2",
                "torchtune.models.gemma2._convert_weights.gemma2_hf_to_tune (q/k rotary permutation; its feed-forward "
                "norms exchanged back: see the errata)", _tt_gemma2, tt),
        ZooPair("tt_clip_text_hf_to_tune", "torchtune", "HF CLIPModel (text and vision towers, projections)",
                "torchtune CLIP text encoder (partial source: the vision tower is dropped)",
                "torchtune.models.clip._convert_weights.clip_text_hf_to_tune", _tt_clip_text, tt),
        ZooPair("tt_t5_hf_to_tune", "torchtune", "HF T5ForConditionalGeneration (encoder and decoder, gated GELU)",
                "torchtune T5 encoder (the decoder's blocks have the encoder's names)",
                "torchtune.models.t5._convert_weights.t5_encoder_hf_to_tune", _tt_t5_encoder, tt),
        # added after the matcher was tuned (not tuned on)
        ZooPair("tt_gemma_hf_to_tune", "torchtune", "HF GemmaForCausalLM (tied embedding, head_dim 16 != dim / heads)",
                "torchtune gemma", "torchtune.models.convert_weights.hf_to_tune(head_dim=16) (q/k rotary permutation)",
                _tt_gemma, tt),
        ZooPair("tt_llama3_2_hf_to_tune", "torchtune",
                "HF LlamaForCausalLM, Llama 3.2 1B/3B style (tied embedding: no lm_head.weight in the checkpoint)",
                "torchtune llama3_2 (tied output)", "torchtune.models.convert_weights.hf_to_tune (q/k rotary permutation)",
                _tt_llama3_2, tt),
        ZooPair("tt_mistral_hf_to_tune", "torchtune", "HF MistralForCausalLM", "torchtune mistral",
                "torchtune.models.convert_weights.hf_to_tune (q/k rotary permutation)", _tt_mistral, tt),
        ZooPair("tt_phi3_tune_to_hf", "torchtune", "torchtune phi3 (separate q/k/v, w1/w3)",
                "HF Phi3ForCausalLM (fused qkv_proj, gate_up_proj)",
                "torchtune.models.phi3._convert_weights.phi3_tune_to_hf (concatenations)", _tt_phi3_tune_to_hf, tt),
        ZooPair("tt_llama3_2_vision_hf_to_tune", "torchtune",
                "HF Mllama on-disk layout (`language_model.model.layers.N` with separate cross-attention layers, "
                "`vision_model.*`, `multi_modal_projector`)",
                "torchtune Llama 3.2 Vision (DeepFusionModel: `decoder.layers.N.fusion_layer`, `encoder.clip`...)",
                "torchtune.models.llama3_2_vision._convert_weights.llama3_vision_hf_to_tune (layers interleaved, "
                "embedding split, q/k permuted, tile position embeddings scattered)", _tt_llama3_2_vision, tt),
        ZooPair("tt_flux_ae", "torchtune",
                "Black Forest Labs Flux autoencoder (`down.I.block.J.norm1/conv1`, `mid.attn_1.q` 1x1 convs, "
                "`up` numbered in reverse; layout built by inverting the converter)",
                "torchtune flux_1_autoencoder (`layers.J.main.0/2/3/5`, `attn.q_proj` Linear, `end.0/2`)",
                "torchtune.models.flux._convert_weights.flux_ae_hf_to_tune (squeezes 1x1 convs)", _tt_flux_ae,
                ("torchtune",)),
    ]
    from benchmarks.accuracy.zoo_timm import timm_pairs

    return pairs + timm_pairs(ZooPair, ZooCase)


ZOO: list[ZooPair] = zoo_pairs()
