"""HF Qwen2 checkpoint <-> megamod dist checkpoint for the language model, one tensor at a time."""
from __future__ import annotations

import json
import logging
import os

import torch
from tqdm import tqdm

from megamod import checkpoint, distributed
from megamod.convert import qwen2
from megamod.convert.hf_io import HFReader, HFWriter
from megamod.models.language import LanguageModelConfig, build_language_model

log = logging.getLogger(__name__)


def _build_unsharded(cfg: LanguageModelConfig, dtype: torch.dtype):
    # A world of one with the local spec: conversion never needs a GPU, and canonical checkpoint keys do not
    # depend on the spec.
    distributed.initialize(distributed.ParallelConfig())
    return build_language_model(cfg, params_dtype=dtype, init_weights=False, use_te=False)


def _check_names(expected: set, got: set, what: str, where: str) -> None:
    missing, extra = sorted(expected - got), sorted(got - expected)
    if missing or extra:
        raise ValueError(f"{where}: {what} mismatch; missing: {missing or 'none'}; unexpected: {extra or 'none'}")


def hf_to_megamod(hf_dir: str, out_dir: str, dtype: str | None = None) -> LanguageModelConfig:
    reader = HFReader(hf_dir)
    cfg = qwen2.config_from_hf(reader.config, os.path.join(hf_dir, "config.json"))
    rules = qwen2.rules(cfg)
    src_dtype = reader.get(rules["embedding.word_embeddings.weight"].hf_names[0]).dtype
    torch_dtype = checkpoint.dtype_from_name(dtype) if dtype else src_dtype
    model = _build_unsharded(cfg, torch_dtype)
    params = dict(model.named_parameters())
    _check_names(set(rules), set(params), "megamod parameters vs conversion rules", hf_dir)
    for name, rule in tqdm(rules.items(), desc="hf-to-megamod", disable=None):
        tensor = rule.to_megatron(*[reader.get(n) for n in rule.hf_names])
        if tensor.shape != params[name].shape:
            raise ValueError(
                f"{hf_dir}: {', '.join(rule.hf_names)} give shape {tuple(tensor.shape)} for {name}, "
                f"the config implies {tuple(params[name].shape)}"
            )
        with torch.no_grad():
            params[name].copy_(tensor)
    if cfg.tie_word_embeddings and "lm_head.weight" in reader:
        # Some tied checkpoints still store the head; accept it only if it really is the embedding.
        if not torch.equal(reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight")):
            raise ValueError(f"{hf_dir}: tie_word_embeddings=true but lm_head.weight differs from embed_tokens")
    unread = reader.unread()
    if unread:
        raise ValueError(f"{hf_dir}: unexpected tensors not used by the conversion: {unread}")
    reader.close()
    checkpoint.save_model(model, out_dir, {
        "format": "megamod", "kind": "language", "model": cfg.to_dict(),
        "dtype": checkpoint.dtype_name(torch_dtype), "source": os.path.abspath(hf_dir),
    })
    log.info("wrote %s (%d tensors, %s)", out_dir, len(rules), checkpoint.dtype_name(torch_dtype))
    return cfg


def megamod_to_hf(ckpt_dir: str, out_dir: str, shard_bytes: int = 4 * 1024**3) -> None:
    meta = checkpoint.read_metadata(ckpt_dir)
    if meta.get("kind") != "language":
        raise ValueError(f"{ckpt_dir}: kind {meta.get('kind')!r} is not a language model checkpoint")
    cfg = LanguageModelConfig.from_dict(meta["model"])
    dtype = checkpoint.dtype_from_name(meta["dtype"])
    model = _build_unsharded(cfg, dtype)
    checkpoint.load_model(model, ckpt_dir)
    params = dict(model.named_parameters())
    rules = qwen2.rules(cfg)
    _check_names(set(rules), set(params), "megamod parameters vs conversion rules", ckpt_dir)
    writer = HFWriter(out_dir, shard_bytes)
    for name, rule in tqdm(rules.items(), desc="megamod-to-hf", disable=None):
        for hf_name, tensor in zip(rule.hf_names, rule.to_hf(params[name].detach())):
            writer.add(hf_name, tensor.clone())
    writer.close()
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(qwen2.config_to_hf(cfg, meta["dtype"]), f, indent=2)
    log.info("wrote HF checkpoint %s", out_dir)
