"""`megamod upcycle`: turn a dense megamod checkpoint (language or LLaVA) into a sparse MoE one.

    python -m megamod upcycle --ckpt DENSE --out MOE --num-experts 4 --topk 2 [--moe-layers even]
    torchrun --nproc-per-node 4 -m megamod upcycle ... --tp 2 --ep 2     # large models, sharded

The checkpoint written loads at any TP/PP/EP layout, whatever layout the command ran at.
"""
from __future__ import annotations

from megamod import distributed


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


def run(args) -> int:
    from megamod.convert.upcycle import upcycle

    distributed.initialize(distributed.ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep))
    upcycle(args.ckpt, args.out, args.num_experts, args.topk, args.moe_layers, args.aux_loss_coeff, args.seed,
            args.capacity_factor)
    distributed.shutdown()
    return 0
