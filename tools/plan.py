"""Per-rank memory and FLOPs of a distillation step, online teacher vs cached teacher, and the layouts that fit.

    python tools/plan.py --teacher examples/plan/qwen1.5-110b.yaml --student examples/plan/qwen1.5-1.8b-moe.yaml \
        --gpus 64 --gpu-mem 80 [--tp 8 --pp 4 --ep 4 --mbs 1 --seq 2048 --stage d2s --topk 64]

CFG: a megamod checkpoint directory or a YAML file of LanguageModelConfig fields (examples/plan/). Memory model and
what it leaves out: megamod/planning/memory.py (the CLIP tower, 0.3B frozen parameters on the first pipeline stage,
is not counted). Checked against measured peaks in tests/distributed/test_plan_memory.py.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KINDS = ("weights", "gradients", "optimizer", "activations", "teacher", "buffers", "total")


def _table(rows: list[dict], limit: int) -> str:
    head = f"{'tp':>3} {'pp':>3} {'ep':>3} {'dp':>4} | " + " ".join(f"{k[:6]:>7}" for k in KINDS) + \
        " | TFLOP/rank  fits"
    lines = [head, "-" * len(head)]
    for r in rows[:limit]:
        lay, mem = r["layout"], r["memory"]
        lines.append(f"{lay.tp:>3} {lay.pp:>3} {lay.ep:>3} {lay.dp:>4} | " + " ".join(
            f"{mem[k] / 1e9:7.1f}" for k in KINDS) + f" | {r['flops']['total'] / 1e12:10.1f}  {'yes' if r['fits'] else 'no'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from megamod.planning.memory import TRAINS
    from megamod.planning.search import load_language_config, search

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GB per GPU")
    p.add_argument("--tp", type=int)
    p.add_argument("--pp", type=int)
    p.add_argument("--ep", type=int)
    p.add_argument("--mbs", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048, help="sequence length (text + 576 image positions)")
    p.add_argument("--global-batch", type=int, default=128)
    p.add_argument("--stage", default="d2s", choices=sorted(TRAINS), help="what trains (d2s: FFNs and routers)")
    p.add_argument("--topk", type=int, default=64, help="cached teacher: top-k per position")
    p.add_argument("--rows", type=int, default=8, help="layouts shown per table")
    a = p.parse_args(argv)
    student, teacher = load_language_config(a.student), load_language_config(a.teacher)
    common = dict(gpus=a.gpus, gpu_mem_gb=a.gpu_mem, trains=TRAINS[a.stage], mbs=a.mbs, seq=a.seq,
                  global_batch=a.global_batch, tp=a.tp, pp=a.pp, ep=a.ep)
    for title, rows in (("online teacher", search(student, teacher, **common)),
                        (f"cached teacher (top-{a.topk})", search(student, None, cached_topk=a.topk, **common))):
        fits = sum(r["fits"] for r in rows)
        print(f"\n{title}: {fits} of {len(rows)} layouts fit in {a.gpu_mem:g} GB (GB per rank, busiest stage)")
        print(_table(rows, a.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
