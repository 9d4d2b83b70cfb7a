"""HF LlavaForConditionalGeneration (CLIP vision + Qwen2 text) <-> megamod LlavaModel: config and tensor mapping.

HF names here are transformers 4.x's on-disk layout (`vision_tower.vision_model.*`, `multi_modal_projector.*`,
`language_model.model.*`, `language_model.lm_head.weight`), which both transformers 4.57 and 5.x load. Inputs in
the 5.x on-disk layout (`vision_tower.*` without `vision_model.`) or the 4.5x in-memory layout (`model.*`, `lm_head`)
are renamed into it on read.
"""
from __future__ import annotations


from megamod.families import qwen2_hf
from megamod.families.hf_rules import Rule, qkv_rule, same
from megamod.families.qwen2_moe_hf import any_config_from_hf, any_config_to_hf
from megamod.models.llava import LlavaConfig
from megamod.models.vision import VisionConfig

VISION = "vision_tower.vision_model"
PROJECTOR = "multi_modal_projector"
TEXT = "language_model.model"
LM_HEAD = "language_model.lm_head.weight"


def canonical_name(name: str) -> str:
    """Any of the three LLaVA key layouts -> the 4.x on-disk one."""
    if name.startswith("model."):  # 4.5x / 5.x in-memory: model.{vision_tower,multi_modal_projector,language_model}
        name = name[len("model."):]
        if name.startswith("language_model."):
            name = "language_model.model." + name[len("language_model."):]
    elif name == "lm_head.weight":
        return LM_HEAD
    if name.startswith("vision_tower.") and not name.startswith(VISION + "."):
        name = VISION + "." + name[len("vision_tower."):]
    return name


def vision_config_from_hf(vc: dict, where: str, feature_layer: int = -2,
                          select_strategy: str = "default") -> VisionConfig:
    if vc.get("model_type") not in ("clip_vision_model", "clip"):
        raise ValueError(f"{where}: vision model_type {vc.get('model_type')!r} is not supported (CLIP only)")
    if vc.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise ValueError(f"{where}: vision hidden_act {vc['hidden_act']!r} is not supported (CLIP uses quick_gelu)")
    if vc.get("num_channels", 3) != 3:
        raise ValueError(f"{where}: vision num_channels {vc['num_channels']} is not supported")
    return VisionConfig(
        hidden_size=vc["hidden_size"], intermediate_size=vc["intermediate_size"],
        num_layers=vc["num_hidden_layers"], num_attention_heads=vc["num_attention_heads"],
        image_size=vc["image_size"], patch_size=vc["patch_size"], layer_norm_eps=vc.get("layer_norm_eps", 1e-5),
        feature_layer=feature_layer, select_strategy=select_strategy,
    )


def config_from_hf(hf: dict, where: str = "config.json") -> LlavaConfig:
    if hf.get("model_type") != "llava":
        raise ValueError(f"{where}: model_type {hf.get('model_type')!r} is not 'llava'")
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ValueError(f"{where}: vision_feature_layer {layer!r}: only a single layer is supported")
    if hf.get("projector_hidden_act", "gelu") != "gelu" or not hf.get("multimodal_projector_bias", True):
        raise ValueError(f"{where}: only the mlp2x_gelu projector (gelu, with bias) is supported")
    text = dict(hf["text_config"])
    text.setdefault("architectures", ["Qwen2ForCausalLM"])
    language = any_config_from_hf(text, f"{where} text_config")
    if hf.get("tie_word_embeddings") is not None:
        language.tie_word_embeddings = bool(hf["tie_word_embeddings"])
    vision = vision_config_from_hf(hf["vision_config"], f"{where} vision_config", layer,
                                   hf.get("vision_feature_select_strategy", "default"))
    image_token_id = hf.get("image_token_index", hf.get("image_token_id"))
    if image_token_id is None or not 0 <= image_token_id < language.vocab_size:
        raise ValueError(f"{where}: image_token_index {image_token_id!r} is not a token of the text vocabulary")
    return LlavaConfig(language, vision, image_token_id)


def vision_config_to_hf(v: VisionConfig) -> dict:
    return {
        "model_type": "clip_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_attention_heads,
        "image_size": v.image_size, "patch_size": v.patch_size, "layer_norm_eps": v.layer_norm_eps,
        "hidden_act": "quick_gelu", "num_channels": 3, "attention_dropout": 0.0,
    }


