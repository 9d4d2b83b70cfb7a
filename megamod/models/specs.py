"""Layer specs: TransformerEngine's when it is importable and a GPU is used, megatron-core's local ones otherwise.

The local spec is megatron-core's, with one module swapped through the spec (no patching): its torch norm refuses
sequence parallelism, which MoE with TP > 1 requires, so megamod's norm allows it and marks its parameters so that
megatron-core all-reduces their gradients across the tensor-parallel group.
"""
from __future__ import annotations

import dataclasses

import torch
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm


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


def _swap_norms(spec):
    """Replace megatron's WrappedTorchNorm by SequenceParallelTorchNorm everywhere in a spec tree."""
    if spec is WrappedTorchNorm:
        return SequenceParallelTorchNorm
    if isinstance(spec, (list, tuple)):
        return type(spec)(_swap_norms(s) for s in spec)
    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(spec, module=_swap_norms(spec.module), submodules=_swap_norms(spec.submodules))
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.replace(
            spec, **{f.name: _swap_norms(getattr(spec, f.name)) for f in dataclasses.fields(spec)}
        )
    return spec


def decoder_block_spec(config, use_te: bool, vp_stage=None):
    """Block spec for a GPT decoder (dense or with MoE layers, per config.moe_layer_freq)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    spec = get_gpt_decoder_block_spec(
        config, use_transformer_engine=use_te, normalization=config.normalization, vp_stage=vp_stage
    )
    return spec if use_te else _swap_norms(spec)
