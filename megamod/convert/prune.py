"""A smaller model from a checkpoint by depth and/or MLP width pruning (models/prune.py), checkpoint to checkpoint.

Works for language and LLaVA checkpoints; depth pruning for dense or sparse ones (MoE layers keep their experts and
router), width pruning for dense ones at TP=1. Runs in the caller's parallel state (no pipeline parallelism); the
checkpoint written loads at any TP/PP/EP layout. The command: megamod/commands/prune.py.
"""
from __future__ import annotations

import logging
import os
import shutil

import torch

from megamod import checkpoint
from megamod.families.factory import read_model
from megamod.models.prune import keep_layers, prune_into, pruned_config

log = logging.getLogger(__name__)


def prune(ckpt: str, out: str, keep: str = "all", ffn_hidden_size: int | None = None) -> dict:
    """Every rank of the initialised world calls this (pipeline parallel size 1)."""
    from megatron.core import parallel_state as ps

    meta, family, dtype, cfg = read_model(ckpt)
    language = family.language(cfg)
    if keep == "all" and ffn_hidden_size is None:
        raise ValueError("nothing to prune: give --keep-layers and/or --ffn-hidden-size")
    layers = list(range(language.num_layers)) if keep == "all" else keep_layers(keep, language.num_layers)
    small = pruned_config(language, layers, ffn_hidden_size)
    if ffn_hidden_size is not None and ps.get_tensor_model_parallel_world_size() != 1:
        raise ValueError("MLP width pruning ranks neurons across the whole layer: run it at --tp 1")
    if ps.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError("pruning runs without pipeline parallelism (--pp 1)")
    small_cfg = family.with_language(cfg, small)
    source = family.build(cfg, params_dtype=dtype, init_weights=False)
    checkpoint.load_model(source, ckpt)
    pruned = family.build(small_cfg, params_dtype=dtype, init_weights=False)
    copied = prune_into(source, pruned, layers, ffn_hidden_size)
    del source
    checkpoint.save_model(pruned, out, {**meta, "model": small_cfg.to_dict(),
                                        "source": {"pruned_from": ckpt, "layers": layers,
                                                   "ffn_hidden_size": small.ffn_hidden_size,
                                                   **meta.get("source", {})}})
    tokenizer = os.path.join(ckpt, "tokenizer")
    if os.path.isdir(tokenizer) and torch.distributed.get_rank() == 0:
        shutil.copytree(tokenizer, os.path.join(out, "tokenizer"))
    torch.distributed.barrier()
    log.info("pruned %s -> %s: kept layers %s of %d, %d of %d MLP neurons (%d tensors copied)", ckpt, out, layers,
             language.num_layers, small.ffn_hidden_size, language.ffn_hidden_size, copied)
    return {"layers": layers, "copied": copied, "num_layers": len(layers), "ffn_hidden_size": small.ffn_hidden_size}


