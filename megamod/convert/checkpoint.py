"""HF checkpoint <-> megamod dist checkpoint, one tensor at a time, for every model family megamod knows.

Families: `language` (Qwen2ForCausalLM) and `llava` (LlavaForConditionalGeneration with a Qwen2 text model and a
CLIP vision tower, or a CLIP + Qwen2 pair with a freshly initialised adapter for the alignment stage).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from megamod import checkpoint, distributed
from megamod.convert import llava, qwen2, qwen2_moe
from megamod.convert.hf_io import HFReader, HFWriter
from megamod.models.language import LanguageModelConfig, build_language_model
from megamod.models.llava import LlavaConfig, build_llava_model

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "qwen.tiktoken", "chat_template.jinja", "added_tokens.json")


@dataclass(frozen=True)
class Family:
    kind: str
    config_from_dict: Callable
    rules: Callable
    build: Callable
    config_to_hf: Callable


FAMILIES = {
    "language": Family("language", LanguageModelConfig.from_dict, qwen2.rules, build_language_model,
                       qwen2.any_config_to_hf),
    "llava": Family("llava", LlavaConfig.from_dict, llava.rules, build_llava_model, llava.config_to_hf),
}


def _build_unsharded(family: Family, cfg, dtype: torch.dtype):
    # A world of one with the local spec: conversion never needs a GPU, and canonical checkpoint keys do not
    # depend on the spec.
    distributed.initialize(distributed.ParallelConfig())
    return family.build(cfg, params_dtype=dtype, init_weights=False, use_te=False)


def _check_names(expected: set, got: set, what: str, where: str) -> None:
    missing, extra = sorted(expected - got), sorted(got - expected)
    if missing or extra:
        raise ValueError(f"{where}: {what} mismatch; missing: {missing or 'none'}; unexpected: {extra or 'none'}")


def _fill(params: dict, rules: dict, reader: HFReader, desc: str) -> None:
    for name, rule in tqdm(rules.items(), desc=desc, disable=None):
        tensor = rule.to_megatron(*[reader.get(n) for n in rule.hf_names])
        if tensor.shape != params[name].shape:
            raise ValueError(
                f"{reader.dir}: {', '.join(rule.hf_names)} give shape {tuple(tensor.shape)} for {name}, "
                f"the config implies {tuple(params[name].shape)}"
            )
        with torch.no_grad():
            params[name].copy_(tensor)


def _check_all_read(reader: HFReader, ignored=lambda name: False) -> None:
    unread = [n for n in reader.unread() if not ignored(n)]
    if unread:
        raise ValueError(f"{reader.dir}: unexpected tensors not used by the conversion: {unread}")


def _check_tied_head(reader: HFReader, head: str, embed: str) -> None:
    # Some tied checkpoints still store the head; accept it only if it really is the embedding.
    if head in reader and not torch.equal(reader.get(head), reader.get(embed)):
        raise ValueError(f"{reader.dir}: tie_word_embeddings=true but {head} differs from {embed}")


def _copy_tokenizer(src: str, dst: str) -> None:
    files = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(src, f))]
    if files:
        os.makedirs(dst, exist_ok=True)
        for f in files:
            shutil.copy2(os.path.join(src, f), os.path.join(dst, f))


def _save(model, out_dir: str, kind: str, cfg, dtype: torch.dtype, source: dict, tokenizer_dir: str) -> None:
    checkpoint.save_model(model, out_dir, {"format": "megamod", "kind": kind, "model": cfg.to_dict(),
                                           "dtype": checkpoint.dtype_name(dtype), "source": source})
    if torch.distributed.get_rank() == 0:
        _copy_tokenizer(tokenizer_dir, os.path.join(out_dir, "tokenizer"))
    log.info("wrote %s (%s, %s)", out_dir, kind, checkpoint.dtype_name(dtype))


def hf_to_megamod(hf_dir: str, out_dir: str, dtype: str | None = None, vision_dir: str | None = None,
                  image_token_id: int | None = None, vision_feature_layer: int = -2):
    """Convert an HF Qwen2 or LLaVA directory; with `vision_dir`, compose LLaVA from CLIP + Qwen2."""
    if vision_dir is not None:
        return _pair_to_megamod(hf_dir, vision_dir, out_dir, dtype, image_token_id, vision_feature_layer)
    with open(os.path.join(hf_dir, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    kind = "llava" if model_type == "llava" else "language"
    reader = HFReader(hf_dir, rename=llava.canonical_name if kind == "llava" else None)
    where = os.path.join(hf_dir, "config.json")
    cfg = llava.config_from_hf(reader.config, where) if kind == "llava" else qwen2.any_config_from_hf(reader.config,
                                                                                                      where)
    family = FAMILIES[kind]
    rules = family.rules(cfg)
    embed = llava.TEXT + ".embed_tokens.weight" if kind == "llava" else "model.embed_tokens.weight"
    torch_dtype = checkpoint.dtype_from_name(dtype) if dtype else reader.get(embed).dtype
    model = _build_unsharded(family, cfg, torch_dtype)
    params = dict(model.named_parameters())
    _check_names(set(rules), set(params), "megamod parameters vs conversion rules", hf_dir)
    _fill(params, rules, reader, "hf-to-megamod")
    language = cfg.language if kind == "llava" else cfg
    if language.tie_word_embeddings:
        _check_tied_head(reader, llava.LM_HEAD if kind == "llava" else "lm_head.weight", embed)
    _check_all_read(reader, ignored=lambda n: (language.tie_word_embeddings and n.endswith("lm_head.weight"))
                    or qwen2_moe.is_zero_shared_expert(n, reader.get(n).shape))
    reader.close()
    _save(model, out_dir, kind, cfg, torch_dtype, {"hf": os.path.abspath(hf_dir)}, hf_dir)
    return cfg


def _strip_vision_model(name: str) -> str:
    return name[len("vision_model."):] if name.startswith("vision_model.") else name


def _clip_unused(name: str) -> bool:
    """Parts of a full CLIPModel checkpoint that a vision tower does not use."""
    return name.startswith(("text_model.", "text_projection.", "visual_projection.")) or name == "logit_scale"


def _image_token_from_tokenizer(hf_dir: str) -> int:
    path = os.path.join(hf_dir, "tokenizer.json")
    if os.path.exists(path):
        with open(path) as f:
            for token in json.load(f).get("added_tokens", []):
                if token["content"] == "<image>":
                    return token["id"]
    raise ValueError(f"{hf_dir}: no <image> token in tokenizer.json; add one to the tokenizer, or pass "
                     f"--image-token-id")


def _pair_to_megamod(hf_dir, vision_dir, out_dir, dtype, image_token_id, feature_layer):
    lm_reader = HFReader(hf_dir)
    vision_reader = HFReader(vision_dir, rename=_strip_vision_model)
    language = qwen2.config_from_hf(lm_reader.config, os.path.join(hf_dir, "config.json"))
    vc = vision_reader.config.get("vision_config", vision_reader.config)  # CLIPModel nests it
    vision = llava.vision_config_from_hf(vc, os.path.join(vision_dir, "config.json"), feature_layer)
    if image_token_id is None:
        image_token_id = _image_token_from_tokenizer(hf_dir)
    if not 0 <= image_token_id < language.vocab_size:
        raise ValueError(f"image token id {image_token_id} is outside the vocabulary [0, {language.vocab_size})")
    cfg = LlavaConfig(language, vision, image_token_id)
    family = FAMILIES["llava"]
    torch_dtype = checkpoint.dtype_from_name(dtype) if dtype else lm_reader.get("model.embed_tokens.weight").dtype
    model = _build_unsharded(family, cfg, torch_dtype)
    params = dict(model.named_parameters())
    vision_rules = llava.vision_rules(vision, hf_prefix="")
    language_rules = llava.language_rules(cfg, "model", "lm_head.weight")
    adapter = sorted(set(params) - set(vision_rules) - set(language_rules))
    _check_names(set(llava.projector_rules()), set(adapter), "adapter parameters", out_dir)
    _fill(params, vision_rules, vision_reader, "vision")
    _fill(params, language_rules, lm_reader, "language")
    _init_adapter(model.vision_projection)
    if language.tie_word_embeddings:
        _check_tied_head(lm_reader, "lm_head.weight", "model.embed_tokens.weight")
    _check_all_read(lm_reader, ignored=lambda n: language.tie_word_embeddings and n == "lm_head.weight")
    _check_all_read(vision_reader, ignored=_clip_unused)
    log.info("adapter freshly initialised: %s", ", ".join(adapter))
    _save(model, out_dir, "llava", cfg, torch_dtype,
          {"hf": os.path.abspath(hf_dir), "vision": os.path.abspath(vision_dir)}, hf_dir)
    return cfg


def _init_adapter(projector) -> None:
    """torch.nn.Linear's default init, as LLaVA's alignment stage starts from."""
    with torch.no_grad():
        for linear in (projector.encoder.linear_fc1, projector.encoder.linear_fc2):
            torch.nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(linear.weight.shape[1])
            torch.nn.init.uniform_(linear.bias, -bound, bound)


def _processor_files(cfg: LlavaConfig) -> dict:
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


def megamod_to_hf(ckpt_dir: str, out_dir: str, shard_bytes: int = 4 * 1024**3) -> None:
    meta = checkpoint.read_metadata(ckpt_dir)
    family = FAMILIES.get(meta.get("kind"))
    if family is None:
        raise ValueError(f"{ckpt_dir}: kind {meta.get('kind')!r} cannot be exported (known: {sorted(FAMILIES)})")
    cfg = family.config_from_dict(meta["model"])
    dtype = checkpoint.dtype_from_name(meta["dtype"])
    model = _build_unsharded(family, cfg, dtype)
    checkpoint.load_model(model, ckpt_dir)
    params = dict(model.named_parameters())
    rules = family.rules(cfg)
    _check_names(set(rules), set(params), "megamod parameters vs conversion rules", ckpt_dir)
    writer = HFWriter(out_dir, shard_bytes)
    for name, rule in tqdm(rules.items(), desc="megamod-to-hf", disable=None):
        for hf_name, tensor in zip(rule.hf_names, rule.to_hf(params[name].detach())):
            writer.add(hf_name, tensor.clone())
    language = cfg.language if family.kind == "llava" else cfg
    if language.num_experts is not None:
        hf_prefix = llava.TEXT if family.kind == "llava" else "model"
        for hf_name, tensor in qwen2_moe.zero_shared_expert(language, hf_prefix, dtype).items():
            writer.add(hf_name, tensor)
    writer.close()
    files = {"config.json": family.config_to_hf(cfg, meta["dtype"])}
    if family.kind == "llava":
        files.update(_processor_files(cfg))
    for fname, content in files.items():
        with open(os.path.join(out_dir, fname), "w") as f:
            json.dump(content, f, indent=2)
    _copy_tokenizer(os.path.join(ckpt_dir, "tokenizer"), out_dir)
    log.info("wrote HF checkpoint %s", out_dir)
