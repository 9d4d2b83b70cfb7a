"""LLaVA: CLIP vision tower -> MLP adapter -> Qwen language model, on Megatron-Core.

Token sequences arrive expanded: each image occupies `vision.num_image_tokens` positions holding `image_token_id`
(as in HF LLaVA). On the first pipeline stage the projected image features replace those positions' embeddings in
order (images in batch-major order, as HF's masked_scatter); the language model then runs as usual. The vision tower
and adapter live on the first pipeline stage only.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from megamod.models.common import mark_tensor_parallel_weights, on_device, split_sequence_BS
from megamod.models.language import LanguageModelConfig, build_language_model
from megamod.models.vision import CLIPVisionTower, VisionConfig


@dataclass
class LlavaConfig:
    language: LanguageModelConfig
    vision: VisionConfig
    image_token_id: int

    def to_dict(self) -> dict:
        return {"language": self.language.to_dict(), "vision": self.vision.to_dict(),
                "image_token_id": self.image_token_id}

    @classmethod
    def from_dict(cls, d: dict) -> "LlavaConfig":
        return cls(LanguageModelConfig.from_dict(d["language"]), VisionConfig.from_dict(d["vision"]),
                   d["image_token_id"])


def expand_image_tokens(ids: list[int], image_token_id: int, num_image_tokens: int) -> list[int]:
    """One `<image>` id per image -> `num_image_tokens` copies, the layout HF LLaVA and this model read."""
    out = []
    for i in ids:
        out.extend([i] * num_image_tokens if i == image_token_id else [i])
    return out


def projector_config(cfg: LlavaConfig, params_dtype=torch.float32, init_weights: bool = True):
    from megamod.models.language import transformer_config

    # mlp2x_gelu: Linear(vision H -> H) -> GELU -> Linear(H -> H), both with bias. The language model's shapes and
    # parallel layout, without its experts: the adapter is dense even in the sparse student.
    dense = dataclasses.replace(cfg.language, num_experts=None, moe_layer_pattern=[], moe_ffn_hidden_size=None)
    return transformer_config(dense, params_dtype, init_weights=init_weights, ffn_hidden_size=dense.hidden_size,
                              gated_linear_unit=False, activation_func=F.gelu, add_bias_linear=True)


class LlavaModel(MegatronModule):
    def __init__(self, cfg: LlavaConfig, params_dtype=torch.float32, init_weights: bool = True,
                 sequence_parallel: bool = False, use_te: bool = False):
        from megatron.core import parallel_state as ps
        from megatron.core.models.vision.multimodal_projector import MultimodalProjector
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer.mlp import MLPSubmodules

        language_model = build_language_model(cfg.language, params_dtype, sequence_parallel, init_weights,
                                              use_te=use_te)
        super().__init__(config=language_model.config)
        self.cfg = cfg
        self.language_model = language_model
        self.pre_process = ps.is_pipeline_first_stage()
        self.post_process = ps.is_pipeline_last_stage()
        self.share_embeddings_and_output_weights = language_model.share_embeddings_and_output_weights
        self.model_type = language_model.model_type  # read by megatron's pipeline schedules
        if self.pre_process:
            # LLaVA embeds the text itself (image features go in before the sequence is split across TP ranks), so
            # the lookup returns the full [B, S, H]; _decoder_input scatters it for sequence parallelism.
            language_model.embedding.word_embeddings.reduce_scatter_embeddings = False
            self.vision_model = CLIPVisionTower(cfg.vision, params_dtype, init_weights, use_te)
            self.vision_projection = MultimodalProjector(
                projector_config(cfg, params_dtype, init_weights),
                MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                projector_type="mlp", input_size=cfg.vision.hidden_size,
            )
            if not init_weights:
                mark_tensor_parallel_weights(self.vision_projection)

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def freeze(self, vision: bool = True, projector: bool = False, language: bool = False) -> None:
        """Per-stage switch of what trains (METHOD.md: the vision tower is frozen in every stage)."""
        parts = [(self.language_model, language)]
        if self.pre_process:
            parts += [(self.vision_model, vision), (self.vision_projection, projector)]
        for module, frozen in parts:
            for p in module.parameters():
                p.requires_grad_(not frozen)

    def image_embeddings(self, images_NCHW: torch.Tensor, image_features_NTV: torch.Tensor | None = None
                         ) -> torch.Tensor:
        """[N, 3, R, R] -> [N, T, H] language-space embeddings of the image tokens. `image_features_NTV`: the
        vision tower's output for these images, computed elsewhere (a teacher and student sharing one frozen
        tower, training/models.py shared_vision_tower): only the adapter runs."""
        if image_features_NTV is None:
            image_features_NTV = self.vision_model(images_NCHW)
        elif image_features_NTV.shape[0] != images_NCHW.shape[0]:
            raise ValueError(f"image_features for {image_features_NTV.shape[0]} images, {images_NCHW.shape[0]} given")
        return self.vision_projection(image_features_NTV)

    def _decoder_input(self, input_ids_BS, images_NCHW, image_features_NTV=None):
        from megatron.core import tensor_parallel

        image_mask_BS = input_ids_BS == self.cfg.image_token_id
        n_images = 0 if images_NCHW is None else images_NCHW.shape[0]
        expected = n_images * self.cfg.vision.num_image_tokens
        if int(image_mask_BS.sum()) != expected:
            raise ValueError(
                f"{int(image_mask_BS.sum())} image-token positions (id {self.cfg.image_token_id}) in the batch, but "
                f"{n_images} images x {self.cfg.vision.num_image_tokens} tokens = {expected}: expand each <image> "
                f"placeholder to {self.cfg.vision.num_image_tokens} positions and pass one image per placeholder"
            )
        text_BSH = self.language_model.embedding.word_embeddings(input_ids_BS)
        if n_images:
            image_NTH = self.image_embeddings(images_NCHW, image_features_NTV).to(text_BSH.dtype)
            text_BSH = text_BSH.masked_scatter(image_mask_BS.unsqueeze(-1), image_NTH)
        decoder_input_SBH = text_BSH.transpose(0, 1).contiguous()
        if self.config.sequence_parallel:
            decoder_input_SBH = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input_SBH)
        return decoder_input_SBH

    def forward(self, input_ids_BS, position_ids_BS, images_NCHW=None, attention_mask=None, labels=None,
                padding_mask=None, inference_context=None, image_features=None):
        """`padding_mask` [B, S] (True at padding) keeps padding out of MoE routing statistics.
        `image_features` [N, T, vision hidden]: the vision tower's output for `images_NCHW`, which then does not
        run here (see image_embeddings); first pipeline stage only, ignored elsewhere.
        `inference_context` (megatron's StaticInferenceContext) holds the KV cache of greedy generation; the
        logits then cover the last position only, gathered over the TP ranks."""
        decoder_input = self._decoder_input(input_ids_BS, images_NCHW, image_features) if self.pre_process else None
        if padding_mask is not None and self.pre_process and self.config.sequence_parallel:
            # GPTModel splits the mask for sequence parallelism only when it embeds the tokens itself.
            padding_mask = split_sequence_BS(padding_mask)
        extra = {} if inference_context is None else {"inference_context": inference_context,
                                                      "runtime_gather_output": True}
        return self.language_model(input_ids_BS, position_ids_BS, attention_mask, decoder_input=decoder_input,
                                   labels=labels, padding_mask=padding_mask, **extra)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        sharded = self.language_model.sharded_state_dict(f"{prefix}language_model.", sharded_offsets, metadata)
        if self.pre_process:
            sharded.update(self.vision_model.sharded_state_dict(f"{prefix}vision_model.", (), metadata))
            sharded.update(self.vision_projection.sharded_state_dict(f"{prefix}vision_projection.", (), metadata))
        return sharded


def build_llava_model(cfg: LlavaConfig, params_dtype=torch.float32, init_weights: bool = True,
                      sequence_parallel: bool = False, use_te: bool | None = None) -> LlavaModel:
    from megamod.models.specs import transformer_engine_usable

    use_te = transformer_engine_usable() if use_te is None else use_te
    return on_device(LlavaModel(cfg, params_dtype, init_weights, sequence_parallel, use_te))
