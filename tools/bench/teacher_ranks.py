"""The same d2s steps with the teacher in the job and on its own ranks: step time, bytes sent, who waits.

    python tools/bench/teacher_ranks.py [--root DIR] [--steps 12] [--warmup 3] [--out bench.json]

Each run is `megamod train` under torchrun, as a user runs it, on the tiny LLaVA set-up of the engine tests
(tests/training_setup.py: synthetic data, a trained tiny teacher, the sparse student), built under --root if absent:

  in job       2 ranks: student DP=2, the teacher on the same ranks
  ranks top-K  2 teacher ranks (TP=1, one replica per student rank) + 2 student ranks (DP=2), send: topk (bf16)
  ranks full   the same, send: full (the run's dtype, fp32 on CPU)

Per run, from the student's `<out>/metrics.jsonl` (steps after --warmup): the median step time, and the student's
idle fraction (its wait for the teacher's rows / its step time); from the teacher's `<out>/teacher_ranks.json`: its
idle fraction (waiting for the next step's micro-batches / its whole serving time) and the bytes it sent per answer
token. On CPU the ranks share the machine's cores (4 processes of one thread on a 2-core machine for the split runs,
2 for the in-job one): the times say what the messages and the one-step lookahead cost, not what separate GPUs give.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools", "bench"))


def _train(nproc: int, recipe: dict, root: str, name: str, timeout_s: int) -> None:
    """`megamod train` under torchrun; a failure stops the benchmark with the run's output."""
    from megamod.distributed import free_port

    path = os.path.join(root, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
           "-m", "megamod", "train", "--config", path]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode:
        raise SystemExit(f"{name}: {' '.join(cmd)} failed ({proc.returncode})\n{proc.stdout[-4000:]}\n"
                         f"{proc.stderr[-6000:]}")


def _measure(out: str, warmup: int) -> dict:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f][warmup:]
    row = {"step_s": statistics.median(s["step_s"] for s in steps), "steps": len(steps)}
    if "teacher_wait_s" in steps[0]:
        row["student_idle"] = sum(s["teacher_wait_s"] for s in steps) / sum(s["step_s"] for s in steps)
        with open(os.path.join(out, "teacher_ranks.json")) as f:
            report = json.load(f)
        row["teacher_idle"] = report["idle_fraction"]
        row["bytes_per_token"] = report["bytes_per_answer_token"]
    return row


def main(argv=None) -> int:
    a = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "megamod-bench-teacher-ranks"))
    a.add_argument("--steps", type=int, default=12)
    a.add_argument("--warmup", type=int, default=3)
    a.add_argument("--topk", type=int, default=64)
    a.add_argument("--timeout", type=int, default=600, help="seconds per run")
    a.add_argument("--out", default=None, help="write the results as JSON (tools/bench/perf_report.py reads it)")
    args = a.parse_args(argv)

    import torch

    import benchlib
    from megamod import distributed
    from tests.training_setup import base_recipe, build

    p = build(args.root)
    distributed.shutdown()
    runs = os.path.join(args.root, f"runs-{os.getpid()}")
    os.makedirs(runs)
    common = dict(schedule={"steps": args.steps + args.warmup, "global_batch_size": 4, "micro_batch_size": 2},
                  checkpoint={"every": 0, "keep": 1}, data={"epoch_size": 10_000},
                  optim={"distributed_optimizer": True})
    ranks = {"ckpt": p["teacher"], "ranks": 2, "parallel": {"tp": 1}}
    designs = [("in job", 2, p["teacher"]),
               (f"ranks top-{args.topk}", 4, {**ranks, "send": "topk", "topk": args.topk, "dtype": "bfloat16"}),
               ("ranks full", 4, {**ranks, "send": "full"})]
    rows = []
    for name, nproc, teacher in designs:
        out = os.path.join(runs, name.replace(" ", "-"))
        _train(nproc, base_recipe(p["root"], "d2s", p["sparse"], out, teacher=teacher, **common), runs,
               name.replace(" ", "-"), args.timeout)
        rows.append({"design": name, "ranks": nproc, **_measure(out, args.warmup)})
        print(f"{name}: {rows[-1]}", flush=True)
    base = rows[0]["step_s"]
    for row in rows:
        row["vs_in_job"] = row["step_s"] / base
    columns = [("design", "design", ""), ("ranks", "ranks", "d"), ("step_s", "step s (median)", ".4f"),
               ("vs_in_job", "x in job", ".2f"), ("bytes_per_token", "bytes sent / answer token", ".0f"),
               ("teacher_idle", "teacher idle", ".0%"), ("student_idle", "student idle", ".0%")]
    notes = [f"d2s, tiny LLaVA (tests/training_setup.py), global batch 4, micro-batch 2, {args.steps} steps after "
             f"{args.warmup} warm-up, gloo; student DP=2 in every run, teacher TP=1 x 2 replicas on its own ranks",
             f"top-{args.topk}: int32 ids + bf16 log-probs per position + the fp32 log tail mass; full: the "
             f"tokenizer's ids' logits in fp32. Only answer positions are sent.",
             "CPU: every rank one thread, the split runs 4 processes on the machine's cores, the in-job run 2"]
    res = benchlib.result("teacher_ranks", "The teacher in the job vs on its own ranks (d2s steps, CPU)",
                          torch.device("cpu"), vars(args), columns, rows, notes)
    benchlib.print_table(res)
    benchlib.write_json(res, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