def config_to_hf(cfg: LlavaConfig, torch_dtype: str = "float32") -> dict:
    text = any_config_to_hf(cfg.language, torch_dtype)
    text.pop("architectures")
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": text,
        "vision_config": vision_config_to_hf(cfg.vision),
        "image_token_index": cfg.image_token_id,
        "image_seq_length": cfg.vision.num_image_tokens,
        "vision_feature_layer": cfg.vision.feature_layer,
        "vision_feature_select_strategy": cfg.vision.select_strategy,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "tie_word_embeddings": cfg.language.tie_word_embeddings,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }


def vision_rules(v: VisionConfig, hf_prefix: str = VISION, mg_prefix: str = "vision_model") -> dict[str, Rule]:
    """`hf_prefix` is empty for a CLIPVisionModel checkpoint read on its own."""
    hf_prefix = f"{hf_prefix}." if hf_prefix else ""
    rules = {
        f"{mg_prefix}.patch_embedding.weight": same(f"{hf_prefix}embeddings.patch_embedding.weight"),
        f"{mg_prefix}.class_embedding": same(f"{hf_prefix}embeddings.class_embedding"),
        f"{mg_prefix}.position_embedding.weight": same(f"{hf_prefix}embeddings.position_embedding.weight"),
    }
    for p in ("weight", "bias"):
        rules[f"{mg_prefix}.pre_layernorm.{p}"] = same(f"{hf_prefix}pre_layrnorm.{p}")  # sic: HF's spelling
        rules[f"{mg_prefix}.post_layernorm.{p}"] = same(f"{hf_prefix}post_layernorm.{p}")
    for i in range(v.num_layers):
        mg, hf = f"{mg_prefix}.decoder.layers.{i}", f"{hf_prefix}encoder.layers.{i}"
        for p in ("weight", "bias"):
            rules[f"{mg}.input_layernorm.{p}"] = same(f"{hf}.layer_norm1.{p}")
            rules[f"{mg}.pre_mlp_layernorm.{p}"] = same(f"{hf}.layer_norm2.{p}")
            heads = v.num_attention_heads  # CLIP attention is MHA: one head per megatron query group
            rules[f"{mg}.self_attention.linear_qkv.{p}"] = qkv_rule(hf, p, heads, 1, v.hidden_size // heads)
            rules[f"{mg}.self_attention.linear_proj.{p}"] = same(f"{hf}.self_attn.out_proj.{p}")
            rules[f"{mg}.mlp.linear_fc1.{p}"] = same(f"{hf}.mlp.fc1.{p}")
            rules[f"{mg}.mlp.linear_fc2.{p}"] = same(f"{hf}.mlp.fc2.{p}")
    return rules


def projector_rules() -> dict[str, Rule]:
    return {
        f"vision_projection.encoder.linear_fc{i}.{p}": same(f"{PROJECTOR}.linear_{i}.{p}")
        for i in (1, 2) for p in ("weight", "bias")
    }


def language_rules(cfg: LlavaConfig, hf_prefix: str = TEXT, lm_head: str = LM_HEAD) -> dict[str, Rule]:
    return {f"language_model.{k}": r for k, r in qwen2_hf.rules(cfg.language, hf_prefix, lm_head).items()}


def rules(cfg: LlavaConfig) -> dict[str, Rule]:
    """All Megatron tensor names of the unsharded LLaVA model, each with its HF rule."""
    return {**vision_rules(cfg.vision), **projector_rules(), **language_rules(cfg)}


def processor_files(cfg: LlavaConfig) -> dict:
    v = cfg.vision
    image_processor = {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": v.image_size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": v.image_size, "width": v.image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(v.image_mean),
        "image_std": list(v.image_std), "do_convert_rgb": True,
    }
    processor = {
        "processor_class": "LlavaProcessor", "patch_size": v.patch_size,
        "vision_feature_select_strategy": v.select_strategy,
        # CLIP's class token: with the default 0 the processor expands <image> to one position too few
        "num_additional_image_tokens": 1, "image_token": "<image>",
    }
    return {"preprocessor_config.json": image_processor, "processor_config.json": processor}
