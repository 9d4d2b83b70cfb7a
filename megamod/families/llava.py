"""LLaVA: a CLIP vision tower, an MLP adapter and a Qwen2 language model (LlavaForConditionalGeneration on the HF
side, in transformers 4.x's on-disk key layout; the others are renamed into it on read)."""
from __future__ import annotations

import dataclasses

import torch

from megamod.families import llava_hf
from megamod.families.base import ModelFamily
from megamod.models.llava import LlavaConfig, build_llava_model


class LlavaFamily(ModelFamily):
    kind = "llava"
    config_type = LlavaConfig
    takes_images = True
    hf_model_types = ("llava",)
    hf_architectures = ("LlavaForConditionalGeneration",)
    hf_embed = llava_hf.TEXT + ".embed_tokens.weight"
    hf_lm_head = llava_hf.LM_HEAD
    hf_text_prefix = llava_hf.TEXT
    hf_rename = staticmethod(llava_hf.canonical_name)

    def language(self, cfg):
        return cfg.language

    def with_language(self, cfg, language):
        return dataclasses.replace(cfg, language=language)

    def image_token_id(self, cfg):
        return cfg.image_token_id

    def vision(self, cfg):
        return cfg.vision

    def build(self, cfg, params_dtype=torch.float32, sequence_parallel=False, init_weights=False, use_te=None):
        return build_llava_model(cfg, params_dtype=params_dtype, init_weights=init_weights,
                                 sequence_parallel=sequence_parallel, use_te=use_te)

    def forward(self, model, tokens_BS, position_ids_BS, images_NCHW, padding_mask_BS, image_features=None):
        extra = {} if image_features is None else {"image_features": image_features}
        return model(tokens_BS, position_ids_BS, images_NCHW, padding_mask=padding_mask_BS, **extra)

    def image_processor(self, cfg):
        from megamod.data.images import ImageProcessor

        v = cfg.vision
        return ImageProcessor(size=v.image_size, mean=v.image_mean, std=v.image_std)

    def positions_per_image(self, cfg):
        return cfg.vision.num_image_tokens

    def config_from_hf(self, hf, where):
        return llava_hf.config_from_hf(hf, where)

    def config_to_hf(self, cfg, torch_dtype):
        return llava_hf.config_to_hf(cfg, torch_dtype)

    def hf_rules(self, cfg):
        return llava_hf.rules(cfg)

    def hf_extra_files(self, cfg):
        return llava_hf.processor_files(cfg)


LLAVA = LlavaFamily()
