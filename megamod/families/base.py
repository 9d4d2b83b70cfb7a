"""What megamod knows about one kind of model, in one object: the config type, how to build it, what its forward
takes, what the data pipeline must give it, and how its tensors and config map to HF. Callers ask the family
(`megamod.families`) and never compare kind strings; a new family (a Qwen2-VL, a SigLIP tower) is one new module.
"""
from __future__ import annotations

from typing import Callable

import torch


class ModelFamily:
    kind: str                       # the checkpoint metadata's "kind"
    config_type: type               # LanguageModelConfig, LlavaConfig, ...
    takes_images: bool              # the forward reads images; collation expands <image> ids
    hf_model_types: tuple = ()      # the HF config.json model_type values this family converts ...
    hf_architectures: tuple = ()    # ... and their architectures, in the same order

    # --- config ---
    def config_from_dict(self, d: dict):
        return self.config_type.from_dict(d)

    def language(self, cfg):
        """The language model's config (its vocabulary, layers, experts)."""
        raise NotImplementedError

    def with_language(self, cfg, language):
        """`cfg` with another language-model config (pruned, upcycled, wider vocabulary)."""
        raise NotImplementedError

    def image_token_id(self, cfg) -> int | None:
        return None

    def vision(self, cfg):
        """The vision tower's config, None without one."""
        return None

    # --- model ---
    def build(self, cfg, params_dtype: torch.dtype = torch.float32, sequence_parallel: bool = False,
              init_weights: bool = False, use_te: bool | None = None):
        """This rank's pipeline stage of the model."""
        raise NotImplementedError

    def forward(self, model, tokens_BS, position_ids_BS, images_NCHW, padding_mask_BS, image_features=None):
        """One forward in training/scoring form: logits on the last pipeline stage, hidden states elsewhere.
        `padding_mask_BS` (True at padding; None for dense models) keeps padding out of MoE routing statistics."""
        raise NotImplementedError

    # --- data ---
    def image_processor(self, cfg):
        """The data pipeline's ImageProcessor for this model's tower (a default one without a tower)."""
        from megamod.data.images import ImageProcessor

        return ImageProcessor()

    def positions_per_image(self, cfg) -> int:
        """Sequence positions one <image> id expands to (1: it is not expanded)."""
        return 1

    # --- HF conversion ---
    hf_embed: str = "model.embed_tokens.weight"
    hf_lm_head: str = "lm_head.weight"
    hf_text_prefix: str = "model"
    hf_rename: Callable[[str], str] | None = None  # other on-disk key layouts -> the one the rules name

    def config_from_hf(self, hf: dict, where: str):
        raise NotImplementedError

    def config_to_hf(self, cfg, torch_dtype: str) -> dict:
        raise NotImplementedError

    def hf_rules(self, cfg) -> dict:
        """Megatron tensor name (unsharded, local spec) -> hf_rules.Rule."""
        raise NotImplementedError

    def hf_extra_files(self, cfg) -> dict:
        """Other JSON files an HF export carries (a processor's), name -> content."""
        return {}

    def __repr__(self) -> str:
        return f"<model family {self.kind}>"
