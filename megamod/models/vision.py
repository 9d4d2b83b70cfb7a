"""CLIP ViT vision tower on Megatron-Core layers, matching HF `CLIPVisionModel`.

Pre-layernorm transformer, quick-GELU MLP, class token, learned positions, patch conv without bias. Features are the
hidden states after a configurable layer (default -2, LLaVA's choice), with the class token dropped ("default") or
kept ("full"). Layers after the selected one and the post-layernorm are held (so checkpoints round-trip) but never
run. megatron-core's own CLIPViTModel runs every layer, and its local spec uses a causal mask, so it does not fit.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from megatron.core.transformer.module import MegatronModule

from megamod.data.images import CLIP_MEAN, CLIP_STD
from megamod.models.common import common_config_kwargs, mark_tensor_parallel_weights


@dataclass
class VisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    feature_layer: int = -2  # HF hidden_states index: 0 = embeddings, i = after layer i; negative from the end
    select_strategy: str = "default"  # "default" drops the class token, "full" keeps it
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD

    def __post_init__(self):
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)
        if self.select_strategy not in ("default", "full"):
            raise ValueError(f"vision select_strategy {self.select_strategy!r}: expected 'default' or 'full'")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if not 0 <= self.layers_to_run <= self.num_layers:
            raise ValueError(f"feature_layer {self.feature_layer} is outside the {self.num_layers} vision layers")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_image_tokens(self) -> int:
        """Positions one image takes in the language model's sequence (576 for CLIP-L/14-336, default)."""
        return self.num_patches + (1 if self.select_strategy == "full" else 0)

    @property
    def layers_to_run(self) -> int:
        return self.num_layers + 1 + self.feature_layer if self.feature_layer < 0 else self.feature_layer

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        return cls(**d)


def vision_transformer_config(cfg: VisionConfig, params_dtype=torch.float32, init_weights: bool = True):
    from megatron.core import parallel_state as ps
    from megatron.core.activations import quick_gelu
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_attention_heads,
        kv_channels=cfg.hidden_size // cfg.num_attention_heads,
        normalization="LayerNorm",
        layernorm_epsilon=cfg.layer_norm_eps,
        activation_func=quick_gelu,
        gated_linear_unit=False,
        add_bias_linear=True,
        add_qkv_bias=True,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        # The tower lives on the first pipeline stage: its block must not be split across stages.
        pipeline_model_parallel_size=1,
        **common_config_kwargs(params_dtype, init_weights),
    )


def vision_layer_spec(use_te: bool):
    """Bidirectional pre-LN ViT layer (megatron's local ViT spec masks causally, which CLIP does not)."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    if use_te:
        from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_transformer_engine_spec

        return get_vit_layer_with_transformer_engine_spec()
    from megamod.models.attention import SDPAttention
    from megamod.models.specs import SequenceParallelTorchNorm

    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=SequenceParallelTorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear, core_attention=SDPAttention, linear_proj=RowParallelLinear
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=SequenceParallelTorchNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                               linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map={
                "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
            },
        ),
    )


class CLIPVisionTower(MegatronModule):
    def __init__(self, cfg: VisionConfig, params_dtype=torch.float32, init_weights: bool = True,
                 use_te: bool = False):
        from megatron.core.transformer.transformer_block import TransformerBlock

        config = vision_transformer_config(cfg, params_dtype, init_weights)
        super().__init__(config=config)
        self.cfg = cfg
        H = cfg.hidden_size
        self.patch_embedding = torch.nn.Conv2d(3, H, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False,
                                               dtype=params_dtype)
        self.class_embedding = torch.nn.Parameter(torch.randn(H, dtype=params_dtype) * 0.02)
        self.position_embedding = torch.nn.Embedding(cfg.num_patches + 1, H, dtype=params_dtype)
        self.pre_layernorm = torch.nn.LayerNorm(H, eps=cfg.layer_norm_eps, dtype=params_dtype)
        self.decoder = TransformerBlock(config=config, spec=vision_layer_spec(use_te), pre_process=True,
                                        post_process=False)
        self.post_layernorm = torch.nn.LayerNorm(H, eps=cfg.layer_norm_eps, dtype=params_dtype)
        if not init_weights:
            mark_tensor_parallel_weights(self)

    def forward(self, images_NCHW: torch.Tensor) -> torch.Tensor:
        """[N, 3, R, R] -> features [N, T, H] of the selected layer (T = patches, + 1 with the class token)."""
        x_NHP = self.patch_embedding(images_NCHW.to(self.patch_embedding.weight.dtype)).flatten(2)
        x_NPH = x_NHP.transpose(1, 2)
        cls_N1H = self.class_embedding.expand(x_NPH.shape[0], 1, -1)
        x_NTH = torch.cat([cls_N1H, x_NPH], dim=1) + self.position_embedding.weight
        x_TNH = self.pre_layernorm(x_NTH).transpose(0, 1).contiguous()  # megatron layers are sequence-first
        for layer in self.decoder.layers[: self.cfg.layers_to_run]:
            x_TNH, _ = layer(x_TNH, attention_mask=None)
        x_NTH = x_TNH.transpose(0, 1)
        return x_NTH[:, 1:] if self.cfg.select_strategy == "default" else x_NTH

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        sharded = self.decoder.sharded_state_dict(f"{prefix}decoder.", sharded_offsets, metadata)
        own = {}
        for name, module in (("patch_embedding", self.patch_embedding), ("position_embedding",
                             self.position_embedding), ("pre_layernorm", self.pre_layernorm),
                             ("post_layernorm", self.post_layernorm)):
            own.update(module.state_dict(prefix=f"{name}.", keep_vars=True))
        own["class_embedding"] = self.class_embedding
        sharded.update(make_sharded_tensors_for_checkpoint(own, prefix, sharded_offsets=sharded_offsets))
        return sharded
