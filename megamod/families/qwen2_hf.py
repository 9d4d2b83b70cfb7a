"""Qwen2ForCausalLM (Qwen1.5 / Qwen2) <-> megamod GPTModel: config and tensor mapping.

Megatron names here are those of an unsharded (TP=1, PP=1) model with megamod's local spec; the dist checkpoint
machinery maps them to canonical keys that load at any TP/PP. Each rule says which HF tensors make one Megatron
tensor and how to split it back, so both directions stream one tensor at a time.
"""
from __future__ import annotations

import torch

from megamod.families.hf_rules import Rule, padded_rows, qkv_rule, same
from megamod.models.language import LanguageModelConfig

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)  # and Qwen2MoeForCausalLM, through qwen2_moe_hf


def _rope_theta(hf: dict, where: str) -> float:
    # transformers 5.x writes rope_parameters: {rope_theta, rope_type}; 4.x a top-level rope_theta.
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if params and params.get("rope_type", params.get("type", "default")) != "default":
        raise ValueError(f"{where}: rope type {params.get('rope_type', params.get('type'))!r} is not supported")
    if "rope_theta" in params:
        return float(params["rope_theta"])
    if "rope_theta" in hf:
        return float(hf["rope_theta"])
    return 10000.0


def config_from_hf(hf: dict, where: str = "config.json") -> LanguageModelConfig:
    archs = hf.get("architectures") or [None]
    if hf.get("model_type") != "qwen2" or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{where}: unsupported architecture {archs[0]!r} (model_type {hf.get('model_type')!r}); "
            f"supported: Qwen2ForCausalLM (model_type 'qwen2'), Qwen2MoeForCausalLM ('qwen2_moe'), "
            f"LlavaForConditionalGeneration ('llava')"
        )
    if hf.get("use_sliding_window"):
        raise ValueError(f"{where}: use_sliding_window=true is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (SwiGLU needs 'silu')")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    return LanguageModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        ffn_hidden_size=hf["intermediate_size"],
        kv_channels=head_dim,
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(hf, where),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_method_std=hf.get("initializer_range", 0.02),
    )


def config_to_hf(cfg: LanguageModelConfig, torch_dtype: str = "float32") -> dict:
    if cfg.num_experts is not None:
        raise ValueError("config_to_hf writes dense Qwen2 configs; this model is sparse")
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ffn_hidden_size,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_epsilon,
        # top-level rope_theta: transformers 4.x ignores rope_parameters and would silently use 10000
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.init_method_std,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }


def _gate_up(prefix: str) -> Rule:
    """linear_fc1 holds [gate; up]: megatron's SwiGLU applies silu to the first half."""
    return Rule(
        [f"{prefix}.mlp.gate_proj.weight", f"{prefix}.mlp.up_proj.weight"],
        lambda gate, up: torch.cat([gate, up], dim=0),
        lambda fc1: list(fc1.chunk(2, dim=0)),
    )


def _qkv(prefix: str, cfg: LanguageModelConfig, kind: str) -> Rule:
    groups = cfg.num_query_groups
    return qkv_rule(prefix, kind, groups, cfg.num_attention_heads // groups, cfg.head_dim)


def layer_rules(cfg: LanguageModelConfig, i: int, hf_prefix: str = "model") -> dict[str, Rule]:
    mg, hf = f"decoder.layers.{i}", f"{hf_prefix}.layers.{i}"
    rules = {
        f"{mg}.input_layernorm.weight": same(f"{hf}.input_layernorm.weight"),
        f"{mg}.self_attention.linear_qkv.weight": _qkv(hf, cfg, "weight"),
        f"{mg}.self_attention.linear_proj.weight": same(f"{hf}.self_attn.o_proj.weight"),
        f"{mg}.pre_mlp_layernorm.weight": same(f"{hf}.post_attention_layernorm.weight"),
    }
    if is_moe_layer(cfg, i):
        rules.update(moe_mlp_rules(cfg, mg, hf))
    else:
        rules[f"{mg}.mlp.linear_fc1.weight"] = _gate_up(hf)
        rules[f"{mg}.mlp.linear_fc2.weight"] = same(f"{hf}.mlp.down_proj.weight")
    if cfg.qkv_bias:
        rules[f"{mg}.self_attention.linear_qkv.bias"] = _qkv(hf, cfg, "bias")
    return rules


def rules(cfg: LanguageModelConfig, hf_prefix: str = "model", lm_head: str = "lm_head.weight") -> dict[str, Rule]:
    """All Megatron tensor names of the unsharded model (dense, or sparse as Qwen2-MoE), each with its HF rule."""
    out = {"embedding.word_embeddings.weight": padded_rows(f"{hf_prefix}.embed_tokens.weight", cfg)}
    for i in range(cfg.num_layers):
        out.update(layer_rules(cfg, i, hf_prefix))
    out["decoder.final_layernorm.weight"] = same(f"{hf_prefix}.norm.weight")
    if not cfg.tie_word_embeddings:
        out["output_layer.weight"] = padded_rows(lm_head, cfg)
    return out


def moe_mlp_rules(cfg: LanguageModelConfig, mg: str, hf: str) -> dict[str, Rule]:
    """Router and experts of one MoE layer (`mg`/`hf`: the layer prefixes)."""
    rules = {f"{mg}.mlp.router.weight": same(f"{hf}.mlp.gate.weight")}
    for e in range(cfg.num_experts):
        expert, local = f"{hf}.mlp.experts.{e}", f"{mg}.mlp.experts.local_experts.{e}"
        rules[f"{local}.linear_fc1.weight"] = Rule(
            [f"{expert}.gate_proj.weight", f"{expert}.up_proj.weight"],
            lambda gate, up: torch.cat([gate, up], dim=0), lambda fc1: list(fc1.chunk(2, dim=0)),
        )
        rules[f"{local}.linear_fc2.weight"] = same(f"{expert}.down_proj.weight")
    return rules


def is_moe_layer(cfg: LanguageModelConfig, i: int) -> bool:
    return cfg.num_experts is not None and (not cfg.moe_layer_pattern or bool(cfg.moe_layer_pattern[i]))
