"""`megamod prune`: a smaller model from a subset of a checkpoint's decoder layers (depth pruning).

    python -m megamod prune --ckpt TEACHER --out STUDENT --keep-layers 0,3
    python -m megamod prune --ckpt TEACHER --out STUDENT --keep-layers every:2
    torchrun --nproc-per-node 2 -m megamod prune ... --tp 2           # large models, sharded

Works for language and LLaVA checkpoints, dense or sparse (MoE layers keep their experts and router). The checkpoint
written loads at any TP/PP/EP layout; the command itself runs without pipeline parallelism.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil

import torch

from megamod import checkpoint, distributed
from megamod.models.factory import build_model, read_model
from megamod.models.prune import keep_layers, prune_into, pruned_config

log = logging.getLogger(__name__)


def add_arguments(p) -> None:
    p.add_argument("--ckpt", required=True, help="megamod checkpoint to prune")
    p.add_argument("--out", required=True, help="output directory for the pruned checkpoint")
    p.add_argument("--keep-layers", required=True, help="layer indices '0,3,5' or 'every:K' (0, K, 2K, ..., last)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)


def prune(ckpt: str, out: str, keep: str, tp: int = 1, ep: int = 1) -> dict:
    meta, kind, dtype, cfg, language = read_model(ckpt, "pruned")
    layers = keep_layers(keep, language.num_layers)
    small = pruned_config(language, layers)
    small_cfg = dataclasses.replace(cfg, language=small) if kind == "llava" else small
    distributed.initialize(distributed.ParallelConfig(tp=tp, ep=ep))
    source = build_model(cfg, kind, params_dtype=dtype, init_weights=False)
    checkpoint.load_model(source, ckpt)
    pruned = build_model(small_cfg, kind, params_dtype=dtype, init_weights=False)
    copied = prune_into(source, pruned, layers)
    del source
    checkpoint.save_model(pruned, out, {**meta, "model": small_cfg.to_dict(),
                                        "source": {"pruned_from": ckpt, "layers": layers,
                                                   **meta.get("source", {})}})
    tokenizer = os.path.join(ckpt, "tokenizer")
    if os.path.isdir(tokenizer) and torch.distributed.get_rank() == 0:
        shutil.copytree(tokenizer, os.path.join(out, "tokenizer"))
    torch.distributed.barrier()
    log.info("pruned %s -> %s: kept layers %s of %d (%d tensors copied)", ckpt, out, layers, language.num_layers,
             copied)
    return {"layers": layers, "copied": copied, "num_layers": len(layers)}


def run(args) -> int:
    prune(args.ckpt, args.out, args.keep_layers, args.tp, args.ep)
    distributed.shutdown()
    return 0
