"""HF checkpoint <-> megamod dist checkpoint, one tensor at a time, for every model family megamod knows
(megamod.families: each family says its HF model types, config mapping and tensor rules), plus the composition of a
LLaVA model from a CLIP checkpoint and a Qwen2 one with a freshly initialised adapter, for the alignment stage.

Conversion builds the model unsharded: it runs in a world whose parallel state is TP = PP = 1, which its caller
(tools/convert_hf.py, a test, the demo) set up.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil

import torch
from tqdm import tqdm

from megamod import checkpoint, families
from megamod.convert.hf_io import HFReader, HFWriter
from megamod.families import llava_hf, qwen2_hf, qwen2_moe_hf
from megamod.families.factory import checkpoint_metadata
from megamod.families.llava import LLAVA
from megamod.models.llava import LlavaConfig

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "qwen.tiktoken", "chat_template.jinja", "added_tokens.json")


def _build_unsharded(family, cfg, dtype: torch.dtype):
    # The local spec: conversion never needs a GPU, and canonical checkpoint keys do not depend on the spec.
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized() or ps.get_tensor_model_parallel_world_size() != 1 \
            or ps.get_pipeline_model_parallel_world_size() != 1:
        raise RuntimeError("checkpoint conversion builds the whole model on one rank: call "
                           "megamod.distributed.initialize(ParallelConfig()) (TP = PP = 1) before converting")
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


def _save(model, out_dir: str, cfg, dtype: torch.dtype, source: dict, tokenizer_dir: str) -> None:
    meta = checkpoint_metadata(cfg, dtype, source)
    checkpoint.save_model(model, out_dir, meta)
    if torch.distributed.get_rank() == 0:
        _copy_tokenizer(tokenizer_dir, os.path.join(out_dir, "tokenizer"))
    log.info("wrote %s (%s, %s)", out_dir, meta["kind"], meta["dtype"])


def hf_to_megamod(hf_dir: str, out_dir: str, dtype: str | None = None, vision_dir: str | None = None,
                  image_token_id: int | None = None, vision_feature_layer: int = -2):
    """Convert an HF Qwen2 or LLaVA directory; with `vision_dir`, compose LLaVA from CLIP + Qwen2."""
    if vision_dir is not None:
        return _pair_to_megamod(hf_dir, vision_dir, out_dir, dtype, image_token_id, vision_feature_layer)
    where = os.path.join(hf_dir, "config.json")
    with open(where) as f:
        family = families.of_hf(json.load(f), where)
    reader = HFReader(hf_dir, rename=family.hf_rename)
    cfg = family.config_from_hf(reader.config, where)
    rules = family.hf_rules(cfg)
    torch_dtype = checkpoint.dtype_from_name(dtype) if dtype else reader.get(family.hf_embed).dtype
    model = _build_unsharded(family, cfg, torch_dtype)
    params = dict(model.named_parameters())
    _check_names(set(rules), set(params), "megamod parameters vs conversion rules", hf_dir)
    _fill(params, rules, reader, "hf-to-megamod")
    language = family.language(cfg)
    if language.tie_word_embeddings:
        _check_tied_head(reader, family.hf_lm_head, family.hf_embed)
    _check_all_read(reader, ignored=lambda n: (language.tie_word_embeddings and n.endswith("lm_head.weight"))
                    or qwen2_moe_hf.is_zero_shared_expert(n, reader.get(n).shape))
    reader.close()
    _save(model, out_dir, cfg, torch_dtype, {"hf": os.path.abspath(hf_dir)}, hf_dir)
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
    language = qwen2_hf.config_from_hf(lm_reader.config, os.path.join(hf_dir, "config.json"))
    vc = vision_reader.config.get("vision_config", vision_reader.config)  # CLIPModel nests it
    vision = llava_hf.vision_config_from_hf(vc, os.path.join(vision_dir, "config.json"), feature_layer)
    if image_token_id is None:
        image_token_id = _image_token_from_tokenizer(hf_dir)
    if not 0 <= image_token_id < language.vocab_size:
        raise ValueError(f"image token id {image_token_id} is outside the vocabulary [0, {language.vocab_size})")
    cfg = LlavaConfig(language, vision, image_token_id)
    family = LLAVA
    torch_dtype = checkpoint.dtype_from_name(dtype) if dtype else lm_reader.get("model.embed_tokens.weight").dtype
    model = _build_unsharded(family, cfg, torch_dtype)
    params = dict(model.named_parameters())
    vision_rules = llava_hf.vision_rules(vision, hf_prefix="")
    language_rules = llava_hf.language_rules(cfg, "model", "lm_head.weight")
    adapter = sorted(set(params) - set(vision_rules) - set(language_rules))
    _check_names(set(llava_hf.projector_rules()), set(adapter), "adapter parameters", out_dir)
    _fill(params, vision_rules, vision_reader, "vision")
    _fill(params, language_rules, lm_reader, "language")
    _init_adapter(model.vision_projection)
    if language.tie_word_embeddings:
        _check_tied_head(lm_reader, "lm_head.weight", "model.embed_tokens.weight")
    _check_all_read(lm_reader, ignored=lambda n: language.tie_word_embeddings and n == "lm_head.weight")
    _check_all_read(vision_reader, ignored=_clip_unused)
    log.info("adapter freshly initialised: %s", ", ".join(adapter))
    _save(model, out_dir, cfg, torch_dtype,
          {"hf": os.path.abspath(hf_dir), "vision": os.path.abspath(vision_dir)}, hf_dir)
    return cfg


def _init_adapter(projector) -> None:
    """torch.nn.Linear's default init, as LLaVA's alignment stage starts from."""
    with torch.no_grad():
        for linear in (projector.encoder.linear_fc1, projector.encoder.linear_fc2):
            torch.nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(linear.weight.shape[1])
            torch.nn.init.uniform_(linear.bias, -bound, bound)


def megamod_to_hf(ckpt_dir: str, out_dir: str, shard_bytes: int = 4 * 1024**3) -> None:
    meta = checkpoint.read_metadata(ckpt_dir)
    family = families.get(meta.get("kind"), ckpt_dir)
    cfg = family.config_from_dict(meta["model"])
    dtype = checkpoint.dtype_from_name(meta["dtype"])
    model = _build_unsharded(family, cfg, dtype)
    checkpoint.load_model(model, ckpt_dir)
    params = dict(model.named_parameters())
    rules = family.hf_rules(cfg)
    _check_names(set(rules), set(params), "megamod parameters vs conversion rules", ckpt_dir)
    writer = HFWriter(out_dir, shard_bytes)
    for name, rule in tqdm(rules.items(), desc="megamod-to-hf", disable=None):
        for hf_name, tensor in zip(rule.hf_names, rule.to_hf(params[name].detach())):
            writer.add(hf_name, tensor.clone())
    language = family.language(cfg)
    if language.num_experts is not None:
        for hf_name, tensor in qwen2_moe_hf.zero_shared_expert(language, family.hf_text_prefix, dtype).items():
            writer.add(hf_name, tensor)
    writer.close()
    files = {"config.json": family.config_to_hf(cfg, meta["dtype"]), **family.hf_extra_files(cfg)}
    for fname, content in files.items():
        with open(os.path.join(out_dir, fname), "w") as f:
            json.dump(content, f, indent=2)
    _copy_tokenizer(os.path.join(ckpt_dir, "tokenizer"), out_dir)
    log.info("wrote HF checkpoint %s", out_dir)
