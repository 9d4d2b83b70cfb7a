"""Pieces every megamod model shares: the TransformerConfig settings, device placement, tensor-parallel weight
tags, and the sequence-parallel split of per-position masks. A leaf module: the model builders (language, vision,
llava) and the MoE layer import it, it imports none of them.
"""
from __future__ import annotations

import torch


def common_config_kwargs(params_dtype, init_weights: bool) -> dict:
    """TransformerConfig settings every megamod model shares: exact (unfused, dropout-free) math that runs on CPU
    and GPU alike, and the parameter dtype."""
    return dict(
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=init_weights,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
    )


def on_device(model):
    """The whole model on the current GPU unless megatron-core initialises on the CPU. megatron-core allocates its
    linear weights there, but torch norms (the local spec without TransformerEngine) and the router's weight start on
    torch's default device, the CPU; Megatron-LM's get_model moves every model with .cuda(), and so does this."""
    if not model.config.use_cpu_initialization:
        model.cuda(torch.cuda.current_device())
    return model


def mark_tensor_parallel_weights(model) -> None:
    """Tag TP-sharded weights as megatron-core's initialisers would.

    megatron-core 0.16.1 sets `tensor_model_parallel`/`partition_dim` on linear and embedding weights only inside
    its weight initialisers, so a model built with perform_initialization=False (weights to come from a
    checkpoint) has untagged shards: the optimizer then treats them as TP duplicates and the gradient norm used for
    clipping misses all but TP rank 0's shards.
    """
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, set_tensor_model_parallel_attributes,
    )

    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            dim = 0
        elif isinstance(module, RowParallelLinear):
            dim = 1
        else:
            continue
        weight = getattr(module, "weight", None)
        if weight is not None and not getattr(weight, "tensor_model_parallel", False):
            set_tensor_model_parallel_attributes(weight, True, dim, 1)



def split_sequence_BS(mask_BS: torch.Tensor) -> torch.Tensor:
    """This TP rank's sequence-parallel slice [B, S/tp] of a per-position tensor."""
    from megatron.core import tensor_parallel

    return tensor_parallel.scatter_to_sequence_parallel_region(mask_BS.transpose(0, 1).contiguous()) \
        .transpose(0, 1).contiguous()


def routing_padding_mask(config, padding_BS):
    """The padding mask [B, S] (True at padding) a model's forward takes so that padding stays out of MoE routing
    statistics: None for a dense model; this rank's sequence-parallel slice on later pipeline stages, where
    megatron's GPTModel does not split it itself (it does on the first stage)."""
    from megatron.core import parallel_state as ps

    if config.num_moe_experts is None:
        return None
    if config.sequence_parallel and not ps.is_pipeline_first_stage():
        return split_sequence_BS(padding_BS)
    return padding_BS
