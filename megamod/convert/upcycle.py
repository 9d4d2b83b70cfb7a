"""A dense megamod checkpoint (language or LLaVA) upcycled into a sparse MoE one (models/upcycle.py), checkpoint to
checkpoint, in the caller's parallel state; the checkpoint written loads at any TP/PP/EP layout. The command:
megamod/commands/upcycle.py.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil

import torch

from megamod import checkpoint
from megamod.families.factory import read_model
from megamod.models.upcycle import moe_layer_pattern, sparse_config, upcycle_into

log = logging.getLogger(__name__)


def upcycle(ckpt: str, out: str, num_experts: int, topk: int, moe_layers: str = "even",
            aux_loss_coeff: float = 0.01, seed: int = 1234, capacity_factor: float | None = None) -> dict:
    """Every rank of the initialised world calls this."""
    meta, family, dtype, dense_cfg = read_model(ckpt)
    language = family.language(dense_cfg)
    sparse_language = dataclasses.replace(
        sparse_config(language, num_experts, topk, moe_layer_pattern(moe_layers, language.num_layers), aux_loss_coeff),
        moe_capacity_factor=capacity_factor)
    sparse_cfg = family.with_language(dense_cfg, sparse_language)
    # The dense model is loaded at the same TP/PP without expert parallelism, so each rank holds the FFN shards
    # its experts need; EP only changes which experts a rank holds.
    dense_model = family.build(dense_cfg, params_dtype=dtype)
    checkpoint.load_model(dense_model, ckpt)
    sparse_model = family.build(sparse_cfg, params_dtype=dtype)
    counts = upcycle_into(dense_model, sparse_model, seed)
    del dense_model
    checkpoint.save_model(sparse_model, out, {**meta, "model": sparse_cfg.to_dict(),
                                              "source": {"upcycled_from": ckpt, **meta.get("source", {})}})
    tokenizer = os.path.join(ckpt, "tokenizer")  # the next stage reads it from the checkpoint, as from any other
    if os.path.isdir(tokenizer) and torch.distributed.get_rank() == 0:
        shutil.copytree(tokenizer, os.path.join(out, "tokenizer"))
    torch.distributed.barrier()
    log.info("upcycled %s -> %s: %d experts, top-%d, MoE layers %s (%d tensors copied, %d routers)", ckpt, out,
             num_experts, topk, [i for i, m in enumerate(sparse_language.moe_layer_pattern) if m],
             counts["copied"], counts["routers"])
    return counts


