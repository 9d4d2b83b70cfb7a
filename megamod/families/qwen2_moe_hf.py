"""Qwen2MoeForCausalLM <-> megamod's sparse Qwen2 student (HF_FORMATS.md section 2: the stock class whose routing
equals megatron-core's: softmax over experts, top-k, renormalised with norm_topk_prob=True).

The student has no shared expert; the HF class always builds one, so the export writes it with zero size (and a gate
whose value cannot matter, since it multiplies a zero output), and the import accepts exactly that.
"""
from __future__ import annotations

import torch

from megamod.families.qwen2_hf import config_from_hf as dense_config_from_hf, config_to_hf as dense_config_to_hf
from megamod.families.qwen2_hf import is_moe_layer
from megamod.models.language import LanguageModelConfig


def config_from_hf(hf: dict, where: str = "config.json") -> LanguageModelConfig:
    if hf.get("shared_expert_intermediate_size", 0) != 0:
        raise ValueError(f"{where}: shared experts (shared_expert_intermediate_size="
                         f"{hf['shared_expert_intermediate_size']}) are not supported")
    if not hf.get("norm_topk_prob", False):
        raise ValueError(f"{where}: norm_topk_prob=false is not supported (the router renormalises the top-k)")
    if not hf.get("qkv_bias", True):
        raise ValueError(f"{where}: qkv_bias=false is not supported")
    layers, step = hf["num_hidden_layers"], hf.get("decoder_sparse_step", 1)
    dense_only = set(hf.get("mlp_only_layers") or [])
    pattern = [int(i not in dense_only and hf["num_experts"] > 0 and (i + 1) % step == 0) for i in range(layers)]
    dense = dense_config_from_hf({**hf, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}, where)
    dense.num_experts = hf["num_experts"]
    dense.moe_router_topk = hf["num_experts_per_tok"]
    dense.moe_layer_pattern = pattern
    dense.moe_ffn_hidden_size = hf["moe_intermediate_size"]
    dense.moe_aux_loss_coeff = hf.get("router_aux_loss_coef", 0.01)
    return dense


def config_to_hf(cfg: LanguageModelConfig, torch_dtype: str = "float32") -> dict:
    hf = dense_config_to_hf(_dense(cfg), torch_dtype)
    pattern = cfg.moe_layer_pattern or [1] * cfg.num_layers
    hf.update(
        architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.moe_router_topk, moe_intermediate_size=cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size,
        shared_expert_intermediate_size=0, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[i for i, moe in enumerate(pattern) if not moe], qkv_bias=True,
        router_aux_loss_coef=cfg.moe_aux_loss_coeff, output_router_logits=False,
    )
    return hf


def _dense(cfg: LanguageModelConfig) -> LanguageModelConfig:
    import dataclasses

    return dataclasses.replace(cfg, num_experts=None, moe_layer_pattern=[], moe_ffn_hidden_size=None)


def zero_shared_expert(cfg: LanguageModelConfig, hf_prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The zero-size shared expert the HF class expects in every MoE layer."""
    H, out = cfg.hidden_size, {}
    for i in range(cfg.num_layers):
        if is_moe_layer(cfg, i):
            p = f"{hf_prefix}.layers.{i}.mlp.shared_expert"
            out[f"{p}.gate_proj.weight"] = torch.zeros(0, H, dtype=dtype)
            out[f"{p}.up_proj.weight"] = torch.zeros(0, H, dtype=dtype)
            out[f"{p}.down_proj.weight"] = torch.zeros(H, 0, dtype=dtype)
            out[f"{p}_gate.weight"] = torch.zeros(1, H, dtype=dtype)
    return out


def is_zero_shared_expert(name: str, tensor_shape) -> bool:
    if ".mlp.shared_expert_gate." in name:
        return True
    return ".mlp.shared_expert." in name and 0 in tuple(tensor_shape)


def any_config_from_hf(hf: dict, where: str = "config.json") -> LanguageModelConfig:
    """Qwen2 or Qwen2-MoE config.json -> LanguageModelConfig."""
    if hf.get("model_type") == "qwen2_moe":
        return config_from_hf(hf, where)
    return dense_config_from_hf(hf, where)


def any_config_to_hf(cfg: LanguageModelConfig, torch_dtype: str = "float32") -> dict:
    return config_to_hf(cfg, torch_dtype) if cfg.num_experts is not None else dense_config_to_hf(cfg, torch_dtype)
