"""`megamod upcycle`: turn a dense megamod checkpoint (language or LLaVA) into a sparse MoE one.

    python -m megamod upcycle --ckpt DENSE --out MOE --num-experts 4 --topk 2 [--moe-layers even]
    torchrun --nproc-per-node 4 -m megamod upcycle ... --tp 2 --ep 2     # large models, sharded

The checkpoint written loads at any TP/PP/EP layout, whatever layout the command ran at.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil

import torch

from megamod import checkpoint, distributed
from megamod.models.factory import build_model, read_model
from megamod.models.upcycle import moe_layer_pattern, sparse_config, upcycle_into

log = logging.getLogger(__name__)


def add_arguments(p) -> None:
    p.add_argument("--ckpt", required=True, help="dense megamod checkpoint")
    p.add_argument("--out", required=True, help="output directory for the sparse checkpoint")
    p.add_argument("--num-experts", type=int, default=4)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--moe-layers", default="even", help="'even' (default, as LLaVA-MoD), 'odd', 'all' or '0,2,5'")
    p.add_argument("--aux-loss-coeff", type=float, default=0.01)
    p.add_argument("--capacity-factor", type=float, default=None,
                   help="expert capacity with token dropping (default: dropless)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the routers' initialisation")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)


def upcycle(ckpt: str, out: str, num_experts: int, topk: int, moe_layers: str = "even",
            aux_loss_coeff: float = 0.01, seed: int = 1234, tp: int = 1, pp: int = 1, ep: int = 1,
            capacity_factor: float | None = None) -> dict:
    meta, kind, dtype, dense_cfg, language = read_model(ckpt, "upcycled")
    sparse_language = dataclasses.replace(
        sparse_config(language, num_experts, topk, moe_layer_pattern(moe_layers, language.num_layers), aux_loss_coeff),
        moe_capacity_factor=capacity_factor)
    sparse_cfg = dataclasses.replace(dense_cfg, language=sparse_language) if kind == "llava" else sparse_language
    # The dense model is loaded at the same TP/PP without expert parallelism, so each rank holds the FFN shards
    # its experts need; EP only changes which experts a rank holds.
    distributed.initialize(distributed.ParallelConfig(tp=tp, pp=pp, ep=ep))
    dense_model = build_model(dense_cfg, kind, params_dtype=dtype)
    checkpoint.load_model(dense_model, ckpt)
    sparse_model = build_model(sparse_cfg, kind, params_dtype=dtype)
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


def run(args) -> int:
    upcycle(args.ckpt, args.out, args.num_experts, args.topk, args.moe_layers, args.aux_loss_coeff, args.seed,
            args.tp, args.pp, args.ep, args.capacity_factor)
    distributed.shutdown()
    return 0
