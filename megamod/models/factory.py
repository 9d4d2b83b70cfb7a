"""Build a model of either kind from its config, and write a freshly initialised one as a checkpoint.

A fresh checkpoint is where a model trained from scratch starts (the demo's teacher, a student of a new shape);
its metadata says `source: {init: seed}`, so that it is never mistaken for a trained teacher.
"""
from __future__ import annotations

import os
import shutil

import torch

from megamod import checkpoint
from megamod.models.language import LanguageModelConfig, build_language_model
from megamod.models.llava import LlavaConfig, build_llava_model


def config_from_dict(kind: str, d: dict):
    if kind == "llava":
        return LlavaConfig.from_dict(d)
    if kind == "language":
        return LanguageModelConfig.from_dict(d)
    raise ValueError(f"model kind {kind!r} is not language or llava")


def read_model(ckpt: str, action: str):
    """(metadata, kind, dtype, config, its language config) of a language or LLaVA checkpoint that `action`
    (e.g. "upcycled") will rebuild; other kinds are an error naming the checkpoint."""
    meta = checkpoint.read_metadata(ckpt)
    kind = meta.get("kind")
    if kind not in ("llava", "language"):
        raise ValueError(f"{ckpt}: kind {kind!r} cannot be {action}")
    cfg = config_from_dict(kind, meta["model"])
    return meta, kind, checkpoint.dtype_from_name(meta["dtype"]), cfg, (cfg.language if kind == "llava" else cfg)


def build_model(cfg, kind: str, params_dtype: torch.dtype = torch.float32, sequence_parallel: bool = False,
                init_weights: bool = False):
    if kind == "llava":
        return build_llava_model(cfg, params_dtype=params_dtype, init_weights=init_weights,
                                 sequence_parallel=sequence_parallel)
    if kind == "language":
        return build_language_model(cfg, params_dtype=params_dtype, sequence_parallel=sequence_parallel,
                                    init_weights=init_weights)
    raise ValueError(f"model kind {kind!r} is not language or llava")


def init_checkpoint(cfg, kind: str, out_dir: str, seed: int = 1234, tokenizer_dir: str | None = None,
                    params_dtype: torch.dtype = torch.float32, vision_state: dict | None = None,
                    vision_source: str | None = None) -> None:
    """Every rank of an initialised world calls this; the same seed gives the same weights at any layout.
    `vision_state` (a CLIPVisionTower state dict, one process) replaces the fresh vision tower of a LLaVA model:
    a student starts with its teacher's CLIP, as in LLaVA-MoD; `vision_source` says where it came from."""
    torch.manual_seed(seed)
    model = build_model(cfg, kind, params_dtype, init_weights=True)
    source = {"init": seed}
    if vision_state is not None:
        if kind != "llava":
            raise ValueError("vision_state is for LLaVA models; this one is a language model")
        model.vision_model.load_state_dict(vision_state, strict=True)
        source["vision"] = vision_source or "given"
    checkpoint.save_model(model, out_dir, {"format": "megamod", "kind": kind, "model": cfg.to_dict(),
                                           "dtype": checkpoint.dtype_name(params_dtype), "source": source})
    if tokenizer_dir and torch.distributed.get_rank() == 0:
        shutil.copytree(tokenizer_dir, os.path.join(out_dir, "tokenizer"))
    torch.distributed.barrier()
