"""Layer specs: TransformerEngine's when it is importable and a GPU is used, megatron-core's local ones otherwise.

Both are megatron-core's, with modules swapped through the spec (no patching):
- the MoE layer is megamod's (`models.moe.MegamodMoELayer`: megamod's permute/unpermute kernels in the dispatcher);
- with `performance.grouped_experts`, the experts are megamod's (`models.grouped_experts.GroupedExperts`: a
  SequentialMLP computing all local experts in two grouped GEMMs);
- in the local spec, core attention is megamod's SDPA one (`models.attention.SDPAttention`, fused, same layout);
- in the local spec, megatron's torch norm refuses sequence parallelism, which MoE with TP > 1 requires, so
  megamod's norm allows it and marks its parameters so that megatron-core all-reduces their gradients across the
  tensor-parallel group.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from megamod import performance


def transformer_engine_usable() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


class SequenceParallelTorchNorm:
    """torch LayerNorm/RMSNorm built from a TransformerConfig, usable with sequence parallelism."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        norm_cls = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}.get(config.normalization)
        if norm_cls is None:
            raise ValueError(f"normalization {config.normalization!r} is not supported by the torch norm")
        norm = norm_cls(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in norm.parameters():
            # Under SP each rank normalises a slice of the sequence: the weight gradients are partial sums.
            p.sequence_parallel = config.sequence_parallel
        return norm


def _swap(spec, modules: dict):
    """Replace module classes everywhere in a spec tree (old class -> new class)."""
    if isinstance(spec, type) and spec in modules:
        return modules[spec]
    if isinstance(spec, (list, tuple)):
        return type(spec)(_swap(s, modules) for s in spec)
    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(spec, module=_swap(spec.module, modules),
                                   submodules=_swap(spec.submodules, modules))
    if isinstance(spec, functools.partial):  # megatron-core 0.19 specs some modules (the MoE layer) as partials
        return functools.partial(_swap(spec.func, modules), *_swap(spec.args, modules),
                                 **{k: _swap(v, modules) for k, v in spec.keywords.items()})
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.replace(spec, **{f.name: _swap(getattr(spec, f.name), modules)
                                            for f in dataclasses.fields(spec)})
    return spec


def decoder_block_spec(config, use_te: bool, vp_stage=None):
    """Block spec for a GPT decoder (dense or with MoE layers, per config.moe_layer_freq)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megamod.models.attention import SDPAttention
    from megamod.models.moe import MegamodMoELayer

    spec = get_gpt_decoder_block_spec(
        config, use_transformer_engine=use_te, normalization=config.normalization, vp_stage=vp_stage
    )
    modules = {MoELayer: MegamodMoELayer}
    if config.num_moe_experts and performance.enabled("grouped_experts", config.params_dtype):
        from megatron.core.transformer.moe.experts import SequentialMLP

        from megamod.models.grouped_experts import GroupedExperts, unsupported_reason

        if unsupported_reason(config) is None or performance.forced("grouped_experts"):
            modules[SequentialMLP] = GroupedExperts  # which raises, naming why, for a model it cannot serve
    if not use_te:
        modules.update({WrappedTorchNorm: SequenceParallelTorchNorm, DotProductAttention: SDPAttention})
    return _swap(spec, modules)
