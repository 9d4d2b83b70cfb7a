"""Model FLOPs of a training step, counted as the step computes them.

Every matmul weight costs, per token that goes through it: 2 FLOPs forward; 2 more for the input gradient when
anything before it in the graph trains (autograd needs the gradient there, so megatron computes it); 2 more for the
weight gradient when the weight itself trains. A trainable weight costs 6N, a frozen one 4N when something upstream
trains (d2s: attention and the output layer behind the trainable adapter), 2N when nothing does (the frozen vision
tower, a teacher). MoE layers count the router and the top-k experts a token goes through.

Attention scores (Q.K^T and P.V) cost 4 * (query heads * head dim) FLOPs per (query, key) pair forward and twice that
backward when a gradient must pass; a causal row of length L has L(L+1)/2 pairs, a vision row of n tokens n^2.
Padding is not counted (model FLOPs: the useful work), nor are norms, activations, softmax or the embedding lookup.

Groups are a stage's trainable parameter groups (training/stages.py: vision, projector, language, ffn, router);
None means a forward pass only (a teacher, or evaluation).
"""
from __future__ import annotations

from megamod.models.language import LanguageModelConfig


def _matmul(weights: float, upstream: bool, trains: bool) -> float:
    return 2.0 * weights * (1 + upstream + trains)


def _attention(pairs: float, width: int, grad: bool) -> float:
    return 4.0 * width * pairs * (3 if grad else 1)


def causal_pairs(length: int) -> int:
    """(query, key) pairs a causal row of `length` tokens attends over."""
    return length * (length + 1) // 2


def language_flops(cfg: LanguageModelConfig, tokens: float, pairs: float, groups=None,
                   upstream: bool = False) -> dict:
    """FLOPs of the decoder on `tokens` tokens whose rows hold `pairs` causal (query, key) pairs. `upstream`: a
    trainable part feeds the decoder's input (a LLaVA projector or vision tower)."""
    g = set(groups or ())
    train = groups is not None
    lang = "language" in g
    ffn, router = lang or "ffn" in g, lang or "router" in g
    up = train and (upstream or lang)  # the input embedding trains with "language"
    h, q_width = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
    kv_width = cfg.num_query_groups * cfg.head_dim
    if cfg.num_experts:
        moe_layers = list(cfg.moe_layer_pattern) or [1] * cfg.num_layers
    else:
        moe_layers = [0] * cfg.num_layers
    moe_ffn = cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size
    matmul = attention = 0.0
    for is_moe in moe_layers:
        matmul += tokens * _matmul(h * (q_width + 2 * kv_width), up, lang)  # q, k, v
        attention += _attention(pairs, q_width, train and (up or lang))
        up = up or (train and lang)
        matmul += tokens * _matmul(q_width * h, up, lang)  # o
        if is_moe:
            k = cfg.moe_router_topk
            matmul += tokens * _matmul(h * cfg.num_experts, up, train and router)
            matmul += tokens * (_matmul(k * 2 * h * moe_ffn, up, train and ffn)  # gate + up
                                + _matmul(k * moe_ffn * h, up or (train and ffn), train and ffn))  # down
            up = up or (train and (ffn or router))
        else:
            F = cfg.ffn_hidden_size
            matmul += tokens * (_matmul(2 * h * F, up, train and ffn)
                                + _matmul(F * h, up or (train and ffn), train and ffn))
            up = up or (train and ffn)
    matmul += tokens * _matmul(h * cfg.padded_vocab_size, up, train and lang)  # output layer, padded rows too
    return {"language_matmul": matmul, "language_attention": attention}


def vision_flops(vision, language_hidden: int, images: float, groups=None) -> dict:
    """FLOPs of the vision tower (the layers it runs) and the mlp2x projector on `images` images."""
    g = set(groups or ())
    train = groups is not None
    vis, proj = train and "vision" in g, train and "projector" in g
    h, n = vision.hidden_size, vision.num_patches + 1  # + the class token
    tower = images * vision.num_patches * _matmul(3 * vision.patch_size ** 2 * h, False, vis)  # patch conv
    per_layer = n * (_matmul(4 * h * h, vis, vis) + _matmul(2 * h * vision.intermediate_size, vis, vis))
    tower += images * vision.layers_to_run * (per_layer + _attention(n * n, h, vis))
    m = images * vision.num_image_tokens
    projector = m * (_matmul(h * language_hidden, vis, proj) + _matmul(language_hidden ** 2, vis or proj, proj))
    return {"vision": tower, "projector": projector}


def model_flops(language: LanguageModelConfig, vision, tokens: float, pairs: float, images: float,
                groups=None) -> dict:
    """Breakdown and "total" of one pass (forward, and backward when groups is not None) of a language or LLaVA
    model (`vision` None for a language model)."""
    out = {}
    upstream = False
    if vision is not None and images:
        out.update(vision_flops(vision, language.hidden_size, images, groups))
        upstream = groups is not None and bool({"vision", "projector"} & set(groups))
    out.update(language_flops(language, tokens, pairs, groups, upstream))
    out["total"] = sum(out.values())
    return out
