"""`megamod prune`: a smaller model from a checkpoint by depth and/or MLP width pruning (megamod/models/prune.py).

    python -m megamod prune --ckpt TEACHER --out STUDENT --keep-layers 0,3          # depth
    python -m megamod prune --ckpt TEACHER --out STUDENT --ffn-hidden-size 2816     # MLP width
    torchrun --nproc-per-node 2 -m megamod prune ... --keep-layers every:2 --tp 2   # large models, sharded (depth)

Works for language and LLaVA checkpoints; depth pruning for dense or sparse ones (MoE layers keep their experts and
router), width pruning for dense ones at TP=1. The checkpoint written loads at any TP/PP/EP layout; the command
itself runs without pipeline parallelism.
"""
from __future__ import annotations

from megamod import distributed


def add_arguments(p) -> None:
    p.add_argument("--ckpt", required=True, help="megamod checkpoint to prune")
    p.add_argument("--out", required=True, help="output directory for the pruned checkpoint")
    p.add_argument("--keep-layers", default="all",
                   help="layer indices '0,3,5', 'every:K' (0, K, 2K, ..., last) or 'all' (default)")
    p.add_argument("--ffn-hidden-size", type=int, default=None,
                   help="MLP neurons kept per layer, the most important by weight norms (default: all)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)


def run(args) -> int:
    from megamod.convert.prune import prune

    distributed.initialize(distributed.ParallelConfig(tp=args.tp, ep=args.ep))
    prune(args.ckpt, args.out, args.keep_layers, args.ffn_hidden_size)
    distributed.shutdown()
    return 0
