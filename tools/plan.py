"""Per-rank memory and FLOPs of a distillation step, online teacher vs cached teacher, and the layouts that fit.

    python tools/plan.py --teacher examples/plan/qwen1.5-110b.yaml --student examples/plan/qwen1.5-1.8b-moe.yaml \
        --gpus 64 --gpu-mem 80 [--tp 8 --pp 4 --ep 4 --mbs 1 --seq 2048 --stage d2s --topk 64]

The teacher on its own ranks (forward only, its own TP/PP/DP; the student on the rest; rows sent point-to-point):

    python tools/plan.py --teacher examples/plan/qwen1.5-110b.yaml --student examples/plan/qwen1.5-1.8b-moe.yaml \
        --gpus 64 --teacher-ranks 48,best [--send topk,full --send-dtype bf16 --link-gbs 50 --peak-tflops 989]

prints each split (N teacher ranks, or `best`: the split of --gpus with the shortest step) beside today's in-job
online layout and the offline cache on the same GPUs: memory per GPU and seconds per step of each side, bytes sent,
the pair's step (max of the sides + transfer) and each side's idle fraction (megamod/planning/split.py).

CFG: a megamod checkpoint directory or a YAML file of LanguageModelConfig fields (examples/plan/). Memory model and
what it leaves out: megamod/planning/memory.py (the CLIP tower, 0.3B frozen parameters on the first pipeline stage,
is not counted). Checked against measured peaks in tests/distributed/test_plan_memory.py.
"""
from __future__ import annotations

import argparse
import dataclasses
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


def _cells(rows: list[list[str]], head: list[str], md: bool) -> str:
    if md:
        return "\n".join("| " + " | ".join(r) + " |" for r in [head, ["---"] * len(head)] + rows)
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(head), "-" * len(fmt(head))] + [fmt(r) for r in rows])


SPLIT_HEAD = ["design", "GPUs T+S", "teacher tp/pp/dp", "teacher GB", "student tp/pp/ep/dp", "student GB",
              "teacher s", "student s", "sent GB/step", "transfer s", "step s", "idle T/S"]
MEM_HEAD = ["design", "T weights", "T activations", "T send", "T buffers", "T total", "S weights", "S grads",
            "S optimizer", "S activations", "S recv", "S buffers", "S total"]


