"""Models from configs and checkpoints, whatever their family: build one, read a checkpoint's description, write a
freshly initialised one.

A fresh checkpoint is where a model trained from scratch starts (the demo's teacher, a student of a new shape);
its metadata says `source: {init: seed}`, so that it is never mistaken for a trained teacher.
"""
from __future__ import annotations

import os
import shutil

import torch

from megamod import checkpoint, families


def build_model(cfg, params_dtype: torch.dtype = torch.float32, sequence_parallel: bool = False,
                init_weights: bool = False, use_te: bool | None = None):
    """This rank's stage of the model `cfg` describes (its family chosen by the config's type)."""
    return families.of_config(cfg).build(cfg, params_dtype=params_dtype, sequence_parallel=sequence_parallel,
                                         init_weights=init_weights, use_te=use_te)


def read_model(ckpt: str):
    """(metadata, family, dtype, config) of a megamod checkpoint; an unknown kind is an error naming it."""
    meta = checkpoint.read_metadata(ckpt)
    family = families.get(meta.get("kind"), ckpt)
    return meta, family, checkpoint.dtype_from_name(meta["dtype"]), family.config_from_dict(meta["model"])


def checkpoint_metadata(cfg, params_dtype: torch.dtype, source: dict) -> dict:
    return {"format": "megamod", "kind": families.of_config(cfg).kind, "model": cfg.to_dict(),
            "dtype": checkpoint.dtype_name(params_dtype), "source": source}


def init_checkpoint(cfg, out_dir: str, seed: int = 1234, tokenizer_dir: str | None = None,
                    params_dtype: torch.dtype = torch.float32, vision_state: dict | None = None,
                    vision_source: str | None = None) -> None:
    """Every rank of an initialised world calls this; the same seed gives the same weights at any layout.
    `vision_state` (a CLIPVisionTower state dict, one process) replaces the fresh vision tower of a model with one:
    a student starts with its teacher's CLIP, as in LLaVA-MoD; `vision_source` says where it came from."""
    family = families.of_config(cfg)
    torch.manual_seed(seed)
    model = family.build(cfg, params_dtype, init_weights=True)
    source = {"init": seed}
    if vision_state is not None:
        if family.vision(cfg) is None:
            raise ValueError(f"vision_state is for models with a vision tower; this one is a {family.kind} model")
        model.vision_model.load_state_dict(vision_state, strict=True)
        source["vision"] = vision_source or "given"
    checkpoint.save_model(model, out_dir, checkpoint_metadata(cfg, params_dtype, source))
    if tokenizer_dir and torch.distributed.get_rank() == 0:
        shutil.copytree(tokenizer_dir, os.path.join(out_dir, "tokenizer"))
    torch.distributed.barrier()
