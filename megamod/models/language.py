"""The Qwen1.5 / Qwen2 family language model as a Megatron-Core GPTModel.

One architecture: RMSNorm, SwiGLU, RoPE (rotate-half), q/k/v bias without output bias, GQA, tied or untied
embeddings. Optionally sparse: `num_experts` turns the layers marked in `moe_layer_pattern` into MoE layers.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from megamod import performance
from megamod.models.common import common_config_kwargs, mark_tensor_parallel_weights, on_device


@dataclass
class LanguageModelConfig:
    """Architecture of a Qwen-family decoder. Field names follow Megatron; `from_hf` reads HF config.json."""

    # Embedding/output rows with weights: HF config.json's vocab_size. It may exceed the tokenizer's ids (Qwen2-7B:
    # 152064 rows, 151646 ids); losses and evaluation use the tokenizer's size. vocab_pad_multiple pads on top.
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int  # key/value heads (GQA); equal to num_attention_heads for MHA
    ffn_hidden_size: int
    kv_channels: int | None = None  # head dim; None means hidden_size // num_attention_heads
    max_position_embeddings: int = 32768
    norm_epsilon: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False
    qkv_bias: bool = True
    init_method_std: float = 0.02
    # Embedding/output rows are padded to a multiple of this, independent of TP, so that one checkpoint loads at
    # every TP size that divides it.
    vocab_pad_multiple: int = 128
    # Sparse (MoE) student; None means dense.
    num_experts: int | None = None
    moe_router_topk: int = 2
    moe_layer_pattern: list[int] = field(default_factory=list)  # 1 = MoE layer, 0 = dense; empty = all MoE
    moe_aux_loss_coeff: float = 0.01
    moe_ffn_hidden_size: int | None = None  # None means ffn_hidden_size (upcycled experts are FFN copies)
    # None: dropless (default). A number: each expert takes at most capacity_factor * tokens * topk / experts
    # tokens, the lowest-probability assignments dropped first (the reference code's 1.5 in training).
    moe_capacity_factor: float | None = None
    moe_token_dispatcher: str = "alltoall"  # or "allgather"

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.vocab_pad_multiple) * self.vocab_pad_multiple

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LanguageModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown language model config keys: {sorted(unknown)}")
        return cls(**d)

    def validate(self, tp: int = 1, pp: int = 1, ep: int = 1) -> None:
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} not divisible by "
                f"num_query_groups {self.num_query_groups}"
            )
        if self.num_query_groups % tp:
            raise ValueError(f"num_query_groups {self.num_query_groups} not divisible by tensor parallel size {tp}")
        if self.padded_vocab_size % tp:
            raise ValueError(
                f"padded vocabulary {self.padded_vocab_size} (vocab_pad_multiple {self.vocab_pad_multiple}) "
                f"not divisible by tensor parallel size {tp}"
            )
        if self.num_layers % pp:
            raise ValueError(f"num_layers {self.num_layers} not divisible by pipeline parallel size {pp}")
        if self.num_experts is not None:
            if self.num_experts % ep:
                raise ValueError(f"num_experts {self.num_experts} not divisible by expert parallel size {ep}")
            if self.moe_layer_pattern and len(self.moe_layer_pattern) != self.num_layers:
                raise ValueError(
                    f"moe_layer_pattern has {len(self.moe_layer_pattern)} entries for {self.num_layers} layers"
                )
        # A dense model ignores EP: in a distillation job a dense teacher sits beside an expert-parallel student.


def transformer_config(cfg: LanguageModelConfig, params_dtype=torch.float32, sequence_parallel: bool = False,
                       init_weights: bool = True, **overrides):
    """Megatron TransformerConfig for `cfg` on the current parallel state."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    ep = ps.get_expert_model_parallel_world_size()
    cfg.validate(tp, pp, ep)
    moe = {}
    if cfg.num_experts is not None:
        moe = dict(
            num_moe_experts=cfg.num_experts,
            moe_router_topk=cfg.moe_router_topk,
            moe_ffn_hidden_size=cfg.moe_ffn_hidden_size or cfg.ffn_hidden_size,
            moe_layer_freq=list(cfg.moe_layer_pattern) or 1,
            moe_aux_loss_coeff=cfg.moe_aux_loss_coeff,
            moe_router_load_balancing_type="aux_loss",
            moe_router_dtype="fp32",
            moe_token_dispatcher_type=cfg.moe_token_dispatcher,
            moe_expert_capacity_factor=cfg.moe_capacity_factor,
            moe_token_drop_policy="probs",
            moe_grouped_gemm=False,
            moe_permute_fusion=False,
        )
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.head_dim,
        ffn_hidden_size=cfg.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=cfg.qkv_bias,
        init_method_std=cfg.init_method_std,
        apply_rope_fusion=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep if cfg.num_experts is not None else 1,  # a dense model has no experts
        # megatron-core requires sequence parallelism for MoE layers under TP
        sequence_parallel=tp > 1 and (sequence_parallel or cfg.num_experts is not None),
        **moe,
        **common_config_kwargs(params_dtype, init_weights),
    )
    kwargs.update(performance.config_kwargs(params_dtype))  # fusions: on with CUDA by default, off on CPU
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_language_model(cfg: LanguageModelConfig, params_dtype=torch.float32, sequence_parallel: bool = False,
                         init_weights: bool = True, vp_stage: int | None = None, use_te: bool | None = None):
    """GPTModel for this rank's pipeline stage. `init_weights=False` skips random init (weights come from a
    checkpoint), which matters for multi-billion-parameter models on CPU."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from megamod.models.specs import decoder_block_spec, transformer_engine_usable

    config = transformer_config(cfg, params_dtype, sequence_parallel, init_weights)
    use_te = transformer_engine_usable() if use_te is None else use_te
    model = GPTModel(
        config=config,
        transformer_layer_spec=decoder_block_spec(config, use_te, vp_stage=vp_stage),
        vocab_size=cfg.padded_vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=cfg.rope_theta,
        vp_stage=vp_stage,
    )
    if not init_weights:
        mark_tensor_parallel_weights(model)
    if model.post_process:
        model.output_layer.register_forward_hook(_contiguous_logit_grads)
    model.megamod_config = cfg
    return on_device(model)


def _row_major(grad):
    """The gradient in row-major strides. contiguous() alone is not enough: with one sample, [s, 1, v] counts as
    contiguous whatever the size-1 dim's stride, and matmul's fold test reads that stride."""
    return grad.contiguous().view(-1, grad.shape[-1]).view(grad.shape)


def _contiguous_logit_grads(module, args, output):
    """GPTModel returns [b, s, v] logits transposed from the output layer's [s, b, v], so the loss's gradient reaches
    the output layer's backward as a transposed view; with a frozen output layer (d2s, preference) megatron's backward
    is grad_output.matmul(weight), which torch cannot fold into one GEMM against the [v, h] weight: it runs a batched
    GEMM over s with the weight broadcast, re-reading it once per position (on an H200, 87 ms instead of about 1 ms
    for a 151936 x 1024 output layer at 2048 positions). A hook on the logits hands the gradient on row-major. (A
    tensor hook, not an identity autograd Function: the loss may modify the logits in place.)"""
    logits_SBV = output[0]
    if logits_SBV.requires_grad:
        logits_SBV.register_hook(_row_major)