def _split_tables(teacher, student, a, md: bool) -> str:
    from megamod.planning.memory import TRAINS
    from megamod.planning.split import LINK, PEAK, Settings, best_split, cached, in_job, plan_split

    gb = lambda x: f"{x / 1e9:.1f}"  # noqa: E731
    lay3 = lambda l: f"{l.tp}/{l.pp}/{l.dp}"  # noqa: E731
    lay4 = lambda l: f"{l.tp}/{l.pp}/{l.ep}/{l.dp}"  # noqa: E731
    base = Settings(gpu_mem_gb=a.gpu_mem, trains=TRAINS[a.stage], mbs=a.mbs, seq=a.seq, global_batch=a.global_batch,
                    response_tokens=a.response_tokens, topk=a.topk, send_bytes={"bf16": 2, "fp32": 4}[a.send_dtype],
                    peak_tflops=a.peak_tflops, mfu=a.mfu, link_gbs=a.link_gbs)
    student_lay = dict(tp=a.tp, pp=a.pp, ep=a.ep)
    rows, mem_rows = [], []
    for n in a.teacher_ranks.split(","):
        if n != "best" and not n.isdigit():
            raise ValueError(f"teacher.ranks (--teacher-ranks): expected GPU counts or `best`, got {n!r}")
        for send in a.send.split(","):
            s = dataclasses.replace(base, send=send)
            if n == "best":
                p = best_split(teacher, student, a.gpus, s, teacher_tp=a.teacher_tp, teacher_pp=a.teacher_pp,
                               **student_lay)[0]
            else:
                p = plan_split(teacher, student, a.gpus, int(n), s, a.teacher_tp, a.teacher_pp, **student_lay)
            t, st, x = p["teacher"], p["student"], p["transfer"]
            what = f"top-{a.topk}" if send == "topk" else f"full {a.send_dtype}"
            rows.append([f"{'best split' if n == 'best' else 'split'}, {what}",
                         f"{t['layout'].world}+{st['layout'].world}", lay3(t["layout"]),
                         gb(t["memory"]["total"]), lay4(st["layout"]), gb(st["memory"]["total"]),
                         f"{t['seconds']:.3f}", f"{st['seconds']:.3f}", f"{x['sent'] / 1e9:.2f}",
                         f"{x['seconds']:.4f}", f"{p['step']:.3f}",
                         f"{p['teacher_idle']:.0%}/{p['student_idle']:.0%}"])
            tm, sm = t["memory"], st["memory"]
            mem_rows.append([f"{rows[-1][0]}, {rows[-1][1]}"] + [gb(tm[k]) for k in (
                "weights", "activations", "send", "buffers", "total")] + [gb(sm[k]) for k in (
                    "weights", "gradients", "optimizer", "activations", "recv", "buffers", "total")])
    online = in_job(teacher, student, a.gpus, base, **student_lay)
    if online:
        lay, f = online["layout"], online["flops"]
        per = online["step"] / f["total"]
        rows.append(["in job (online)", f"{a.gpus} shared", f"{lay.tp}/{lay.pp}/{lay.dp}", "-", lay4(lay),
                     gb(online["memory"]["total"]), f"{f['teacher'] * per:.3f}", f"{f['student'] * per:.3f}", "-",
                     "-", f"{online['step']:.3f}", "-"])
    else:
        rows.append(["in job (online)", str(a.gpus)] + ["does not fit"] + ["-"] * 9)
    cache = cached(teacher, student, a.gpus, base, **student_lay)
    if cache:
        rows.append([f"offline cache (top-{a.topk})", str(a.gpus), "-", "-", lay4(cache["layout"]),
                     gb(cache["memory"]["total"]), f"({cache['cache_once']:.3f} once)", f"{cache['step']:.3f}",
                     "-", "-", f"{cache['step']:.3f}", "-"])
    notes = [f"Time: model FLOPs per rank / ({PEAK[0]}, {a.peak_tflops:g} TFLOP/s x mfu {a.mfu:g}) x pipeline fill "
             f"and drain; transfer: busiest sending or receiving rank's bytes / {a.link_gbs:g} GB/s "
             f"({LINK[0] if a.link_gbs == LINK[1] else 'given'}); {base.tokens_per_row} response tokens per row; "
             f"GB per GPU, busiest stage, {a.gpu_mem:g} GB GPUs less 10 %."]
    if cache:
        notes.append(f"offline cache: teacher s is its forward of one step's rows on all {a.gpus} GPUs, paid once per "
                     f"pass over the data when the cache is written.")
    out = _cells(rows, SPLIT_HEAD, md) + "\n\n" + "\n".join(notes)
    return out + "\n\nmemory per GPU by kind (GB; T teacher rank, S student rank)\n" + _cells(mem_rows, MEM_HEAD, md)


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
    g = p.add_argument_group("teacher on its own ranks (megamod/planning/split.py)")
    g.add_argument("--teacher-ranks", help="comma list of teacher GPU counts out of --gpus, or `best` (the split "
                   "with the shortest step); prints the split beside the in-job and cached designs")
    g.add_argument("--teacher-tp", type=int, help="fix the teacher's TP (default: its best layout)")
    g.add_argument("--teacher-pp", type=int, help="fix the teacher's PP")
    g.add_argument("--send", default="topk,full", help="comma list of what the teacher sends: topk, full")
    g.add_argument("--send-dtype", default="bf16", choices=("bf16", "fp32"), help="of the sent log-probs")
    g.add_argument("--response-tokens", type=int, help="positions per row that get teacher rows (default: --seq)")
    g.add_argument("--link-gbs", type=float, default=50.0, help="GB/s per GPU link (50: 400 Gb/s InfiniBand NDR)")
    g.add_argument("--peak-tflops", type=float, default=989.0, help="per GPU (989: H100 SXM bf16 dense)")
    g.add_argument("--mfu", type=float, default=1.0, help="fraction of the peak a step runs at (1: time at peak)")
    g.add_argument("--markdown", action="store_true", help="print the split tables as markdown")
    a = p.parse_args(argv)
    student, teacher = load_language_config(a.student), load_language_config(a.teacher)
    if a.teacher_ranks:
        try:
            print(_split_tables(teacher, student, a, a.markdown))
        except ValueError as e:
            p.error(str(e))
        return 0
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
