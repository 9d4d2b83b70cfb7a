"""The Qwen1.5 / Qwen2 language model, dense or sparse (Qwen2ForCausalLM / Qwen2MoeForCausalLM on the HF side)."""
from __future__ import annotations

import torch

from megamod.families import qwen2_hf, qwen2_moe_hf
from megamod.families.base import ModelFamily
from megamod.models.language import LanguageModelConfig, build_language_model


class LanguageFamily(ModelFamily):
    kind = "language"
    config_type = LanguageModelConfig
    takes_images = False
    hf_model_types = ("qwen2", "qwen2_moe")
    hf_architectures = ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")

    def language(self, cfg):
        return cfg

    def with_language(self, cfg, language):
        return language

    def build(self, cfg, params_dtype=torch.float32, sequence_parallel=False, init_weights=False, use_te=None):
        return build_language_model(cfg, params_dtype=params_dtype, sequence_parallel=sequence_parallel,
                                    init_weights=init_weights, use_te=use_te)

    def forward(self, model, tokens_BS, position_ids_BS, images_NCHW, padding_mask_BS, image_features=None):
        if images_NCHW is not None or image_features is not None:
            raise ValueError("a language model got images")
        return model(tokens_BS, position_ids_BS, None, padding_mask=padding_mask_BS)

    def config_from_hf(self, hf, where):
        return qwen2_moe_hf.any_config_from_hf(hf, where)

    def config_to_hf(self, cfg, torch_dtype):
        return qwen2_moe_hf.any_config_to_hf(cfg, torch_dtype)

    def hf_rules(self, cfg):
        return qwen2_hf.rules(cfg)


LANGUAGE = LanguageFamily()

