"""Synthetic model families at any size, as ``{name: shape}`` with a known renaming.

Each family returns ``(source_shapes, target_shapes, truth)`` where ``truth`` maps every source
name to its target name. Shapes only: matching never needs tensor data.
"""

from __future__ import annotations


def cnn_stack(n_tensors: int) -> tuple[dict, dict, dict]:
    """ResNet-like stages of conv/BN blocks; torchvision-style names -> timm-style names."""
    src, tgt, truth = {}, {}, {}
    per_block = 2 * (1 + 5)  # two conv (weight) + two BN (5 tensors each)
    n_blocks = max(1, n_tensors // per_block)
    n_stages = 4
    for b in range(n_blocks):
        s, i = b % n_stages, b // n_stages
        c = 16 * (s + 1)
        for k in (1, 2):
            a = f"layer{s + 1}.{i}."
            z = f"stages.{s}.blocks.{i}."
            pairs = [(f"{a}conv{k}.weight", f"{z}conv{k}.conv.weight", (c, c, 3, 3))]
            for leaf, shape in (("weight", (c,)), ("bias", (c,)), ("running_mean", (c,)),
                                ("running_var", (c,)), ("num_batches_tracked", ())):
                pairs.append((f"{a}bn{k}.{leaf}", f"{z}conv{k}.bn.{leaf}", shape))
            for sn, tn, shape in pairs:
                src[sn], tgt[tn], truth[sn] = shape, shape, tn
    return src, tgt, truth


def _llama_layer(dim: int, hidden: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """One Llama layer: (HF leaf, torchtune-style leaf, shape), in HF's definition order."""
    return [
        ("self_attn.q_proj.weight", "attn.q_proj.weight", (dim, dim)),
        ("self_attn.k_proj.weight", "attn.k_proj.weight", (dim // 2, dim)),
        ("self_attn.v_proj.weight", "attn.v_proj.weight", (dim // 2, dim)),
        ("self_attn.o_proj.weight", "attn.output_proj.weight", (dim, dim)),
        ("mlp.gate_proj.weight", "mlp.w1.weight", (hidden, dim)),
        ("mlp.up_proj.weight", "mlp.w3.weight", (hidden, dim)),
        ("mlp.down_proj.weight", "mlp.w2.weight", (dim, hidden)),
        ("input_layernorm.weight", "sa_norm.scale", (dim,)),
        ("post_attention_layernorm.weight", "mlp_norm.scale", (dim,)),
    ]


def transformer_stack(n_tensors: int, dim: int = 64) -> tuple[dict, dict, dict]:
    """Llama-like decoder: HF names -> torchtune-style names."""
    src, tgt, truth = {}, {}, {}
    n_layers = max(1, (n_tensors - 3) // 9)
    hidden = 3 * dim
    per_layer = _llama_layer(dim, hidden)
    src["model.embed_tokens.weight"] = tgt["tok_embeddings.weight"] = (1000, dim)
    truth["model.embed_tokens.weight"] = "tok_embeddings.weight"
    for i in range(n_layers):
        for a, z, shape in per_layer:
            sn, tn = f"model.layers.{i}.{a}", f"layers.{i}.{z}"
            src[sn], tgt[tn], truth[sn] = shape, shape, tn
    for sn, tn, shape in (("model.norm.weight", "norm.scale", (dim,)), ("lm_head.weight", "output.weight", (1000, dim))):
        src[sn], tgt[tn], truth[sn] = shape, shape, tn
    return src, tgt, truth


def moe_stack(n_tensors: int, dim: int = 32, n_experts: int = 64) -> tuple[dict, dict, dict]:
    """DeepSeek-like MoE: reference names (``ffn.experts.M.w1``) -> HF names (``mlp.experts.M.gate_proj``)."""
    src, tgt, truth = {}, {}, {}
    per_layer = 3 * n_experts + 7
    n_layers = max(1, n_tensors // per_layer)
    hidden = 2 * dim
    for i in range(n_layers):
        a, z = f"layers.{i}.", f"model.layers.{i}."
        pairs = [
            (f"{a}attn.wq.weight", f"{z}self_attn.q_proj.weight", (dim, dim)),
            (f"{a}attn.wkv.weight", f"{z}self_attn.kv_proj.weight", (dim, dim)),
            (f"{a}attn.wo.weight", f"{z}self_attn.o_proj.weight", (dim, dim)),
            (f"{a}attn_norm.weight", f"{z}input_layernorm.weight", (dim,)),
            (f"{a}ffn_norm.weight", f"{z}post_attention_layernorm.weight", (dim,)),
            (f"{a}ffn.gate.weight", f"{z}mlp.gate.weight", (n_experts, dim)),
            (f"{a}ffn.shared_experts.w2.weight", f"{z}mlp.shared_experts.down_proj.weight", (dim, hidden)),
        ]
        for m in range(n_experts):
            e, f = f"{a}ffn.experts.{m}.", f"{z}mlp.experts.{m}."
            pairs += [
                (f"{e}w1.weight", f"{f}gate_proj.weight", (hidden, dim)),
                (f"{e}w2.weight", f"{f}down_proj.weight", (dim, hidden)),
                (f"{e}w3.weight", f"{f}up_proj.weight", (hidden, dim)),
            ]
        for sn, tn, shape in pairs:
            src[sn], tgt[tn], truth[sn] = shape, shape, tn
    return src, tgt, truth


# Layers under position-free names: no layer index to split buckets by (see ambiguous_stack).
_TREES = ("oak", "elm", "ash", "yew", "fir", "pine", "beech", "birch", "cedar", "maple", "alder", "hazel")


def ambiguous_stack(n_tensors: int, dim: int = 64) -> tuple[dict, dict, dict]:
    """Llama-like decoder whose source layers carry no index: names and order disagree.

    Source layers are named after trees (``model.oak``, ``model.elm``, ..., ``model.oak1``) in
    definition order, with HF leaf names and the two norms defined last; target layers are
    ``layers.N`` with torchtune leaf names, ``sa_norm`` defined first and ``mlp_norm`` in the
    middle (``w2`` before ``w3``). With no shared layer index the buckets cannot be split along
    the layers: every layer's norms compete in one bucket of ``2 * n_layers + 1``, where only
    relative order tells layers apart and weak, conflicting name scores decide within a layer.
    That is where optimal and greedy assignment differ. The truth pairs the i-th defined
    source layer with ``layers.i``.
    """
    src, tgt, truth = {}, {}, {}
    n_layers = max(1, (n_tensors - 3) // 9)
    hidden = 5 * dim // 2
    src_layer = _llama_layer(dim, hidden)  # in the source's definition order
    tgt_order = (7, 0, 1, 2, 3, 8, 4, 6, 5)  # the target's definition order, as rows of src_layer
    src["model.embed_tokens.weight"] = tgt["tok_embeddings.weight"] = (1000, dim)
    truth["model.embed_tokens.weight"] = "tok_embeddings.weight"
    for i in range(n_layers):
        tree, lap = _TREES[i % len(_TREES)], i // len(_TREES)
        a = f"model.{tree}{lap if lap else ''}."
        for sn, tn, shape in src_layer:
            src[a + sn], truth[a + sn] = shape, f"layers.{i}.{tn}"
        for k in tgt_order:
            tgt[f"layers.{i}.{src_layer[k][1]}"] = src_layer[k][2]
    for sn, tn, shape in (("model.norm.weight", "norm.scale", (dim,)), ("lm_head.weight", "output.weight", (1000, dim))):
        src[sn], tgt[tn], truth[sn] = shape, shape, tn
    return src, tgt, truth


def anonymous_stack(n_tensors: int, dim: int = 64) -> tuple[dict, dict, dict]:
    """Blocks under hashed names, every tensor of one shape: nothing but order tells them apart.

    Source blocks are ``net.blk_<hash>`` (eight hex digits of a hash of the block's number,
    digits and letters mixed, sometimes digits only) with four Linear layers ``a``..``d``;
    target blocks are ``model.layers.N`` with ``q``, ``k``, ``v``, ``o``. Every weight is
    ``[dim, dim]`` and every bias ``[dim]``, so there is one module signature and no layer index
    to split by: all ``n_tensors / 2`` modules compete in one bucket. Both sides list the blocks
    and their layers in the same order, so zipping the two key lists is right for every tensor
    (the positional baseline); the truth pairs the i-th source block's ``a, b, c, d`` with
    ``layers.i.q, k, v, o``. The adversarial pair of issue 16.
    """
    import hashlib

    src, tgt, truth = {}, {}, {}
    n_blocks = max(1, n_tensors // 8)
    for i in range(n_blocks):
        h = hashlib.sha1(f"block {i}".encode()).hexdigest()[:8]
        for a, z in zip("abcd", "qkvo"):
            for leaf, shape in (("weight", (dim, dim)), ("bias", (dim,))):
                sn, tn = f"net.blk_{h}.{a}.{leaf}", f"model.layers.{i}.{z}.{leaf}"
                src[sn], tgt[tn], truth[sn] = shape, shape, tn
    return src, tgt, truth


def positional_baseline(source: dict, target: dict, truth: dict) -> float:
    """Share of the truth that zipping the two key lists in definition order gets right."""
    right = sum(truth.get(s) == t for s, t in zip(source, target))
    return right / max(len(truth), 1)


FAMILIES = {"cnn": cnn_stack, "transformer": transformer_stack, "moe": moe_stack, "ambiguous": ambiguous_stack,
            "anonymous": anonymous_stack}
