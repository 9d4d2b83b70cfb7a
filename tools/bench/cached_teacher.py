"""Step time of a student trained from a cached teacher vs plain SFT, and with an online teacher vs
(student step + teacher forward) measured apart.

    python tools/bench/cached_teacher.py [--root DIR] [--steps 8] [--topk 64] [--out bench.json]

Runs in one process on the tiny LLaVA set-up of the engine tests (tests/training_setup.py: synthetic data, a
trained tiny teacher, a dense student), built under --root if absent, with a cache written there by
cache-teacher's writer. Per-step times are the trainer's own (`step_s`: data, forward, backward, optimizer),
median over the steps after --warmup; the teacher forward is timed on the same micro-batches under no_grad.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _median_step(recipe: dict, warmup: int) -> tuple[float, object]:
    from megamod.training.config import load_config
    from megamod.training.trainer import Trainer

    trainer = Trainer(load_config(base=recipe))
    history = trainer.train()
    return statistics.median(h["step_s"] for h in history[warmup:]), trainer


def _teacher_forward(p: dict, trainer, steps: int, warmup: int) -> float:
    """Median time of the teacher's forward over one step's micro-batches (what the online step adds)."""
    import torch

    from megamod.loading.models import load_teacher
    from megamod.families.llava import LLAVA
    from megamod.loading.microbatch import run_model

    teacher = load_teacher(p["teacher"], trainer.student, torch.float32, False)
    batches = iter(trainer.loader)
    times = []
    for _ in range(steps):
        mbs = trainer._micro_batches(batches)
        start = time.perf_counter()
        with torch.no_grad():
            for mb in mbs:
                run_model(teacher.model, mb, LLAVA)
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


def main(argv=None) -> int:
    a = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "megamod-bench-cache"))
    a.add_argument("--steps", type=int, default=8)
    a.add_argument("--warmup", type=int, default=2)
    a.add_argument("--topk", type=int, default=64)
    a.add_argument("--out", default=None, help="write the results as JSON")
    args = a.parse_args(argv)

    from megamod import distributed
    from megamod.teacher_cache.writer import CacheJob, write_cache
    from megamod.training.config import DataSource
    from tests.training_setup import base_recipe, build

    p = build(args.root)
    cache = os.path.join(args.root, f"cache-top{args.topk}")
    distributed.initialize(distributed.ParallelConfig())
    write_cache(CacheJob(ckpt=p["teacher"], data=[DataSource(os.path.join(p["data"], "conversations.json"))],
                         out=cache, topk=args.topk, max_length=256, progress=False))
    runs = os.path.join(args.root, f"runs-{os.getpid()}")
    common = dict(schedule={"steps": args.steps}, checkpoint={"every": 0, "keep": 1},
                  data={"epoch_size": 10_000})
    sft, trainer = _median_step(base_recipe(p["root"], "sft", p["student"], os.path.join(runs, "sft"), **common),
                                args.warmup)
    cached, _ = _median_step(base_recipe(p["root"], "d2d", p["student"], os.path.join(runs, "cached"),
                                         teacher={"cache": cache}, **common), args.warmup)
    online, _ = _median_step(base_recipe(p["root"], "d2d", p["student"], os.path.join(runs, "online"),
                                         teacher=p["teacher"], **common), args.warmup)
    teacher_fwd = _teacher_forward(p, trainer, args.steps, args.warmup)
    result = {"sft_step_s": sft, "cached_step_s": cached, "cached_over_sft": cached / sft, "online_step_s": online,
              "teacher_forward_s": teacher_fwd, "online_over_sft_plus_teacher": online / (sft + teacher_fwd),
              "steps": args.steps, "warmup": args.warmup, "topk": args.topk}
    rows = [("plain SFT step", sft, ""), (f"cached teacher (top-{args.topk}) step", cached, f"{cached / sft:.3f} x SFT"),
            ("teacher forward alone", teacher_fwd, ""), ("SFT step + teacher forward", sft + teacher_fwd, ""),
            ("online teacher step", online, f"{online / (sft + teacher_fwd):.3f} x (SFT + teacher forward)")]
    print(f"{'':36} {'median s':>9}")
    for name, seconds, note in rows:
        print(f"{name:36} {seconds:9.4f}  {note}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    from megamod import distributed

    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
