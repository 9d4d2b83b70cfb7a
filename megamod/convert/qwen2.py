"""Qwen2ForCausalLM (Qwen1.5 / Qwen2) <-> megamod GPTModel: config and tensor mapping.

Megatron names here are those of an unsharded (TP=1, PP=1) model with megamod's local spec; the dist checkpoint
machinery maps them to canonical keys that load at any TP/PP. Each rule says which HF tensors make one Megatron
tensor and how to split it back, so both directions stream one tensor at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from megamod.models.language import LanguageModelConfig

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)  # and Qwen2MoeForCausalLM, through qwen2_moe


def any_config_from_hf(hf: dict, where: str = "config.json") -> LanguageModelConfig:
    """Qwen2 or Qwen2-MoE config.json -> LanguageModelConfig."""
    from megamod.convert import qwen2_moe

    if hf.get("model_type") == "qwen2_moe":
        return qwen2_moe.config_from_hf(hf, where)
    return config_from_hf(hf, where)


def any_config_to_hf(cfg: LanguageModelConfig, torch_dtype: str = "float32") -> dict:
    from megamod.convert import qwen2_moe

    return qwen2_moe.config_to_hf(cfg, torch_dtype) if cfg.num_experts is not None else config_to_hf(cfg, torch_dtype)


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


@dataclass
class Rule:
    """One Megatron tensor <- these HF tensors."""

    hf_names: list[str]
    to_megatron: Callable[..., torch.Tensor]  # HF tensors (in hf_names order) -> Megatron tensor
    to_hf: Callable[[torch.Tensor], list[torch.Tensor]]  # Megatron tensor -> HF tensors (in hf_names order)


def same(name: str) -> Rule:
    return Rule([name], lambda t: t, lambda t: [t])


def _padded_rows(name: str, cfg: LanguageModelConfig) -> Rule:
    """Embedding / LM head: zero rows pad the vocabulary; they are dropped again on export."""

    def to_megatron(t):
        if t.shape[0] != cfg.vocab_size:
            raise ValueError(f"{name}: {t.shape[0]} rows, config vocab_size is {cfg.vocab_size}")
        out = t.new_zeros((cfg.padded_vocab_size, t.shape[1]))
        out[: cfg.vocab_size] = t
        return out

    return Rule([name], to_megatron, lambda t: [t[: cfg.vocab_size]])


def qkv_rule(prefix: str, kind: str, groups: int, q_per_group: int, head_dim: int) -> Rule:
    """Megatron keeps q, k, v interleaved per key/value group: [q heads of group g, k_g, v_g] for each g."""
    d = head_dim

    def to_megatron(q, k, v):
        tail = q.shape[1:]
        return torch.cat(
            [q.reshape(groups, q_per_group * d, *tail), k.reshape(groups, d, *tail), v.reshape(groups, d, *tail)],
            dim=1,
        ).reshape(-1, *tail)

    def to_hf(qkv):
        tail = qkv.shape[1:]
        per_group = qkv.reshape(groups, (q_per_group + 2) * d, *tail)
        q, k, v = per_group.split([q_per_group * d, d, d], dim=1)
        return [q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)]

    names = [f"{prefix}.self_attn.{p}_proj.{kind}" for p in ("q", "k", "v")]
    return Rule(names, to_megatron, to_hf)


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
    from megamod.convert import qwen2_moe

    mg, hf = f"decoder.layers.{i}", f"{hf_prefix}.layers.{i}"
    rules = {
        f"{mg}.input_layernorm.weight": same(f"{hf}.input_layernorm.weight"),
        f"{mg}.self_attention.linear_qkv.weight": _qkv(hf, cfg, "weight"),
        f"{mg}.self_attention.linear_proj.weight": same(f"{hf}.self_attn.o_proj.weight"),
        f"{mg}.pre_mlp_layernorm.weight": same(f"{hf}.post_attention_layernorm.weight"),
    }
    if qwen2_moe.is_moe_layer(cfg, i):
        rules.update(qwen2_moe.moe_mlp_rules(cfg, mg, hf))
    else:
        rules[f"{mg}.mlp.linear_fc1.weight"] = _gate_up(hf)
        rules[f"{mg}.mlp.linear_fc2.weight"] = same(f"{hf}.mlp.down_proj.weight")
    if cfg.qkv_bias:
        rules[f"{mg}.self_attention.linear_qkv.bias"] = _qkv(hf, cfg, "bias")
    return rules


def rules(cfg: LanguageModelConfig, hf_prefix: str = "model", lm_head: str = "lm_head.weight") -> dict[str, Rule]:
    """All Megatron tensor names of the unsharded model (dense, or sparse as Qwen2-MoE), each with its HF rule."""
    out = {"embedding.word_embeddings.weight": _padded_rows(f"{hf_prefix}.embed_tokens.weight", cfg)}
    for i in range(cfg.num_layers):
        out.update(layer_rules(cfg, i, hf_prefix))
    out["decoder.final_layernorm.weight"] = same(f"{hf_prefix}.norm.weight")
    if not cfg.tie_word_embeddings:
        out["output_layer.weight"] = _padded_rows(lm_head, cfg)
    return out
