"""`megamod prune`: a smaller model from a checkpoint by depth and/or MLP width pruning (megamod/models/prune.py).

    python -m megamod prune --ckpt TEACHER --out STUDENT --keep-layers 0,3          # depth
    python -m megamod prune --ckpt TEACHER --out STUDENT --ffn-hidden-size 2816     # MLP width
    torchrun --nproc-per-node 2 -m megamod prune ... --keep-layers every:2 --tp 2   # large models, sharded (depth)

Works for language and LLaVA checkpoints; depth pruning for dense or sparse ones (MoE layers keep their experts and
router), width pruning for dense ones at TP=1. The checkpoint written loads at any TP/PP/EP layout; the command
itself runs without pipeline parallelism.
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
    p.add_argument("--keep-layers", default="all",
                   help="layer indices '0,3,5', 'every:K' (0, K, 2K, ..., last) or 'all' (default)")
    p.add_argument("--ffn-hidden-size", type=int, default=None,
                   help="MLP neurons kept per layer, the most important by weight norms (default: all)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)


def prune(ckpt: str, out: str, keep: str = "all", ffn_hidden_size: int | None = None, tp: int = 1,
          ep: int = 1) -> dict:
    meta, kind, dtype, cfg, language = read_model(ckpt, "pruned")
    if keep == "all" and ffn_hidden_size is None:
        raise ValueError("nothing to prune: give --keep-layers and/or --ffn-hidden-size")
    layers = list(range(language.num_layers)) if keep == "all" else keep_layers(keep, language.num_layers)
    small = pruned_config(language, layers, ffn_hidden_size)
    if ffn_hidden_size is not None and tp != 1:
        raise ValueError("MLP width pruning ranks neurons across the whole layer: run it at --tp 1")
    small_cfg = dataclasses.replace(cfg, language=small) if kind == "llava" else small
    distributed.initialize(distributed.ParallelConfig(tp=tp, ep=ep))
    source = build_model(cfg, kind, params_dtype=dtype, init_weights=False)
    checkpoint.load_model(source, ckpt)
    pruned = build_model(small_cfg, kind, params_dtype=dtype, init_weights=False)
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


def run(args) -> int:
    prune(args.ckpt, args.out, args.keep_layers, args.ffn_hidden_size, args.tp, args.ep)
    distributed.shutdown()
    return 0
